"""Datasets -> train/val/test splits, normalisation stats and the concept list (``deepindex.data``'s
public names; the package re-exports them).

``build_splits(cfg.data)`` is the one entry point: training, evaluation, tuning and the
benchmarks all call it, so every step sees the same splits for the same config.  Keys the
config leaves unset (channels, size, preset, normalisation) are resolved first
(:mod:`deepindex.data.inspect`); ``data.augment`` applies to the training split only.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from deepindex.data.digits import make_scenes
from deepindex.data.files import FileItems, ImportReport, read_cifar, read_collection, read_image_folder
from deepindex.data.transforms import NormStats, compute_stats, decode_file, imagenet_stats, normalize, uint8_to_unit

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from deepindex.config import DataConfig
    from deepindex.data.augment import Transform

__all__ = ["ImageFileDataset", "NormStats", "SplitData", "Splits", "build_splits", "normalize", "split_len"]

# Normalisation stats of a file collection come from at most this many training images.
_STATS_SAMPLE = 2000

# A split: a map-style dataset of (x (C, S, S) normalised, target).  Every one built here is
# also Sized (TensorDataset, ImageFileDataset, AugmentedTensorDataset, and label views' Subset).
SplitData: TypeAlias = Dataset[tuple[torch.Tensor, ...]]


def split_len(ds: SplitData) -> int:
    """The number of items in a split (torch's ``Dataset`` type does not promise a length)."""
    if not isinstance(ds, Sized):
        raise TypeError(f"data: a {type(ds).__name__} split has no length")
    return len(ds)


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
    preset: str = "digit"
    report: ImportReport | None = None  # what a file import found (unknown tags, duplicates)
    view: Any = None  # deepindex.data.label_view.LabelView: clean labels, noise, filter, CV fold


class ImageFileDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Images read lazily from disk through the eval preset (then ``transform``, the train-time
    augmentation, on uint8); yields (x, target)."""

    def __init__(self, paths: list[Path], targets: torch.Tensor, image_size: int, channels: int,
                 stats: NormStats | None, preset: str | None = None, transform: Transform | None = None) -> None:
        self.paths, self.targets = paths, targets
        self.image_size, self.channels, self.stats = image_size, channels, stats
        self.preset, self.transform = preset, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # (C, S, S) uint8, through the eval preset
        u8 = torch.from_numpy(decode_file(self.paths[i], self.image_size, self.channels, self.preset))
        if self.transform is not None:
            u8 = self.transform(u8)
        x = torch.from_numpy(uint8_to_unit(u8.numpy()))
        if self.stats is not None:
            x = normalize(x, self.stats)
        return x, self.targets[i]


@dataclass(frozen=True)
class _Shape:
    """What :func:`deepindex.data.inspect.resolve_data` fills in when a config leaves it unset."""

    channels: int
    image_size: int
    preset: str


def _shape(d: DataConfig) -> _Shape:
    if d.channels is None or d.image_size is None or d.preset is None:
        raise ValueError("data: channels, image_size and preset are unresolved "
                         "(deepindex.data.inspect.resolve_data fills them in)")
    return _Shape(d.channels, d.image_size, d.preset)


def _train_transform(d: DataConfig, image_size: int) -> Transform | None:
    from deepindex.data.augment import build_augment

    return build_augment(d.augment, d.augment_strength, image_size)


def _tensor_splits(parts: dict[str, tuple[torch.Tensor, torch.Tensor]], concepts: list[str], multilabel: bool,
                   image_size: int, d: DataConfig | None = None, train_augment: bool = True,
                   stats: NormStats | None = None) -> Splits:
    channels = parts["train"][0].shape[1]
    if stats is None:
        imagenet = d is not None and d.normalize == "imagenet"
        stats = imagenet_stats(channels) if imagenet else compute_stats(parts["train"][0])
    ds: dict[str, SplitData] = {k: TensorDataset(normalize(x, stats), y) for k, (x, y) in parts.items()}
    transform = _train_transform(d, image_size) if d is not None and train_augment else None
    if transform is not None:
        from deepindex.data.augment import AugmentedTensorDataset

        ds["train"] = AugmentedTensorDataset(ds["train"], transform, stats)
    preset = d.preset if d is not None and d.preset else "digit"
    return Splits(ds["train"], ds["val"], ds["test"], concepts, multilabel, stats, channels, image_size, preset)


def id_order(ids: Sequence[str], seed: int) -> np.ndarray:
    """Positions of ``ids`` ordered by a hash of each id with ``seed``: an item's place among the others
    depends on its id alone, so adding or removing items moves no other item past it."""
    keys = [hashlib.blake2b(f"{seed}\0{i}".encode(), digest_size=8).digest() for i in ids]
    return np.asarray(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


def file_split_indices(items: FileItems, d: DataConfig) -> dict[str, np.ndarray]:
    """Item indices of each split of a file collection: its split column's, else drawn by id.

    Drawn by id (:func:`id_order`), not by position: a permutation of positions reshuffled every split
    when one image was added (found on review: 70 of 100 test items of the 1,001-image collection had
    been train items of the 1,000-image one), so a champion scored on a retrained candidate's test
    split had trained on most of it.  Now an item changes split only at the boundaries that the
    fractions move as the collection grows."""
    if items.splits is not None:
        return _column_split_indices(items.splits, d.val_fraction, d.test_fraction, d.seed, items.ids)
    return _split_indices(len(items.paths), d.val_fraction, d.test_fraction, d.seed, id_order(items.ids, d.seed))


def _split_indices(n: int, val_fraction: float, test_fraction: float, seed: int,
                   order: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``order`` (the items in the order they are dealt: test first, then val, then train), else a
    permutation drawn with ``seed`` (arrays of a fixed file, CIFAR's)."""
    if order is None:
        order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = max(1, round(test_fraction * n)), max(1, round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise ValueError(f"data: {n} items are too few for the val/test fractions")
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


def stats_sample(train_ids: Sequence[str], seed: int, size: int | None = None) -> np.ndarray:
    """Positions in the train split of the items whose images give the normalisation stats: all of them
    up to ``size``, else ``size`` of them drawn by id (:func:`id_order`).  A train split drawn by id is
    already in that order, so its first ``size``; one pinned by a split column is in the manifest's order,
    whose first rows were one source or one class of a concatenated or sorted manifest (found on review:
    stats of its dark first 2,000 images put the bright rest at 8.7 sigma)."""
    size = _STATS_SAMPLE if size is None else size
    if len(train_ids) <= size:
        return np.arange(len(train_ids), dtype=np.int64)
    return id_order(train_ids, seed)[:size]


def _column_split_indices(splits: list[str | None], val_fraction: float, test_fraction: float,
                          seed: int, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Splits pinned by a manifest's split column; empty cells go to train, and a split no row
    names is carved from train with its fraction (a train/test manifest still gets a val split),
    drawn by id as :func:`file_split_indices` draws."""
    idx: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, s in enumerate(splits):
        idx[s or "train"].append(i)
    out = {k: np.asarray(v, dtype=np.int64) for k, v in idx.items()}
    for name, frac in (("test", test_fraction), ("val", val_fraction)):
        if len(out[name]) == 0:
            order = out["train"][id_order([ids[i] for i in out["train"]], seed)]
            n = max(1, round(frac * len(order)))
            out[name], out["train"] = np.sort(order[:n]), np.sort(order[n:])
            log.debug("data: no %s rows in the split column; %d carved from train", name, n)
    if len(out["train"]) == 0:
        raise ValueError("data.manifest: the split column leaves no training rows")
    return out


def _file_splits(items: FileItems, d: DataConfig, multilabel: bool, train_augment: bool = True,
                 stats: NormStats | None = None) -> Splits:
    shape = _shape(d)
    idx = file_split_indices(items, d)
    sub = {k: ([items.paths[i] for i in v], items.targets[torch.as_tensor(v, dtype=torch.int64)])
           for k, v in idx.items()}
    if stats is None and d.normalize == "imagenet":
        stats = imagenet_stats(shape.channels)
    elif stats is None:
        # Stats from a fixed sample of training images: enough for a mean and std, cheap on big folders.
        pick = stats_sample([items.ids[i] for i in idx["train"]], d.seed)
        raw = ImageFileDataset([sub["train"][0][i] for i in pick], sub["train"][1][torch.as_tensor(pick)],
                               shape.image_size, shape.channels, None, shape.preset)
        stats = compute_stats(torch.stack([raw[i][0] for i in range(len(raw))]))
    transform = _train_transform(d, shape.image_size) if train_augment else None
    ds = {k: ImageFileDataset(p, y, shape.image_size, shape.channels, stats, shape.preset,
                              transform if k == "train" else None)
          for k, (p, y) in sub.items()}
    return Splits(ds["train"], ds["val"], ds["test"], items.concepts, multilabel, stats, shape.channels,
                  shape.image_size, shape.preset, items.report)


def build_splits(d: DataConfig, train_augment: bool = True, stats: NormStats | None = None) -> Splits:
    """Build the splits named by a :class:`deepindex.config.DataConfig`, with its label noise,
    label filter and CV fold applied (:mod:`deepindex.data.label_view`).

    ``train_augment=False`` leaves ``data.augment`` out (scoring a checkpoint on its train split);
    ``stats`` normalises with a model's own stats instead of the data's (scoring a checkpoint on
    another config's images).
    """
    from deepindex.data.inspect import resolve_data
    from deepindex.data.label_view import apply_label_view

    d, notes = resolve_data(d)
    if notes:  # a direct caller (tests, benchmarks); training resolves on the driver first
        log.info("data: inferred %s", "; ".join(notes))
    return apply_label_view(_dataset_splits(d, train_augment, stats), d)


def _dataset_splits(d: DataConfig, train_augment: bool, stats: NormStats | None) -> Splits:
    if d.dataset in ("digit-scenes", "digits"):
        multilabel = d.dataset == "digit-scenes"
        if d.channels != 1:
            raise ValueError("data.channels: digit datasets are grayscale (1 channel)")
        image_size = _shape(d).image_size
        sizes = {"train": d.train_size, "val": d.val_size, "test": d.test_size}
        parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for split, n in sizes.items():
            s = make_scenes(split, n, image_size=image_size, max_digits=d.max_digits, multilabel=multilabel,
                            seed=d.seed)
            parts[split] = (s.images, s.targets)
            concepts = s.concepts
        return _tensor_splits(parts, concepts, multilabel, image_size, d, train_augment, stats)
    if d.dataset == "image-folder":
        if not d.root:
            raise ValueError("data.root: required for an image folder")
        return _file_splits(read_image_folder(d.root), d, False, train_augment, stats)
    if d.dataset == "manifest":
        if not d.root:
            raise ValueError("data.root: a manifest needs data.root (its paths are relative to it)")
        # data.manifest and data.concepts are optional: a flat folder with a sidecar tags file.
        items = read_collection(d.root, d.manifest, d.concepts, unknown_tags=d.unknown_tags)
        return _file_splits(items, d, True, train_augment, stats)
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
        return _tensor_splits(parts, classes, False, 32, d, train_augment, stats)
    raise ValueError(f"data.dataset: unknown dataset {d.dataset!r}")
