"""``build_trainer(cfg)``: the one Ray Train ``TorchTrainer`` that train and tune share."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepindex.config import FILE_DATASETS, GENERATED, Config, ConfigError
from deepindex.paths import state_dir
from deepindex.restore import TRAIN_STATE, check_unchanged, config_definition, read_state, record_definition
from deepindex.train.engine import primary_metric

if TYPE_CHECKING:
    from ray.train import Checkpoint, UserCallback
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.result import Result

    from deepindex.tracking.tracker import Tracker

log = logging.getLogger(__name__)
_LEFT_OUT = 0.1  # check_batches warns when each epoch leaves out more of the train split than this

RAY_TRAIN_STATE = "checkpoint_manager_snapshot.json"  # Ray Train V2's: a run with it resumes from its checkpoint


STORAGE_ENV = "DEEPINDEX_STORAGE_PATH"  # the default ray.storage_path (k8s: the shared volume's folder)


def storage_path(cfg: Config) -> str:
    """Where Ray Train persists checkpoints: the config's ``ray.storage_path``, else
    ``$DEEPINDEX_STORAGE_PATH``, else ``<state dir>/ray_results``."""
    p = cfg.ray.storage_path or os.environ.get(STORAGE_ENV)
    if p:
        return p if "://" in p else str(Path(p).expanduser().resolve())
    return str(state_dir() / "ray_results")


def folder_storage(cfg: Config, what: str) -> str:
    """:func:`storage_path` for a sweep or an audit, whose state, trial folders and reports are files on a
    shared folder: a remote URL is refused in one line (``Path("s3://b/x")`` is the local ``s3:/b/x``:
    every trial trained to a local folder, and the sweep then marked each one FAILED; found on review)."""
    p = storage_path(cfg)
    if "://" in p:
        raise ConfigError(f"ray.storage_path: a {what} keeps its state, trials and reports in a folder every node "
                          f"shares, not at {p} (training runs alone take a remote URL): give such a folder, e.g. "
                          f"/mnt/shared/ray_results on k8s")
    return p


def run_name(cfg: Config) -> str:
    """``ray.name``, else a new run's own name (``train-YYYYmmdd-HHMMSS``; its folder is made)."""
    from deepindex.restore import fresh_name

    return cfg.ray.name or fresh_name("train", storage_path(cfg))


def journal_path(cfg: Config, name: str) -> str | None:
    """Where a run journals its tracking calls while MLflow is unreachable: next to its checkpoints
    (None on remote storage, where the checkpoints' metrics are the record)."""
    storage = storage_path(cfg)
    from deepindex.tracking.tracker import JOURNAL

    return None if "://" in storage else str(Path(storage) / name / JOURNAL)


