"""Plain-torch epoch functions (no Ray): ``train_one_epoch`` and ``evaluate``.

Both return a metrics dict; the Ray Train worker loop, the benchmark's plain baseline and
the tests all call these same functions.  :func:`local_training` sets up one in-process run
(the benchmark's baseline, the small fixture model) from a config.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from deepindex.models.transfer import keep_frozen_in_eval
from deepindex.train.losses import Penalty, penalised_params
from deepindex.train.metrics import per_concept_ap, topk_error
from deepindex.train.precision import Precision

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from deepindex.config import Config
    from deepindex.data import Splits


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],  # a DataLoader, or a Ray Data feed's batches
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    penalty: Penalty,
    epoch: int,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    precision: Precision | None = None,
) -> dict[str, float]:
    """One pass of minibatch SGD; returns mean data loss, penalty and images/s.

    ``precision`` (the GPU path): autocast, grad scaling, channels-last inputs; None = fp32.
    """
    model.train()
    keep_frozen_in_eval(model)  # model.freeze: frozen layers keep their batch-norm statistics
    params = penalised_params(model)
    total_loss, total_pen, seen = 0.0, 0.0, 0
    start = time.perf_counter()
    for batches, (x, y) in enumerate(loader, start=1):
        x = precision.to_device(x) if precision is not None else x.to(device, non_blocking=True)  # (B, C, H, W)
        y = y.to(x.device, non_blocking=True)  # (B,) | (B, K)
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            logits = model(x)  # (B, K)
        loss = loss_fn(logits.float(), y)
        pen = penalty(params, epoch)
        objective = loss if pen is None else loss + pen
        optimizer.zero_grad(set_to_none=True)
        if precision is not None:
            precision.backward_step(objective, optimizer)
        else:
            objective.backward()
            optimizer.step()
        n = x.shape[0]
        total_loss += loss.item() * n
        total_pen += (pen.item() if pen is not None else 0.0) * n
        seen += n
        if max_batches is not None and batches >= max_batches:
            break
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_penalty": total_pen / max(seen, 1),
        "images_per_s": seen / elapsed if elapsed > 0 else 0.0,
        "train_images": float(seen),
    }


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str = "cpu",
            precision: Precision | None = None, empty: tuple[int, bool] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and targets of a loader, on the CPU: (N, K), (N,) | (N, K).  ``empty`` (K, multilabel): what
    a loader without a batch gives, (0, K) and (0,) | (0, K) (a worker's share of a split smaller than the
    worker group; found on review: ``torch.cat`` of nothing failed every try of the run); else a ValueError."""
    model.eval()
    outs, ys = [], []
    for x, y in loader:
        x = precision.to_device(x) if precision is not None else x.to(device)
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            outs.append(model(x).float().cpu())
        ys.append(y)
    if not outs:
        if empty is None:
            raise ValueError("predict: the loader holds no batch")
        k, multilabel = empty
        return torch.zeros((0, k)), (torch.zeros((0, k)) if multilabel else torch.zeros(0, dtype=torch.int64))
    return torch.cat(outs), torch.cat(ys)


def scores_to_metrics(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, loss_fn: nn.Module | None = None,
                      prefix: str = "val_") -> dict[str, Any]:
    """Metrics of a whole split from its logits: loss and top-1/top-5 error (top-5 for more than 5
    classes), or mAP and per-concept AP."""
    out: dict[str, Any] = {}
    if loss_fn is not None:
        out[f"{prefix}loss"] = float(loss_fn(logits, targets))
    # A model that diverged (a NaN or an infinite logit) has no ranking: every metric is NaN, which no
    # best-checkpoint choice, Tune or promotion takes.  Sorted, NaN went first and scored like a row-order
    # ranking (an mAP of 0.75, a top-1 error of 0.75, found on review).
    finite = bool(torch.isfinite(logits).all())
    if multilabel:
        # AP ranks by the logits: the same order as the sigmoid's, without float32's ties (every logit
        # above ~16.6 is a probability of 1.0, where a confident negative tied the positives).
        ap = per_concept_ap(logits, targets) if finite else torch.full((targets.shape[1],), float("nan"))
        valid = ap[~ap.isnan()]
        out[f"{prefix}map"] = float(valid.mean()) if len(valid) else float("nan")
        out[f"{prefix}ap"] = [None if v != v else float(v) for v in ap.tolist()]  # NaN -> None (JSON)
    else:
        out[f"{prefix}top1_error"] = topk_error(logits, targets, 1) if finite else float("nan")
        if logits.shape[-1] > 5:  # with 5 classes or fewer every label is in the top 5: always 0
            out[f"{prefix}top5_error"] = topk_error(logits, targets, 5) if finite else float("nan")
    return out


def evaluate(model: nn.Module, loader: DataLoader, multilabel: bool, loss_fn: nn.Module | None = None,
             device: torch.device | str = "cpu", prefix: str = "val_") -> dict[str, Any]:
    logits, targets = predict(model, loader, device)
    return scores_to_metrics(logits, targets, multilabel, loss_fn, prefix)


def primary_metric(multilabel: bool, prefix: str = "val_") -> tuple[str, str]:
    """(metric name, "max" | "min"): what best-k checkpoints, Tune and promotion rank by."""
    return (f"{prefix}map", "max") if multilabel else (f"{prefix}top1_error", "min")


# The worst score of each primary metric (both lie in 0..1): what Tune sees of a diverged epoch.
WORST = {name: 0.0 if mode == "max" else 1.0 for name, mode in (primary_metric(True), primary_metric(False))}


@dataclass
class LocalTraining:
    """One in-process training run (no Ray, no DDP): what the Ray worker builds, on one process."""

    splits: Splits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    loss_fn: nn.Module
    penalty: Penalty
    config: Any = None  # the config with its data keys resolved (what a checkpoint should hold)
    precision: Precision | None = None

    def epoch(self, epoch: int) -> dict[str, float]:
        from deepindex.models.transfer import unfreeze_due

        if self.config is not None and unfreeze_due(self.model, self.config, epoch):
            from deepindex.models.transfer import unfreeze

            unfreeze(self.model)
        return train_one_epoch(self.model, self.loader, self.optimizer, self.loss_fn, self.penalty, epoch,
                               precision=self.precision)


def local_training(cfg: Config) -> LocalTraining:
    """Data, model, optimizer, shuffled loader (seeded: same seed, same weights) and loss of ``cfg``."""
    from deepindex.data import build_splits
    from deepindex.data.inspect import resolve_config
    from deepindex.models import build_model
    from deepindex.train.losses import make_loss
    from deepindex.train.optim import build_optimizer

    cfg = resolve_config(cfg)
    torch.manual_seed(cfg.train.seed)
    splits = build_splits(cfg.data)
    if splits.report is not None:
        log.info("data: %s", splits.report.summary())
    model = build_model(cfg.model, len(splits.concepts), splits.channels)
    precision = Precision.from_config(cfg.train, "cpu")
    model = precision.prepare_model(model)
    optimizer = build_optimizer(model, cfg.optim)
    loss_fn, penalty = make_loss(splits.multilabel, cfg.train), Penalty(cfg.regularization)
    g = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(splits.train, batch_size=cfg.train.batch_size, shuffle=True, generator=g, drop_last=True,
                        num_workers=cfg.data.num_workers)
    return LocalTraining(splits, model, optimizer, loader, loss_fn, penalty, cfg, precision)
