"""A small model trained in-process with plain torch: fixtures, benchmarks, demos.

The same pieces Ray Train's worker uses (``build_splits``, ``build_model``,
``train_one_epoch``, ``save_checkpoint``), on one process and no Ray, so a test can have a
real checkpoint in seconds.
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import DataLoader

from deepindex.checkpoint import save_checkpoint
from deepindex.config import Config, load_config

log = logging.getLogger(__name__)

SMALL = ["model.channels=[16,32]", "model.convs_per_block=2", "model.embed_dim=64", "model.dropout=0.1",
         "optim.name=adamw", "optim.lr=0.003", "schedule.policy=none", "regularization.l2=0.0",
         "data.train_size=3000", "data.val_size=500", "data.test_size=500", "train.epochs=6", "train.batch_size=64"]


def train_small(out_dir: str | Path, overrides: list[str] | None = None, seed: int = 0) -> tuple[Path, Config]:
    """Train ``SMALL`` (+ overrides) on digit-scenes and write ``out_dir/checkpoint.pt``."""
    from deepindex.train.engine import evaluate, local_training

    cfg = load_config(None, [*SMALL, f"train.seed={seed}", *(overrides or [])])
    run = local_training(cfg)
    splits, model = run.splits, run.model
    for epoch in range(cfg.train.epochs):
        run.epoch(epoch)
    metrics = evaluate(model, DataLoader(splits.val, batch_size=256), splits.multilabel, run.loss_fn)
    log.info("small model: %s", {k: v for k, v in metrics.items() if not isinstance(v, list)})
    path = save_checkpoint(out_dir, model=model, config=cfg, stats=splits.stats, concepts=splits.concepts,
                           multilabel=splits.multilabel, epoch=cfg.train.epochs - 1, metrics=metrics)
    return path, cfg
