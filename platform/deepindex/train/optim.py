"""Optimiser with per-group learning rates, and the learning-rate decay policies.

Policies are torch's own schedulers; this module only maps the config onto them and adds a
linear warm-up in front.  All are stepped once per epoch; ``on-plateau`` reads the
validation loss.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import lr_scheduler as S

if TYPE_CHECKING:
    from deepindex.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, optim_cfg: OptimConfig) -> list[dict[str, Any]]:
    """Head at ``lr``; everything else (the backbone) at ``lr * backbone_lr_mult``."""
    head = getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    head_params = [p for p in model.parameters() if id(p) in head_ids]
    body_params = [p for p in model.parameters() if id(p) not in head_ids]
    groups: list[dict[str, Any]] = [
        {"params": body_params, "lr": optim_cfg.lr * optim_cfg.backbone_lr_mult, "name": "backbone"}]
    if head_params:
        groups.append({"params": head_params, "lr": optim_cfg.lr, "name": "head"})
    return groups


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, optim_cfg)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                               nesterov=optim_cfg.nesterov and optim_cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


class EpochScheduler:
    """A decay policy plus optional linear warm-up, stepped once per epoch.

    ``step(val_loss)`` after each epoch; ``state_dict``/``load_state_dict`` for resume.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, sched_cfg: ScheduleConfig, epochs: int) -> None:
        c = sched_cfg
        self.warmup_epochs = c.warmup_epochs
        self.epoch = 0
        after = max(1, epochs - c.warmup_epochs)
        self.plateau = c.policy == "plateau"
        main: S.LRScheduler  # ReduceLROnPlateau is one too, stepped with the validation loss
        if c.policy == "none":
            main = S.ConstantLR(optimizer, factor=1.0, total_iters=0)
        elif c.policy == "step":
            main = S.StepLR(optimizer, step_size=c.step_size, gamma=1.0 / c.factor)
        elif c.policy == "multistep":
            main = S.MultiStepLR(optimizer, milestones=[m - c.warmup_epochs for m in c.milestones],
                                 gamma=1.0 / c.factor)
        elif c.policy == "exponential":
            main = S.ExponentialLR(optimizer, gamma=c.gamma)
        elif c.policy == "cosine":
            main = S.CosineAnnealingLR(optimizer, T_max=after, eta_min=c.min_lr)
        elif c.policy == "plateau":
            main = S.ReduceLROnPlateau(optimizer, mode="min", factor=1.0 / c.factor, patience=c.patience)
        else:  # pydantic has checked the name already
            raise ValueError(f"schedule.policy: unknown policy {c.policy!r}")
        self.main = main
        self.warmup: S.LinearLR | None = None
        if c.warmup_epochs > 0:
            # Warm-up from lr/10 to lr over warmup_epochs; the main policy starts after it.
            self.warmup = S.LinearLR(optimizer, start_factor=0.1, end_factor=1.0, total_iters=c.warmup_epochs)

    def step(self, val_loss: float | None = None) -> None:
        self.epoch += 1
        if self.warmup is not None and self.epoch <= self.warmup_epochs:
            self.warmup.step()
        elif isinstance(self.main, S.ReduceLROnPlateau):  # self.plateau
            self.main.step(val_loss if val_loss is not None else float("inf"))
        else:
            self.main.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "main": self.main.state_dict(),
            "warmup": self.warmup.state_dict() if self.warmup is not None else None,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch = sd["epoch"]
        self.main.load_state_dict(sd["main"])
        if self.warmup is not None and sd.get("warmup") is not None:
            self.warmup.load_state_dict(sd["warmup"])


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The head's learning rate (the last group), the one a user set as ``optim.lr``."""
    return float(optimizer.param_groups[-1]["lr"])
