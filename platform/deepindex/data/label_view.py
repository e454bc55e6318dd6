"""The labels training sees: clean -> ``data.label_noise`` -> ``data.label_filter`` -> CV fold.

:func:`apply_label_view` runs at the end of :func:`deepindex.data.build_splits`, so every
step (Ray Train workers, evaluation, the audit) gets the same labels for the same config:

1. noise (train and val; test stays clean), see :mod:`deepindex.data.noise`;
2. an audit's suspects (train only): ``flip`` replaces each suspect (item, concept) label by
   its opposite (a wrong tag removed, a missing tag added): the cleaned label view (exclusive
   classes: the item takes the class its suspect pairs name, the given one removed and the
   suggested one added; one left with no class or two is left out); ``drop`` leaves out every
   item with a suspect label;
3. ``data.cv_folds`` / ``data.cv_fold``: train on every fold but one (the audit).

The :class:`LabelView` attached to the splits keeps what a step may need afterwards: the
clean labels and the mask of pairs the noise flipped (to score an audit), the full train
split with its given labels (to predict a held-out fold), and stable item ids.

An audit report is a folder holding ``suspects.csv`` (one row per suspect label) and
``audit.json`` (what data it was made from); a filter made for other data is refused.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

if TYPE_CHECKING:
    from deepindex.config import DataConfig
    from deepindex.data import Splits

log = logging.getLogger(__name__)

SUSPECTS_FILE = "suspects.csv"
AUDIT_FILE = "audit.json"
# suspects.csv columns; the filter reads index, item, concept (and checks item against index).
SUSPECT_COLUMNS = ["rank", "index", "item", "concept", "issue", "given", "pred_prob", "quality"]
# Data config keys that do not change which items and noisy labels the train split holds.
# normalize and preset: how pixels reach the model, which a pretrained backbone's defaults change after the
# audit's fingerprint was taken (found on review: every filtered run of a pretrained model was refused).
_NOT_FINGERPRINT = {"label_filter", "label_filter_mode", "cv_folds", "cv_fold", "num_workers", "augment",
                    "augment_strength", "pipeline", "cache_dir", "normalize", "preset"}


@dataclass
class LabelView:
    """What :func:`apply_label_view` did; the splits' ``view``."""

    full_train: Dataset  # every train item with the labels training sees (noise + filter)
    given: torch.Tensor  # (N, K) train labels after noise, before the filter: what an audit audits
    clean: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> labels before noise
    flipped: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> (N, K) bool, noise
    filtered: torch.Tensor | None = None  # (N, K) bool: pairs the label filter flipped or dropped
    train_index: np.ndarray | None = None  # full-train indices in ``splits.train`` (None: all)
    holdout_index: np.ndarray | None = None  # the CV fold left out
    ids: list[str] = field(default_factory=list)  # full-train item ids


def fingerprint(d: DataConfig) -> dict[str, Any]:
    """The data config keys that decide which train items and given labels an audit saw (with the
    keys inferred from the data resolved: an unset ``data.channels`` and its inferred value agree)."""
    from deepindex.config import FILE_DATASETS
    from deepindex.data.inspect import resolve_data

    d, _ = resolve_data(d)
    skip = set(_NOT_FINGERPRINT)
    if d.dataset in FILE_DATASETS:
        # Files are their items whatever size or channels they are read at (the filter checks every id
        # too): the README's transfer recipe (data.preset=photo: 224 px) was refused for an audit at 48 px.
        # A generated dataset draws its items at its size, so there both still count.
        skip |= {"image_size", "channels"}
    return {k: v for k, v in d.model_dump(mode="json").items() if k not in skip}


def targets_of(ds: Dataset) -> torch.Tensor:
    from deepindex.data.augment import AugmentedTensorDataset

    if isinstance(ds, AugmentedTensorDataset):
        return targets_of(ds.base)
    if isinstance(ds, TensorDataset):
        return ds.tensors[1]
    if hasattr(ds, "targets"):
        return ds.targets
    raise TypeError(f"data: cannot relabel a {type(ds).__name__}")


