"""Datasets -> train/val/test splits, normalisation stats and the concept list.

``build_splits(cfg.data)`` is the one entry point: training, evaluation, tuning and the
benchmarks all call it, so every step sees the same splits for the same config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from deepindex.data.digits import make_scenes
from deepindex.data.files import FileItems, read_cifar, read_concepts, read_image_folder, read_manifest
from deepindex.data.transforms import NormStats, compute_stats, normalize, pil_to_unit_tensor

if TYPE_CHECKING:
    from deepindex.config import DataConfig

__all__ = ["ImageFileDataset", "NormStats", "Splits", "build_splits", "normalize"]

# Normalisation stats of a file collection come from at most this many training images.
_STATS_SAMPLE = 2000


@dataclass
class Splits:
    train: SplitData
    val: SplitData
    test: SplitData
    concepts: list[str]
    multilabel: bool
    stats: NormStats
    channels: int
    image_size: int
    view: Any = None  # deepindex.data.label_view.LabelView: clean labels, noise, filter, CV fold


class ImageFileDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Images read lazily from disk through the eval preset; yields (x, target)."""

    def __init__(self, paths: list[Path], targets: torch.Tensor, image_size: int, channels: int,
                 stats: NormStats | None):
        self.paths, self.targets = paths, targets
        self.image_size, self.channels, self.stats = image_size, channels, stats

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[i]) as im:
            x = pil_to_unit_tensor(im, self.image_size, self.channels)
        if self.stats is not None:
            x = normalize(x, self.stats)
        return x, self.targets[i]


# What a split holds: tensors in memory (digits, CIFAR) or image files read on demand.
SplitData = TensorDataset | ImageFileDataset


def _tensor_splits(parts: dict[str, tuple[torch.Tensor, torch.Tensor]], concepts: list[str], multilabel: bool,
                   image_size: int) -> Splits:
    stats = compute_stats(parts["train"][0])
    ds = {k: TensorDataset(normalize(x, stats), y) for k, (x, y) in parts.items()}
    channels = parts["train"][0].shape[1]
    return Splits(ds["train"], ds["val"], ds["test"], concepts, multilabel, stats, channels, image_size)


def _split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = max(1, round(test_fraction * n)), max(1, round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise ValueError(f"data: {n} items are too few for the val/test fractions")
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


def _file_splits(items: FileItems, d: DataConfig, multilabel: bool) -> Splits:
    idx = _split_indices(len(items.paths), d.val_fraction, d.test_fraction, d.seed)
    sub = {k: ([items.paths[i] for i in v], items.targets[torch.as_tensor(v)]) for k, v in idx.items()}
    # Stats from a fixed sample of training images: enough for a mean and std, cheap on big folders.
    sample = sub["train"][0][:_STATS_SAMPLE]
    raw = ImageFileDataset(sample, sub["train"][1][: len(sample)], d.image_size, d.channels, None)
    stats = compute_stats(torch.stack([raw[i][0] for i in range(len(raw))]))
    ds = {k: ImageFileDataset(p, y, d.image_size, d.channels, stats) for k, (p, y) in sub.items()}
    return Splits(ds["train"], ds["val"], ds["test"], items.concepts, multilabel, stats, d.channels, d.image_size)


def build_splits(d: DataConfig) -> Splits:
    """Build the splits named by a :class:`deepindex.config.DataConfig`, with its label noise,
    label filter and CV fold applied (:mod:`deepindex.data.label_view`)."""
    from deepindex.data.label_view import apply_label_view

    return apply_label_view(_dataset_splits(d), d)


def _dataset_splits(d: DataConfig) -> Splits:
    if d.dataset in ("digit-scenes", "digits"):
        multilabel = d.dataset == "digit-scenes"
        if d.channels != 1:
            raise ValueError("data.channels: digit datasets are grayscale (1 channel)")
        sizes = {"train": d.train_size, "val": d.val_size, "test": d.test_size}
        parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for split, n in sizes.items():
            s = make_scenes(split, n, image_size=d.image_size, max_digits=d.max_digits, multilabel=multilabel,
                            seed=d.seed)
            parts[split] = (s.images, s.targets)
            concepts = s.concepts
        return _tensor_splits(parts, concepts, multilabel, d.image_size)
    if d.dataset == "image-folder":
        if not d.root:
            raise ValueError("data.root: required for an image folder")
        return _file_splits(read_image_folder(d.root), d, multilabel=False)
    if d.dataset == "manifest":
        if not (d.manifest and d.root and d.concepts):
            raise ValueError("data.manifest: a manifest needs data.manifest, data.root and data.concepts")
        items = read_manifest(d.manifest, d.root, read_concepts(d.concepts))
        return _file_splits(items, d, multilabel=True)
    if d.dataset in ("cifar10", "cifar100"):
        if not d.root:
            raise ValueError("data.root: required for CIFAR (the folder holding torchvision's files)")
        if d.channels != 3 or d.image_size != 32:
            raise ValueError("data.channels: CIFAR needs data.channels=3 and data.image_size=32")
        x, y, classes = read_cifar(d.root, d.dataset, train=True)
        xt, yt, _ = read_cifar(d.root, d.dataset, train=False)
        idx = _split_indices(len(y), d.val_fraction, 1e-9, d.seed)
        keep = np.concatenate([idx["train"], idx["test"]])  # test of the train file goes back to train
        parts = {"train": (x[keep], y[keep]), "val": (x[idx["val"]], y[idx["val"]]), "test": (xt, yt)}
        return _tensor_splits(parts, classes, False, 32)
    raise ValueError(f"data.dataset: unknown dataset {d.dataset!r}")
