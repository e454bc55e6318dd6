"""The per-worker training function: the only training code that touches Ray.

Each Ray Train worker gets its data from a feed (:mod:`deepindex.train.feeds`): its shard of
the decoded cache through Ray Data (``data.pipeline=ray``, a file collection), or the splits
built in the worker and a ``DistributedSampler`` reshuffled per epoch (local).  It wraps the
model in DDP through ``prepare_model``, evaluates its shard of the validation split (gathered
so every rank sees the same metrics), and reports once per epoch; rank 0 attaches the
checkpoint.  A restarted worker group (after a failure, or a run started again under
the same name) resumes from ``ray.train.get_checkpoint()``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deepindex.checkpoint import read_checkpoint, save_checkpoint
from deepindex.config import from_dict
from deepindex.models import build_model
from deepindex.models.transfer import unfreeze, unfreeze_due
from deepindex.train.engine import predict, scores_to_metrics, train_one_epoch
from deepindex.train.feeds import Feed, LocalFeed, RayDataFeed
from deepindex.train.losses import Penalty, make_loss
from deepindex.train.optim import EpochScheduler, build_optimizer, current_lr
from deepindex.train.precision import Precision

if TYPE_CHECKING:
    from ray.data import DataIterator

    from deepindex.tracking.tracker import Tracker

log = logging.getLogger(__name__)


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank (rank order); sizes may differ by one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t)
    return torch.cat(parts)


def _streams(device: torch.device, precision: Precision) -> dict[str, Any]:
    """Every rank's random state (rank order) and the fp16 loss scaler's: a run resumed from this
    epoch's checkpoint draws the dropout masks, augmentations and loader seeds the uninterrupted run
    would have (it seeded afresh and drew epoch 1's again), and keeps its loss scale.  Every rank calls it."""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    ranks: list[Any] = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    return {"rng": ranks, "scaler": precision.scaler.state_dict() if precision.scaler is not None else None}


def _restore_streams(streams: dict[str, Any] | None, rank: int, world: int, device: torch.device,
                     precision: Precision) -> None:
    """Where :func:`_streams` left off; a checkpoint of another worker count (or of before they were
    saved) leaves each rank's seeded stream as it is."""
    if not streams:
        return
    if precision.scaler is not None and streams.get("scaler"):
        precision.scaler.load_state_dict(streams["scaler"])
    ranks = streams.get("rng") or []
    if len(ranks) != world:
        if rank == 0:
            log.info("the checkpoint's random streams are %d workers', this run has %d: they start afresh",
                     len(ranks), world)
        return
    torch.set_rng_state(ranks[rank]["cpu"])
    if device.type == "cuda" and ranks[rank].get("cuda") is not None:
        torch.cuda.set_rng_state(ranks[rank]["cuda"], device)


def _rank0_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (batch norm's running statistics) on every rank.  DDP sends them out at the start
    of each training forward, so after an epoch's last batch every rank holds its own: each validated its
    shard with other statistics than the checkpoint (rank 0's) holds, and the epoch's validation metrics
    were not the saved model's (found on review).  Training is unchanged: the next forward sends rank 0's
    again.  Every rank calls it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=0)


def group_train_means(m: dict[str, float]) -> dict[str, float]:
    """``train_loss`` and ``train_penalty`` over every rank's images (each rank's are over its own
    shard; rank 0's alone were logged as the epoch's, found on review).  Every rank calls it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return m
    seen = m["train_images"]
    sums: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(sums, (m["train_loss"] * seen, m["train_penalty"] * seen, seen))
    loss, pen, n = (sum(part[i] for part in sums) for i in range(3))
    return {**m, "train_loss": loss / max(n, 1), "train_penalty": pen / max(n, 1)}


def _write_status(status_dir: str | None, rank: int, **fields: Any) -> None:
    """Where each worker is (pid, epoch): for operators, and for fault-injection tests."""
    if not status_dir:
        return
    from deepindex.atomic import write_file

    write_file(Path(status_dir) / f"rank{rank}.json", json.dumps(
        {"rank": rank, "pid": os.getpid(), "node": os.uname().nodename, "time": time.time(), **fields}), durable=False)


def _write_shard(status_dir: str | None, rank: int, rows: np.ndarray | None) -> None:
    """The train items this rank read in an epoch (Ray Data): ranks never share one."""
    if not status_dir or rows is None:
        return
    from deepindex.atomic import write_file

    def save(path: Path) -> None:
        with path.open("wb") as f:
            np.save(f, np.sort(rows))

    write_file(Path(status_dir) / f"rank{rank}.shard.npy", save)


def _shard(name: str) -> DataIterator:
    import ray.train

    it = ray.train.get_dataset_shard(name)
    if it is None:  # build_trainer passes both datasets whenever it passes the plan
        raise RuntimeError(f"data: the trainer holds no {name!r} dataset")
    return it


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """What an epoch reports: its scalar metrics (per-concept AP stays in the checkpoint)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, list)}


