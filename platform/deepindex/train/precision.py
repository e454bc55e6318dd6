"""The GPU path of a training step: mixed precision, channels-last tensors, pinned async copies.

``train.amp=bf16`` runs the forward pass under ``torch.autocast`` in bfloat16 (no loss scaling
needed: bf16 has fp32's exponent range); ``fp16`` adds a ``GradScaler`` so small gradients do
not underflow.  ``train.channels_last`` stores activations NHWC, what tensor cores' convolutions
want.  On a GPU the DataLoader pins host memory and batches are copied with
``non_blocking=True`` so the copy overlaps compute.  All of it also runs on CPU (autocast and
the scaler exist there), which is how the tests cover it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from deepindex.config import TrainConfig

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)  # prepare_model keeps the model's own type
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    device: torch.device
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, train_cfg: TrainConfig, device: torch.device | str) -> Precision:
        device = torch.device(device)
        amp = train_cfg.amp
        if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("train.amp: this GPU has no bfloat16; use train.amp=fp16")
        scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        return cls(device, amp, train_cfg.channels_last, scaler)

    @property
    def pin_memory(self) -> bool:
        """Pinned host buffers only help (and only work) when batches go to a GPU."""
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.amp])

    def prepare_model(self, model: _ModuleT) -> _ModuleT:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images to the device: async from pinned memory, NHWC if asked."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def backward_step(self, objective: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            objective.backward()
            optimizer.step()
            return
        self.scaler.scale(objective).backward()
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()
