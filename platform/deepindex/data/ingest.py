"""Data in, the Ray way: a file collection read by Ray Train's workers through Ray Data.

``data.pipeline`` (``auto`` = ``ray`` for image folders and manifests) decides how training reads a
file collection.  With ``ray``, :func:`prepare_ingest` runs on the driver before the workers start:

1. :func:`deepindex.data.cache.prepare_cache` finds or writes the decoded uint8 shards and their
   normalisation stats under ``<data.cache_dir>/<key>`` (default ``<ray.storage_path>/data_cache``; decoded
   once per key);
2. the label view (``data.label_noise``, ``data.label_filter``, ``data.cv_folds``/``cv_fold``) is
   applied to the cached labels by :func:`deepindex.data.label_view.apply_label_view`, the function
   the local path uses, on a stand-in dataset that holds only labels and paths (no pixels);
3. the Ray datasets: ``train`` reads the cached train shards in a per-epoch random block order
   (seeded by ``train.seed``), keeps the items the view keeps and attaches the view's labels;
   ``val`` the same, without shuffling.  ``train`` is split across the workers
   (``streaming_split``, equal row counts: every DDP rank takes the same number of steps); ``val`` is
   read by every worker, each scoring its strided part (:mod:`deepindex.train.feeds`).

The workers get their shards with ``ray.train.get_dataset_shard``; augmentation and normalisation
happen there, on uint8 batches (:class:`deepindex.train.feeds.RayDataFeed`).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from deepindex.config import FILE_DATASETS
from deepindex.data.cache import BLOCK_BYTES, SPLITS, DecodedCache, cache_root, prepare_cache
from deepindex.data.transforms import NormStats, imagenet_stats, normalize

if TYPE_CHECKING:
    import ray.data
    import ray.train

    from deepindex.config import Config, DataConfig

log = logging.getLogger(__name__)

# A collection whose train + val pixels fit in this fraction of the cluster's object store is held
# there for the run instead of streamed from the cache every epoch.
HOLD_FRACTION = 0.25


def pipeline_for(cfg: Config, storage: str) -> str:
    """``"ray"`` or ``"local"``: how training reads ``cfg``'s data (``data.pipeline`` resolved)."""
    d = cfg.data
    if d.pipeline == "local" or d.dataset not in FILE_DATASETS:
        return "local"
    root = cache_root(d, storage)
    if "://" in root:  # the cache is written atomically with renames and locks: a filesystem path
        log.warning("data: data.pipeline=%s falls back to local: the decode cache needs a filesystem "
                    "ray.storage_path (or data.cache_dir), not %s", d.pipeline, root)
        return "local"
    return "ray"