def with_targets(ds: Dataset, y: torch.Tensor) -> Dataset:
    from deepindex.data.augment import AugmentedTensorDataset

    if isinstance(ds, AugmentedTensorDataset):  # relabel what it augments
        aug = copy.copy(ds)
        aug.base = with_targets(ds.base, y)
        return aug
    if isinstance(ds, TensorDataset):
        return TensorDataset(ds.tensors[0], y)
    new = copy.copy(ds)  # file datasets read images lazily: a shallow copy shares the paths
    if not hasattr(new, "targets"):
        raise TypeError(f"data: cannot relabel a {type(ds).__name__}")
    new.targets = y
    return new


def item_ids(ds: Dataset, split: str, root: str | None = None) -> list[str]:
    """Stable ids: a file's path relative to ``root`` (manifests, image folders), else ``split/<index>``."""
    paths = getattr(ds, "paths", None)
    if paths is not None:
        return [_relative(str(p), root) if root else str(p) for p in paths]
    return [f"{split}/{i}" for i in range(len(targets_of(ds)))]


def _relative(path: str, root: str) -> str:
    """``path`` relative to ``root``.  A manifest's paths are resolved (symlinks followed): with a root reached
    through a link they are relative to the resolved root, not to ``../../real/photos/5.png``, which the
    audit's ``cleaned_manifest.jsonl`` then had refused as escaping the root (found on review)."""
    rel = os.path.relpath(path, root)
    if rel.startswith(".." + os.sep) or rel == "..":
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    return rel


def apply_label_view(splits: Splits, d: DataConfig) -> Splits:
    """Apply noise, filter and fold of the DataConfig ``d`` to ``splits`` (in place); returns it."""
    train_y = targets_of(splits.train)
    view = LabelView(full_train=splits.train, given=train_y)
    k = len(splits.concepts)
    if d.label_noise > 0:
        from deepindex.data.noise import corrupt

        for split in ("train", "val"):
            ds = getattr(splits, split)
            noisy = corrupt(targets_of(ds), d.label_noise, d.label_noise_seed, split, num_classes=k)
            view.clean[split], view.flipped[split] = noisy.clean, noisy.flipped
            setattr(splits, split, with_targets(ds, noisy.noisy))
        log.info("label noise %.2f: %d train and %d val items carry a wrong tag set", d.label_noise,
                 int(view.flipped["train"].any(1).sum()), int(view.flipped["val"].any(1).sum()))
    view.given = targets_of(splits.train)
    view.ids = item_ids(splits.train, "train", d.root if d.dataset in ("manifest", "image-folder") else None)
    keep = np.arange(len(view.given))
    if d.label_filter:
        from deepindex.data.noise import multi_hot

        given = multi_hot(view.given, k)
        pairs = read_filter(d, view.ids, splits.concepts, given)
        mask = torch.zeros_like(given)
        if len(pairs):
            mask[pairs[:, 0], pairs[:, 1]] = True
        view.filtered = mask
        if d.label_filter_mode == "drop":
            keep = np.flatnonzero(~mask.any(1).numpy())
        elif view.given.ndim == 2:
            splits.train = with_targets(splits.train, torch.where(mask, 1.0 - view.given, view.given))
        else:  # exclusive classes: the flipped pairs name the class instead; an item left with none or two is left out
            flipped = given ^ mask
            one = flipped.sum(1) == 1
            splits.train = with_targets(splits.train, torch.where(one, flipped.float().argmax(1), view.given.long()))
            keep = np.flatnonzero(one.numpy())
        log.info("label filter %s: %d suspect labels on %d items (%s)", d.label_filter, int(mask.sum()),
                 int(mask.any(1).sum()), d.label_filter_mode)
    view.full_train = splits.train
    if d.cv_folds:
        from deepindex.data.folds import fold_split

        trained, held = fold_split(len(view.given), d.cv_folds, d.cv_fold, d.seed)
        keep, view.holdout_index = np.intersect1d(keep, trained), held
    if len(keep) < len(view.given):
        if not len(keep):
            raise ValueError("data.label_filter: no train item is left")
        view.train_index = keep
        splits.train = Subset(view.full_train, keep.tolist())
    splits.view = view
    return splits


