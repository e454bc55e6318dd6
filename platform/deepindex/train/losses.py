"""Losses and weight penalties.

Exclusive concepts: softmax + cross-entropy.  Multi-label concepts: one sigmoid per concept
+ binary cross-entropy (``BCEWithLogitsLoss``, numerically stable).  L1/L2 penalties act on
weights (conv and linear kernels), not on biases or batch-norm parameters, and each is
switched on at its own start epoch.

For noisy labels (``train.label_smoothing``, ``train.bootstrap``), :class:`RobustBCE` softens
the multi-label targets: smoothing pulls every target towards 1/2, so a wrong tag costs a
bounded loss; bootstrapping mixes the given label with the model's own prediction, so a
confident model is not dragged back towards a missing or wrong tag.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from deepindex.config import RegularizationConfig, TrainConfig


def make_loss(multilabel: bool, train_cfg: TrainConfig | None = None) -> nn.Module:
    """The training loss; ``train_cfg`` switches on the noise-robust options.
    Without it (evaluation, test scores) the plain loss, comparable across runs."""
    if train_cfg is None:
        return nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    if not multilabel:
        return nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
    if train_cfg.label_smoothing or train_cfg.bootstrap != "none":
        return RobustBCE(train_cfg.label_smoothing, train_cfg.bootstrap, train_cfg.bootstrap_beta)
    return nn.BCEWithLogitsLoss()


class RobustBCE(nn.Module):
    """BCE-with-logits against softened targets: bootstrapped, then smoothed."""

    def __init__(self, smoothing: float = 0.0, bootstrap: str = "none", beta: float = 0.8):
        super().__init__()
        if bootstrap not in ("none", "soft", "hard"):
            raise ValueError(f"train.bootstrap: unknown mode {bootstrap!r} (none, soft, hard)")
        self.smoothing, self.bootstrap, self.beta = float(smoothing), bootstrap, float(beta)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # (B, K), (B, K)
        t = target.to(logits.dtype)
        if self.bootstrap != "none":
            # Detached: the prediction is a pseudo-label, not something the loss may move to
            # agree with itself (Reed et al.'s "soft" form would add an entropy bonus here).
            q = torch.sigmoid(logits.detach())
            if self.bootstrap == "hard":
                q = (q > 0.5).to(logits.dtype)
            t = self.beta * t + (1.0 - self.beta) * q
        if self.smoothing:
            t = t * (1.0 - self.smoothing) + 0.5 * self.smoothing
        return nn.functional.binary_cross_entropy_with_logits(logits, t)


def penalised_params(model: nn.Module) -> list[torch.Tensor]:
    """Weights that carry a penalty: tensors of 2+ dims (kernels), not biases or norms."""
    return [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]


class Penalty:
    """``l1 * sum|w| + l2/2 * sum w^2`` over the penalised weights, active from given epochs."""

    def __init__(self, reg_cfg: RegularizationConfig) -> None:
        self.cfg = reg_cfg

    def strengths(self, epoch: int) -> tuple[float, float]:
        c = self.cfg
        l1 = c.l1 if epoch >= c.l1_start_epoch else 0.0
        l2 = c.l2 if epoch >= c.l2_start_epoch else 0.0
        return l1, l2

    def __call__(self, params: list[torch.Tensor], epoch: int) -> torch.Tensor | None:
        l1, l2 = self.strengths(epoch)
        if l1 == 0.0 and l2 == 0.0:
            return None
        total = params[0].new_zeros(())
        for p in params:
            if l1:
                total = total + l1 * p.abs().sum()
            if l2:
                total = total + 0.5 * l2 * p.pow(2).sum()
        return total
