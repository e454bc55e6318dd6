"""Losses and weight penalties.

Exclusive concepts: softmax + cross-entropy.  Multi-label concepts: one sigmoid per concept
+ binary cross-entropy (``BCEWithLogitsLoss``, numerically stable).  L1/L2 penalties act on
weights (conv and linear kernels), not on biases or batch-norm parameters, and each is
switched on at its own start epoch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from deepindex.config import RegularizationConfig


def make_loss(multilabel: bool) -> nn.Module:
    return nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()


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