# ---- reading an audit's suspects ----------------------------------------------------------
def resolve_report(spec: str) -> Path:
    """The audit folder named by ``data.label_filter``: a folder, its suspects.csv, or
    ``runs:/<MLflow run id>`` (the run's ``audit/`` artifacts, downloaded once per machine)."""
    if spec.startswith("runs:/"):
        return _download_run_report(spec)
    p = Path(spec).expanduser()
    if p.is_file() and p.name == SUSPECTS_FILE:
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"data.label_filter: no audit report at {spec} (a folder with {SUSPECTS_FILE})")
    for name in (SUSPECTS_FILE, AUDIT_FILE):
        if not (p / name).is_file():
            raise FileNotFoundError(f"data.label_filter: {p} holds no {name}: not an audit report")
    return p


def _download_run_report(spec: str) -> Path:
    from deepindex.tracking.audit import download_report

    run_id = spec[len("runs:/"):].strip("/").split("/")[0]
    if not run_id:
        raise ValueError(f"data.label_filter: {spec} names no run (runs:/<audit run id>)")
    try:
        return download_report(run_id)
    except ValueError as e:  # no server, no such run, no report: the user's filter is what is wrong
        raise ValueError(f"data.label_filter: {e}") from None


def check_label_filter(d: DataConfig) -> Path | None:
    """The report folder of ``d.label_filter`` once it is known to fit ``d`` (a cheap check a
    driver runs before starting Ray; workers check again with the items); None without a filter."""
    if not d.label_filter:
        return None
    folder = resolve_report(d.label_filter)
    try:
        meta = json.loads((folder / AUDIT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"data.label_filter: {folder / AUDIT_FILE} is not readable JSON "
                         f"({type(e).__name__})") from None
    made_for, here = (meta.get("data") if isinstance(meta, dict) else None) or {}, fingerprint(d)
    for key in sorted(here):
        if made_for.get(key) != here[key]:
            raise ValueError(f"data.label_filter: the audit {folder} was made for data.{key}={made_for.get(key)!r}; "
                             f"this config has data.{key}={here[key]!r}")
    return folder


def read_filter(d: DataConfig, ids: list[str], concepts: list[str], given: torch.Tensor | None = None) -> np.ndarray:
    """(M, 2) int array of (train index, concept index) suspect pairs, checked against the data.

    ``given`` (N, K) 0/1, the train labels now: a pair whose label is no longer the one the audit
    flagged (its ``given`` column; a tag fixed by hand since) is refused, naming its line.  A flip
    would otherwise toggle the fixed label back to the wrong one."""
    folder = check_label_filter(d)
    if folder is None:  # no filter: no suspects
        return np.zeros((0, 2), dtype=np.int64)
    index = {c: i for i, c in enumerate(concepts)}
    pairs = []
    path = folder / SUSPECTS_FILE
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"index", "item", "concept"} <= set(reader.fieldnames):
            raise ValueError(f"data.label_filter: {path}:1: the header must name index, item and concept")
        for row in reader:
            n = reader.line_num
            try:
                i = int(row["index"])
            except (TypeError, ValueError):
                raise ValueError(f"data.label_filter: {path}:{n}: index {row['index']!r} is not an integer") from None
            if not 0 <= i < len(ids) or ids[i] != row["item"]:
                raise ValueError(f"data.label_filter: {path}:{n}: item {row['item']!r} is not train item {i}")
            if row["concept"] not in index:
                raise ValueError(f"data.label_filter: {path}:{n}: unknown concept {row['concept']!r}")
            k = index[row["concept"]]
            seen = row.get("given")
            if given is not None and seen not in (None, "") and str(int(given[i, k])) != seen.strip():
                raise ValueError(f"data.label_filter: {path}:{n}: item {row['item']!r} has concept {row['concept']!r} "
                                 f"{'tagged' if given[i, k] else 'untagged'} now, the audit saw it "
                                 f"{'untagged' if given[i, k] else 'tagged'}: the labels changed since the audit; "
                                 f"audit them again")
            pairs.append((i, k))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)