def check_batches(cfg: Config, train_rows: int, warn: bool = True) -> None:
    """Every worker's share of the train split holds at least one of its batches: the loaders drop
    the last partial batch (so every rank takes the same steps), and a share smaller than a batch
    would train nothing, every epoch, without a word (seen with a 48-image folder at batch 64).
    A batch that leaves more than a tenth of the split out of each epoch is warned about, with the
    batch size that would take the most (319 images in class folders at the default 128 trained 128)."""
    world = cfg.ray.num_workers
    per_worker = max(1, cfg.train.batch_size // world)  # the global batch is split
    share = train_rows // world
    if share == 0:
        raise ConfigError(f"ray.num_workers: {world} workers share a train split of {train_rows} items, "
                          "fewer than the workers")
    if share < per_worker:
        each = f" ({per_worker} a worker; each worker holds {share} of the {train_rows} items)" if world > 1 else ""
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is more than the train split fills{each}: "
                          f"no training step would run; set train.batch_size <= {share * world}")
    trained = share // per_worker * per_worker * world
    if warn and train_rows - trained > _LEFT_OUT * train_rows:
        # The loaders keep every rank's steps equal by dropping each one's last partial batch: on a
        # small collection that can be half of it, every epoch.  A batch a little smaller takes it all.
        best = max(range((per_worker + 1) // 2, per_worker + 1), key=lambda b: (share // b * b, b))
        better = share // best * best * world
        log.warning("train.batch_size: %d trains %d of the %d train items each epoch (each worker leaves out "
                    "its last partial batch, a different one every epoch); train.batch_size=%d would train %d",
                    cfg.train.batch_size, trained, train_rows, best * world, better)


def claim_run(cfg: Config, name: str) -> Path | None:
    """A run named again resumes from its last checkpoint (:mod:`deepindex.restore`): refused if it
    would train something else; a new run records what it trains.  Returns the folder of the run it
    resumes (None: a new run, or remote storage).  Where it runs, on how many workers and threads,
    its tracking and the audit it is a fold of may change, and ``train.epochs`` (more epochs continue
    a finished run) unless the schedule, the recorded or the new one, is cosine, which anneals over the
    run's epochs: a resumed cosine goes on past its end by raising the learning rate again."""
    storage = storage_path(cfg)
    if "://" in storage:
        return None  # remote storage: Ray Train's checkpoint is all there is to go by
    folder = Path(storage) / name
    # audit.*: a fold's audit (its filter may change on a restore; the audit checks its own folds).  train.epochs
    # is always recorded: a run started with step and resumed with cosine is refused for its policy, not its epochs.
    definition = config_definition(cfg, free=("ray.", "tracking.", "audit.", "train.threads"))
    if _has_checkpoint(folder):
        check_unchanged(name, folder, TRAIN_STATE, _compared(definition, read_state(folder, TRAIN_STATE)))
        return folder
    record_definition(folder, TRAIN_STATE, definition)  # a run that failed before its first checkpoint starts over
    return None


def _compared(definition: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """``definition`` as it is compared with the one the run recorded (in its state ``state``): train.epochs
    counts only when the recorded or the new schedule is cosine, and the recorded definition holds it (one
    recorded before train.epochs always was leaves it out of a non-cosine run's); otherwise it is the recorded
    one's, so the comparison passes over it."""
    recorded = state.get("definition")
    if not isinstance(recorded, dict):
        return definition
    cosine = "cosine" in (definition.get("schedule.policy"), recorded.get("schedule.policy"))
    if cosine and "train.epochs" in recorded:
        return definition
    out = {k: v for k, v in definition.items() if k != "train.epochs"}
    if "train.epochs" in recorded:
        out["train.epochs"] = recorded["train.epochs"]
    return out


def _has_checkpoint(folder: Path) -> bool:
    """Whether Ray Train resumes the run in ``folder`` from a checkpoint: its run state names one (an
    unreadable state counts as one: Ray Train would not start over from it either)."""
    f = folder / RAY_TRAIN_STATE
    if not f.is_file():
        return False
    try:
        return bool(json.loads(f.read_text()).get("latest_checkpoint_result"))
    except (OSError, ValueError, AttributeError):
        return True


def check_model_options(cfg: Config) -> None:
    """``model.weights`` and ``model.freeze`` on the driver, in one line, before any worker starts: a missing
    file or a layer the model does not have used to fail in every worker (retried ``ray.max_failures`` times).
    The model is built on the meta device: no memory, no weights."""
    if cfg.model.weights:
        from deepindex.models.backbones import weights_file

        weights_file(cfg.model.weights)
    if cfg.model.freeze != "none":
        import torch

        from deepindex.models import build_model

        with torch.device("meta"):
            build_model(cfg.model, 2, int(cfg.data.channels or 3), load_weights=False)  # applies the freeze


def build_trainer(cfg: Config, *, name: str | None = None, callbacks: list[UserCallback] | None = None,
                  extra: dict[str, Any] | None = None, tracker: Tracker | None = None) -> TorchTrainer:
    """A ``TorchTrainer`` for ``cfg``; same ``name`` + storage path = resume from its checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from deepindex.data.ingest import listed_train_rows, pipeline_for, prepare_ingest
    from deepindex.data.inspect import resolve_config
    from deepindex.train.worker import train_loop_per_worker

    name = name or run_name(cfg)
    claim_run(cfg, name)  # as given: what a resume is compared with
    # On the driver, once: what the data config leaves unset is inferred and logged here, so
    # every worker, checkpoint and MLflow run holds the same values; and missing ImageNet
    # weights fail here, in one line, before any worker starts.
    cfg = resolve_config(cfg, announce=True)
    if cfg.model.pretrained != "none":
        from deepindex.models.transfer import ensure_pretrained

        ensure_pretrained(cfg.model.name)
    check_model_options(cfg)
    storage = storage_path(cfg)
    multilabel = cfg.multilabel
    metric, mode = primary_metric(multilabel)
    resources: dict[str, float] = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    status_dir = None if "://" in storage else str(Path(storage) / name / "workers")
    loop_config: dict[str, Any] = {"config": cfg.to_dict(), "extra": extra or {}, "status_dir": status_dir,
                                   "tracker": tracker}
    data: dict[str, Any] = {}
    if pipeline_for(cfg, storage) == "ray":
        # A file collection: decoded once into the cache (or found there) and sharded by Ray Data.
        ingest = prepare_ingest(cfg, storage)
        check_batches(cfg, int(ingest.plan["train_rows"]))
        loop_config["ray_data"] = ingest.plan
        data = {"datasets": ingest.datasets, "dataset_config": ingest.data_config}
    elif cfg.data.dataset in GENERATED:  # generated: exactly data.train_size items
        check_batches(cfg, cfg.data.train_size)
    elif cfg.data.dataset in FILE_DATASETS:  # the local path: counted from the listing, no image decoded
        check_batches(cfg, listed_train_rows(cfg.data))
    return TorchTrainer(
        # mypy reads ray.train.torch's Train V1 TorchTrainer, which wants a loop returning None; Train V2 (what
        # runs) takes any loop and hands its value back as Result.return_value (jobs/bench_train.py reads it).
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.ray.placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            # The latest checkpoint is always kept as well (resume); the rest are the best-k.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints,
                                               checkpoint_score_attribute=metric,
                                               checkpoint_score_order=mode),
            # V1's RunConfig again (see above): V2's takes ray.train.UserCallback, V1's took Tune callbacks.
            callbacks=callbacks,  # type: ignore[arg-type]
        ),
        **data,
    )


def epoch_lines(epochs: int) -> UserCallback:
    """A Train callback that puts one console line per epoch.  It runs in the Train controller
    (an actor): its output reaches the driver through Ray, and the driver's console turns lines
    marked with ``deepindex.console.MARK`` into events."""
    from ray.train import UserCallback

    from deepindex.console import MARK

    class EpochLines(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            m = metrics[0] if metrics else {}
            name = next((k for k in (primary_metric(True)[0], primary_metric(False)[0]) if k in m), None)
            shown = f", {name} {m[name]:.4f}" if name else ""
            print(f"{MARK}epoch {int(m.get('epoch', 0)) + 1}/{epochs}: train_loss {m.get('train_loss', 0.0):.4f}"
                  f"{shown}, {m.get('images_per_s', 0.0):.0f} images/s", flush=True)

    return EpochLines()


@dataclass
class TrainOutcome:
    name: str
    metrics: dict[str, Any]  # the last epoch's reported metrics
    checkpoint: str  # path of the best checkpoint by the validation metric
    latest_checkpoint: str
    test_metrics: dict[str, Any]


def fit(trainer: TorchTrainer, name: str) -> Any:
    """``trainer.fit()`` with Ctrl-C as a user means it: an interrupt.

    Ray Train V2's ``fit()`` installs a SIGINT handler of its own that aborts the run and then calls
    ``sys.exit(0)``, so a Ctrl-C ended ``deepindex train`` without a word (status 1 here; 0 as Ray means
    it, when a script's next step would go on), and the handler stayed installed after ``fit()``,
    swallowing a later Ctrl-C.  Here
    that exit is a ``KeyboardInterrupt`` and the previous handler is back once ``fit()`` returns.
    """
    main = threading.current_thread() is threading.main_thread()  # Tune runs trials in other threads
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit as e:
        raise KeyboardInterrupt(f"train: run {name} interrupted") from e
    finally:
        if main and previous is not None:  # None: a handler not set from Python, which fit() replaced all the same
            signal.signal(signal.SIGINT, previous)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_checkpoint(result: Result, metric: str, mode: str) -> Checkpoint:
    """The checkpoint of ``result`` (a Train V2 ``Result``) with the best finite ``metric`` (``mode``: "max" or
    "min"; :func:`deepindex.train.engine.primary_metric`), else, when no kept checkpoint has one, the latest.

    Not ``Result.get_best_checkpoint``: Ray's checkpoint manager sorts a NaN score first and always keeps
    the latest checkpoint, so a diverged epoch is among ``best_checkpoints`` while a run has kept no more
    than ``ray.keep_checkpoints`` (a 2-epoch run at the default 2, or keep_checkpoints >= epochs); there
    ``get_best_checkpoint``'s ``max``/``min`` keeps that first NaN (no comparison with it holds), and
    ``deepindex train`` and the audit's folds took the diverged model as the best (found on review).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"best_checkpoint: mode {mode!r}, not 'max' or 'min'")
    scored = [(ckpt, float(m[metric])) for ckpt, m in result.best_checkpoints or () if _finite(m.get(metric))]
    if scored:
        pick = max if mode == "max" else min
        return pick(scored, key=lambda s: s[1])[0]
    if result.checkpoint is None:
        raise RuntimeError("train: the run finished without a checkpoint")
    log.warning("train: no checkpoint has a finite %s (training diverged): the latest stands as the best", metric)
    return result.checkpoint


def train(cfg: Config, *, name: str | None = None, evaluate_test: bool = True, tracker: Tracker | None = None,
          callbacks: list[UserCallback] | None = None) -> TrainOutcome:
    """Fit on the connected Ray cluster, then score the best checkpoint on the test split."""
    from deepindex.cluster import connect
    from deepindex.train.evaluation import evaluate_checkpoint

    name = name or run_name(cfg)
    # Our connection rules, not ray's auto-init (which may attach to any cluster on the machine).
    connect()
    trainer = build_trainer(cfg, name=name, tracker=tracker, callbacks=callbacks)
    result = fit(trainer, name)
    latest = result.checkpoint
    if latest is None:  # rank 0 reports one every epoch: fit() raises before a run ends without one
        raise RuntimeError(f"train: run {name} finished without a checkpoint")
    best_path = best_checkpoint(result, *primary_metric(cfg.multilabel)).path
    test = evaluate_checkpoint(best_path) if evaluate_test else {}
    return TrainOutcome(name, dict(result.metrics or {}), best_path, latest.path, test)