class CachedSplit(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A cached split held as uint8 and normalised item by item: (x (C, S, S), target)."""

    def __init__(self, images: np.ndarray, targets: torch.Tensor, stats: NormStats) -> None:
        self.images, self.targets, self.stats = images, targets, stats  # (N, C, S, S) uint8, (N, ...)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(torch.from_numpy(self.images[i]).float().div_(255.0), self.stats), self.targets[i]


def cached_split(cfg: Config, storage: str, split: str, stats: NormStats) -> tuple[CachedSplit, list[str]] | None:
    """``split`` of ``cfg``'s data (label view applied) from the decode cache that training wrote, normalised
    with ``stats`` (a checkpoint's); None where training read locally or the cache is gone.  Scoring a
    checkpoint this way decodes no image and reads none of the collection's files."""
    from deepindex.data.cache import find_cache, read_images

    if cfg.data.pipeline == "local" or cfg.data.dataset not in FILE_DATASETS or "://" in cache_root(cfg.data, storage):
        return None
    cache = find_cache(cfg.data, storage)
    if cache is None:
        return None
    keep, labels = labelled_splits(cfg, cache)
    index, images = read_images(cache.split_dir(split))
    if not np.array_equal(index, np.arange(cache.counts[split])):
        raise RuntimeError(f"data: the decode cache {cache.path} is missing {split} items")
    rows = keep if split == "train" else index
    return CachedSplit(images[rows], labels[split][torch.tensor(rows, dtype=torch.int64)], stats), cache.concepts


class LabelsOnly(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A cached split as the label view sees it: its targets and image paths, no pixels."""

    def __init__(self, targets: torch.Tensor, paths: list[Path]) -> None:
        self.targets, self.paths = targets, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("data: a cached split's pixels are read through Ray Data, not item by item")


def _rows(ds: Dataset[Any]) -> tuple[np.ndarray, torch.Tensor]:
    """(the cached split's indices ``ds`` holds, the labels of the whole cached split by index)."""
    if isinstance(ds, Subset):
        inner, labels = _rows(ds.dataset)
        return inner[np.asarray(ds.indices, dtype=np.int64)], labels
    if isinstance(ds, LabelsOnly):
        return np.arange(len(ds), dtype=np.int64), ds.targets
    raise TypeError(f"data: the label view returned a {type(ds).__name__}, not a relabelled cached split")


def _attach_labels(batch: dict[str, np.ndarray], labels: np.ndarray, keep: np.ndarray | None
                   ) -> dict[str, np.ndarray]:
    """Ray Data map_batches: keep the items the label view keeps, attach the labels it gives them."""
    if keep is not None:
        m = keep[batch["index"]]
        batch = {k: v[m] for k, v in batch.items()}
    return {"index": batch["index"], "image": batch["image"], "label": labels[batch["index"]]}


def _held(cache: DecodedCache, split: str, labels: np.ndarray, keep: np.ndarray | None,
          rows_per_block: int) -> ray.data.Dataset:
    """A cached split read here (no tasks: seconds saved per run on a small cluster), relabelled,
    in blocks of ``rows_per_block`` rows put in the object store."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    from deepindex.data.cache import read_table

    table = read_table(cache.split_dir(split))  # index, image; sorted by index
    if keep is not None:
        table = table.filter(pa.array(keep[table.column("index").to_numpy()]))
    y = labels[table.column("index").to_numpy()]
    table = table.append_column("label", ArrowTensorArray.from_numpy(y) if y.ndim > 1 else pa.array(y))
    return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)])


@dataclass
class RayIngest:
    """What :func:`prepare_ingest` hands to ``TorchTrainer``: datasets, their split, the workers' plan."""

    cache: DecodedCache
    datasets: dict[str, ray.data.Dataset]
    data_config: ray.train.DataConfig
    plan: dict[str, Any]  # JSON-able: concepts, stats, shapes, row counts (train_loop_config["ray_data"])


def listed_train_rows(d: DataConfig) -> int:
    """How many train items the local path (``data.pipeline=local``) trains a file collection on:
    its listing's train split under the label view, as each worker builds it (duplicates merged,
    noise, filter and fold applied), counted on the driver.  No image is decoded, but every file is
    read once to find the duplicates, as each worker's listing reads it."""
    from deepindex.data import Splits, split_len
    from deepindex.data.files import read_collection, read_image_folder
    from deepindex.data.label_view import apply_label_view
    from deepindex.data.splits import file_split_indices

    if d.dataset not in FILE_DATASETS or not d.root:
        raise ValueError(f"data.dataset: {d.dataset!r} is not a file collection")
    if d.dataset == "image-folder":
        items = read_image_folder(d.root)
    else:
        items = read_collection(d.root, d.manifest, d.concepts, unknown_tags=d.unknown_tags, check_images=False)
    idx = file_split_indices(items, d)
    parts = [LabelsOnly(items.targets[torch.as_tensor(idx[s], dtype=torch.int64)], [items.paths[i] for i in idx[s]])
             for s in SPLITS]
    channels = d.channels or 3  # the shape and stats are placeholders: the label view reads targets and paths
    splits = Splits(parts[0], parts[1], parts[2], items.concepts, d.dataset == "manifest",
                    imagenet_stats(channels), channels, d.image_size or 0)
    return split_len(apply_label_view(splits, d).train)


def labelled_splits(cfg: Config, cache: DecodedCache) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """The label view of ``cfg`` on the cached labels: (train indices kept, {split: labels by index})."""
    from deepindex.data import Splits
    from deepindex.data.label_view import apply_label_view

    labels, paths = cache.labels(), cache.paths()
    parts = [LabelsOnly(torch.from_numpy(labels[s]), paths[s]) for s in SPLITS]
    splits = Splits(parts[0], parts[1], parts[2], cache.concepts, cache.multilabel, cache.stats, cache.channels,
                    cache.image_size, cache.preset, None)
    splits = apply_label_view(splits, cfg.data)
    keep, train_y = _rows(splits.train)
    _, val_y = _rows(splits.val)
    _, test_y = _rows(splits.test)
    return keep, {"train": train_y, "val": val_y, "test": test_y}


def prepare_ingest(cfg: Config, storage: str) -> RayIngest:
    """Decode once (or find the cache), apply the label view, build the Ray datasets (on the driver)."""
    import ray.data
    import ray.train

    from deepindex.console import announce

    cache = prepare_cache(cfg.data, storage)
    n = sum(cache.counts.values())
    if cache.hit:
        announce(False, "data: cache hit %s (%d items)", cache.path, n)
    else:
        announce(True, "data: decoded %d images in %.1f s into %s", n, cache.seconds, cache.path)
    if cache.report:  # what the import found (unknown tags, duplicates, the split column)
        announce(False, "data: %s", cache.report)
    keep, labels = labelled_splits(cfg, cache)
    n_train = cache.counts["train"]
    mask = None
    if len(keep) < n_train:
        mask = np.zeros(n_train, dtype=bool)
        mask[keep] = True
    image_bytes = cache.channels * cache.image_size ** 2
    # Blocks are what streaming_split deals out to the workers and what randomize_block_order shuffles
    # every epoch: at least 4 per worker, at most about BLOCK_BYTES each.
    rows_per_block = max(1, min(BLOCK_BYTES // image_bytes, math.ceil(len(keep) / (4 * cfg.ray.num_workers))))
    # A collection that fits in HOLD_FRACTION of the object store is read from the cache here, once per
    # run, and held in the object store; a bigger one streams from the cache (read tasks) every epoch.
    budget = ray.cluster_resources().get("object_store_memory", 0.0) * HOLD_FRACTION
    hold = (len(keep) + cache.counts["val"]) * image_bytes <= budget
    datasets: dict[str, ray.data.Dataset] = {}
    for split, kept in (("train", mask), ("val", None)):
        y = labels[split].numpy()
        if hold:
            datasets[split] = _held(cache, split, y, kept, rows_per_block)
        else:
            # The label arrays travel with the map function: Ray Data puts it in the object store once.
            datasets[split] = ray.data.read_parquet(str(cache.split_dir(split))).map_batches(
                functools.partial(_attach_labels, labels=y, keep=kept), batch_size=None, batch_format="numpy",
            ).repartition(target_num_rows_per_block=rows_per_block)
    # A new block order every epoch, reproducible from train.seed (rows are shuffled in the workers).
    seed = ray.data.RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
    datasets["train"] = datasets["train"].randomize_block_order(seed=seed)
    stats = imagenet_stats(cache.channels) if cfg.data.normalize == "imagenet" else cache.stats
    plan = {"cache": str(cache.path), "concepts": cache.concepts, "multilabel": cache.multilabel,
            "stats": stats.to_dict(), "channels": cache.channels, "image_size": cache.image_size,
            "preset": cache.preset, "train_rows": len(keep), "val_rows": cache.counts["val"],
            "report": cache.report, "held_in_object_store": hold}
    # Only train is split: validation is read whole by every worker, which scores its strided part
    # (equal=True splitting would drop up to world-1 validation items; every item is scored).
    return RayIngest(cache, datasets, ray.train.DataConfig(datasets_to_split=["train"]), plan)
