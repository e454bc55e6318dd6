"""Transform presets shared by training, evaluation, indexing and serving.

A model only ever sees ``normalize(to_tensor(resize(image)))`` with the *training split's*
per-channel mean and std, which travel in the checkpoint.  Serving calls
:func:`image_to_tensor` with the checkpoint's stats: the same preset, no second copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class NormStats:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> NormStats:
        return cls(tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"]))


def compute_stats(images: torch.Tensor) -> NormStats:
    """Per-channel mean/std of a (N, C, H, W) float tensor in [0, 1]."""
    x = images.transpose(0, 1).reshape(images.shape[1], -1).double()  # (C, N*H*W)
    mean = x.mean(dim=1)
    std = x.std(dim=1).clamp_min(1e-6)
    return NormStats(tuple(mean.tolist()), tuple(std.tolist()))


def normalize(x: torch.Tensor, stats: NormStats) -> torch.Tensor:
    """(B, C, H, W) or (C, H, W) in [0, 1] -> zero mean, unit variance per channel."""
    shape = (-1, 1, 1)
    mean = torch.tensor(stats.mean, dtype=x.dtype, device=x.device).view(shape)
    std = torch.tensor(stats.std, dtype=x.dtype, device=x.device).view(shape)
    return (x - mean) / std


def pil_to_uint8(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """A PIL image -> (C, S, S) uint8, resized to the model's input size.

    What serving ships from the ingress to the model replica: a quarter of the float32 bytes.
    """
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    arr = np.asarray(img)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (1, S, S) or (3, S, S)
    return np.ascontiguousarray(arr)


def uint8_to_unit(arr: np.ndarray) -> np.ndarray:
    """uint8 pixels (any shape) -> float32 in [0, 1]."""
    return arr.astype(np.float32) / np.float32(255.0)


def pil_to_unit_tensor(img: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """A PIL image -> (C, S, S) float32 in [0, 1], resized to the model's input size."""
    return torch.from_numpy(uint8_to_unit(pil_to_uint8(img, image_size, channels)))


def image_to_tensor(img: Image.Image, image_size: int, channels: int, stats: NormStats) -> torch.Tensor:
    """The eval preset: PIL image -> normalised (C, S, S) model input."""
    return normalize(pil_to_unit_tensor(img, image_size, channels), stats)
