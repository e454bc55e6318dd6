"""``build_trainer(cfg)``: the one Ray Train ``TorchTrainer`` that train and tune share."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepindex.config import Config
from deepindex.paths import state_dir
from deepindex.train.engine import primary_metric

log = logging.getLogger(__name__)


def storage_path(cfg: Config) -> str:
    """Where Ray Train persists checkpoints: the config's, else ``<state dir>/ray_results``."""
    if cfg.ray.storage_path:
        p = cfg.ray.storage_path
        return p if "://" in p else str(Path(p).expanduser().resolve())
    return str(state_dir() / "ray_results")


def run_name(cfg: Config) -> str:
    return cfg.ray.name or time.strftime("train-%Y%m%d-%H%M%S")


def build_trainer(cfg: Config, *, name: str | None = None, callbacks: list | None = None,
                  extra: dict[str, Any] | None = None, tracker=None):
    """A ``TorchTrainer`` for ``cfg``; same ``name`` + storage path = resume from its checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from deepindex.data.inspect import resolve_config
    from deepindex.train.worker import train_loop_per_worker

    # On the driver, once: what the data config leaves unset is inferred and logged here, so
    # every worker, checkpoint and MLflow run holds the same values; and missing ImageNet
    # weights fail here, in one line, before any worker starts.
    cfg = resolve_config(cfg)
    if cfg.model.pretrained != "none":
        from deepindex.models.transfer import ensure_pretrained

        ensure_pretrained(cfg.model.name)
    name = name or run_name(cfg)
    storage = storage_path(cfg)
    multilabel = cfg.multilabel
    metric, mode = primary_metric(multilabel)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    status_dir = None if "://" in storage else str(Path(storage) / name / "workers")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "extra": extra or {}, "status_dir": status_dir,
                           "tracker": tracker},
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
            callbacks=callbacks,
        ),
    )


@dataclass
class TrainOutcome:
    name: str
    metrics: dict[str, Any]  # the last epoch's reported metrics
    checkpoint: str  # path of the best checkpoint by the validation metric
    latest_checkpoint: str
    test_metrics: dict[str, Any]


def train(cfg: Config, *, name: str | None = None, evaluate_test: bool = True, tracker=None,
          callbacks: list | None = None) -> TrainOutcome:
    """Fit on the connected Ray cluster, then score the best checkpoint on the test split."""
    from deepindex.cluster import connect

    name = name or run_name(cfg)
    # Our connection rules, not ray's auto-init (which may attach to any cluster on the machine).
    connect()
    trainer = build_trainer(cfg, name=name, tracker=tracker, callbacks=callbacks)
    result = trainer.fit()
    metric, mode = primary_metric(cfg.multilabel)
    best = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else result.checkpoint
    best_path = best.path if best is not None else result.checkpoint.path
    test = evaluate_checkpoint(best_path) if evaluate_test else {}
    return TrainOutcome(name, dict(result.metrics or {}), best_path, result.checkpoint.path, test)


def evaluate_checkpoint(path: str, split: str = "test", batch_size: int = 256) -> dict[str, Any]:
    """A checkpoint's metrics on a split of its own dataset (plain torch, in this process)."""
    from torch.utils.data import DataLoader

    from deepindex.checkpoint import load_model
    from deepindex.data import build_splits
    from deepindex.train.engine import evaluate
    from deepindex.train.losses import make_loss

    lm = load_model(path)
    splits = build_splits(lm.config.data, train_augment=False)
    loader = DataLoader(getattr(splits, split), batch_size=batch_size)
    return evaluate(lm.model, loader, lm.multilabel, make_loss(lm.multilabel), prefix=f"{split}_")
