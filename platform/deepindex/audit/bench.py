"""The noisy-label benchmark: what an audit finds and what training on its cleaned labels buys.

``NOISY_DIGITS`` is the setting the README's figures and the tests use: digit-scenes with
30 % of the train/val items mislabeled, 24 px scenes (the 8x8 source glyphs lose nothing at
that size) and a 3-block ConvNet, one thread per Train worker, so a K=3 audit fits a
shared 2-core machine in minutes.  AdamW at 3e-3 without warm-up failed one training in
four (test mAP 0.968 against 0.982-0.986 at the same setting); one warm-up epoch removed
the outlier (0.983-0.989), and an outlier fold costs the audit precision.

:func:`compare_label_views` trains the same model, seed and schedule on the noisy, the
audit-filtered and the clean labels (plain torch, in this process: the comparison is about
labels, not the platform) and scores each on the clean test split.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepindex.config import Config

log = logging.getLogger(__name__)

NOISY_DIGITS = ["data.label_noise=0.3", "data.image_size=24", "data.train_size=4000", "data.val_size=300",
                "data.test_size=2000", "model.channels=[32,64,64]", "model.dropout=0.1", "optim.name=adamw",
                "optim.lr=0.003", "schedule.policy=cosine", "schedule.warmup_epochs=1", "regularization.l2=0",
                "train.batch_size=32", "train.epochs=10", "train.threads=1", "ray.num_workers=1",
                "ray.cpus_per_worker=1"]
# The same for exclusive classes: single-label digits, 30 % of the train/val items filed under another class.
NOISY_CLASSES = [*NOISY_DIGITS, "data.dataset=digits"]


def label_views(report: str) -> dict[str, dict[str, Any]]:
    """Overrides of the three label views compared: as given, filtered by the audit, the truth."""
    return {"noisy": {}, "filtered": {"data.label_filter": str(report)}, "clean": {"data.label_noise": 0.0}}


def train_and_score(cfg: Config, threads: int) -> float:
    """Train ``cfg`` in this process (seeded) and return its score on the clean test split: mAP, or
    the top-1 error for exclusive classes (:func:`deepindex.train.engine.primary_metric`)."""
    import torch
    from torch.utils.data import DataLoader

    from deepindex.train.engine import evaluate, local_training, primary_metric
    from deepindex.train.optim import EpochScheduler

    torch.set_num_threads(threads)
    run = local_training(cfg)
    # The learning-rate policy the Train workers follow (local_training leaves it out).
    scheduler = EpochScheduler(run.optimizer, cfg.schedule, cfg.train.epochs)
    val = DataLoader(run.splits.val, batch_size=500)
    for epoch in range(cfg.train.epochs):
        run.epoch(epoch)
        plateau = cfg.schedule.policy == "plateau"
        scheduler.step(evaluate(run.model, val, True, run.loss_fn)["val_loss"] if plateau else None)
    test = evaluate(run.model, DataLoader(run.splits.test, batch_size=500), cfg.multilabel, prefix="test_")
    return float(test[primary_metric(cfg.multilabel, "test_")[0]])


def compare_label_views(cfg: Config, report: str, seeds: tuple[int, ...] = (0,),
                        threads: int = 1) -> dict[str, list[float]]:
    """Test score per label view and seed (:func:`train_and_score`; the test split is clean in every view).

    On a connected Ray cluster each training is a one-CPU task, so the views train side by
    side; otherwise one after the other in this process."""
    import ray

    jobs = [(name, seed, cfg.override({**over, "train.seed": seed}))
            for name, over in label_views(report).items() for seed in seeds]
    if ray.is_initialized():
        task = ray.remote(num_cpus=threads)(train_and_score)
        scores = ray.get([task.remote(c, threads) for _, _, c in jobs])
    else:
        scores = [train_and_score(c, threads) for _, _, c in jobs]
    out: dict[str, list[float]] = {}
    for (name, seed, _), m in zip(jobs, scores, strict=True):
        out.setdefault(name, []).append(m)
        log.info("%s labels, seed %d: test %s %.4f", name, seed, "mAP" if cfg.multilabel else "top-1 error", m)
    return out