def validation_metrics(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> dict[str, Any]:
    """The validation split's metrics, scored with the plain loss as the test split's are: the training
    loss's label smoothing or bootstrap would make a more confident model score worse, and the plateau
    schedule cut its rate for it (found on review)."""
    return scores_to_metrics(logits, targets, multilabel, make_loss(multilabel))


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Train ``loop_config["config"]``; returns this rank's per-epoch scalar metrics."""
    import psutil
    import ray.train
    import ray.train.torch
    from ray.util.metrics import Gauge

    # Where a run's start-up goes (jobs/bench_train.py prints it): wall-clock times of this worker's
    # process start, entry into this function, its data ready, its model wrapped in DDP.
    startup = {"process_start_time": psutil.Process().create_time(), "loop_entry_time": time.time()}
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    threads = cfg.train.threads or max(1, int(cfg.ray.cpus_per_worker))
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()

    precision = Precision.from_config(cfg.train, device)  # train.amp, train.channels_last
    plan = loop_config.get("ray_data")
    feed: Feed
    if plan is not None:  # every rank asks for its shard (a barrier): the driver built the datasets
        feed = RayDataFeed(plan, cfg, rank, world, precision, _shard("train"), _shard("val"))
    else:
        feed = LocalFeed(cfg, rank, world, precision)
    startup["data_ready_time"] = time.time()
    model: nn.Module = build_model(cfg.model, len(feed.concepts), feed.channels)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = EpochScheduler(optimizer, cfg.schedule, cfg.train.epochs)
    start_epoch, extra = 0, dict(loop_config.get("extra") or {})
    resumed: dict[str, Any] | None = None  # the checkpointed epoch's metrics, when resuming
    streams: dict[str, Any] | None = None  # the checkpointed epoch's random streams, restored before the next

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = read_checkpoint(d)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        resumed = _scalars({**(state.get("metrics") or {}), "epoch": state["epoch"]})
        extra.update(state.get("extra") or {})  # e.g. the MLflow run id: continue, not duplicate
        streams = state.get("streams")
        if rank == 0:
            log.info("resuming from the checkpoint of epoch %d", state["epoch"])

    core = precision.prepare_model(model)  # the unwrapped module (DDP wraps it below)
    if unfreeze_due(core, cfg, start_epoch):  # resumed after train.unfreeze_epoch
        unfreeze(core)
    model = ray.train.torch.prepare_model(core)
    startup["model_ready_time"] = time.time()
    if rank == 0 and feed.report:
        log.info("data: %s", feed.report)  # unknown tags, duplicates: once, from rank 0
    loss_fn = make_loss(feed.multilabel, cfg.train)
    penalty = Penalty(cfg.regularization)
    tracker: Tracker | None = loop_config.get("tracker")
    if tracker is not None and rank == 0:
        extra = tracker.start(cfg, extra)

    # Exported through Ray's metrics agent (Prometheus): the Grafana "training throughput" panel.
    throughput = Gauge("deepindex_train_images_per_s", "images/s of the training worker group", tag_keys=("run",))
    run_tag = {"run": ctx.get_experiment_name()}
    status: dict[str, Any] = {"node_id": ray.get_runtime_context().get_node_id(), "start_epoch": start_epoch,
                              "pipeline": "ray" if plan is not None else "local"}
    history: list[dict[str, Any]] = []
    if resumed is not None:
        # The resumed epoch's result again, without a new checkpoint: its first report may never have
        # reached the callbacks (a run stopped between writing the checkpoint and reporting it), and
        # a Tune trial restored after its last epoch would otherwise end on the one before it.
        ray.train.report(resumed)
    _restore_streams(streams, rank, world, device, precision)  # last: nothing above draws from them
    for epoch in range(start_epoch, cfg.train.epochs):
        epoch_start = time.time()
        _write_status(loop_config.get("status_dir"), rank, epoch=epoch, **status)
        if unfreeze_due(core, cfg, epoch):
            unfreeze(core)
            # DDP only all-reduces what required grad when it was built: wrap the module again.
            model = ray.train.torch.prepare_model(core)
            if rank == 0:
                log.info("epoch %d: train.unfreeze_epoch reached, every layer trains from now on", epoch)
        lr = current_lr(optimizer)
        train_metrics = group_train_means(train_one_epoch(model, feed.train_batches(epoch), optimizer, loss_fn,
                                                          penalty, epoch, device, precision=precision))
        if epoch == start_epoch:
            _write_shard(loop_config.get("status_dir"), rank, feed.rows_read)
        status["train_rows"] = int(train_metrics["train_images"])  # this rank's, last epoch
        # DDP's wrapped model, as a Module: nn.Module's __getattr__ is typed Tensor | Module.
        bare = cast(nn.Module, model.module) if hasattr(model, "module") else model
        _rank0_buffers(bare)
        logits, targets = predict(bare, feed.val_batches(), device, precision=precision,
                                  empty=(len(feed.concepts), feed.multilabel))
        logits, targets = _gather(logits), _gather(targets)
        val_metrics = validation_metrics(logits, targets, feed.multilabel)
        scheduler.step(val_metrics["val_loss"])
        # Images and images/s of the whole group: every rank trained as many images (equal shards,
        # drop_last) in about the same time.
        metrics = {**train_metrics, **val_metrics, "epoch": epoch, "lr": lr,
                   "images_per_s": train_metrics["images_per_s"] * world,
                   "train_images": train_metrics["train_images"] * world}
        if rank == 0:
            throughput.set(metrics["images_per_s"], tags=run_tag)
            if tracker is not None:
                tracker.log_epoch(metrics, epoch)
        scalars = _scalars(metrics)
        at_end = _streams(device, precision)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, model=model, config=cfg, stats=feed.stats, concepts=feed.concepts,
                                multilabel=feed.multilabel, epoch=epoch, optimizer=optimizer,
                                scheduler=scheduler, metrics=metrics, extra=extra, streams=at_end)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                log.info("epoch %d: %s", epoch, scalars)
            ray.train.report(scalars, checkpoint=ckpt)
        history.append({**scalars, "epoch_start_time": epoch_start, **(startup if not history else {})})
    _write_status(loop_config.get("status_dir"), rank, epoch=cfg.train.epochs, done=True, **status)
    return history
