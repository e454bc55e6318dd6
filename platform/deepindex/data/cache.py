"""A file collection decoded once: uint8 shards under the storage path, keyed by the data config.

:func:`prepare_cache` is what ``data.pipeline=ray`` runs on the driver before Ray Train starts its
workers.  It decodes every image of an image folder or a manifest through the eval preset
(:func:`deepindex.data.transforms.decode_file`, the same pixels serving sees) with Ray Data, in
parallel across the cluster, and writes::

    <data.cache_dir, default <ray.storage_path>/data_cache>/<key>/
        split=train/*.parquet  split=val/  split=test/   columns index (int64), image (uint8 C x S x S)
        labels.npz        the targets of each split, by index (the label view relabels from these)
        items.json        the image path of each split's items, by index (item ids, label filters)
        cache.json        what it holds: concepts, counts, normalisation stats, the import report; written last

``<key>`` hashes what decides the pixels, the items, their labels and the splits: the data keys
in :data:`KEY_FIELDS` (resolved: the inferred channels and size count), the manifest's and the
concept list's bytes, every image's path, size and modification time, and the decoder's version.
Augmentation, normalisation, label noise, label filters and CV folds are applied later to what
the cache holds, so a sweep over them decodes once.  The folder is written atomically
(:func:`deepindex.atomic.swap_dir`) under an exclusive lock: trials that start together decode
once, the others wait and read it; a killed writer leaves no half cache.  Nothing evicts old keys:
delete ``data_cache/`` (or one key) to reclaim the space.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL

from deepindex.data.transforms import NormStats, decode_file

if TYPE_CHECKING:
    from deepindex.config import Config, DataConfig
    from deepindex.data.files import FileItems

log = logging.getLogger(__name__)

CACHE_DIR = "data_cache"
COMPLETE = "cache.json"
LABELS = "labels.npz"
ITEMS = "items.json"
SPLITS = ("train", "val", "test")
# Bump when what a key's folder holds changes (columns, decode, the split draw); old folders are then never read.
# 2: items dealt to splits by id (data.splits.file_split_indices), no longer by position.
# 3: an image folder's duplicate images kept once; RGB and grey images' transparency keys composited on white.
# 4: the stats of a split column's train split from items drawn by id, no longer its first rows.
FORMAT = 4
# The data keys that decide the pixels, the items, their labels and the splits.
KEY_FIELDS = ("dataset", "root", "manifest", "concepts", "image_size", "channels", "preset", "unknown_tags",
              "val_fraction", "test_fraction", "seed")
# Normalisation stats come from this many training items (data.splits.stats_sample), as the local path's
# do, so both pipelines give a model the same inputs.
STATS_SAMPLE = 2000
BLOCK_BYTES = 16 << 20  # a parquet file (and a Ray Data block read from it) holds at most about this many pixel bytes
_DECODE_BATCH = 32


@dataclasses.dataclass(frozen=True)
class DecodedCache:
    """One complete cache folder, as :func:`prepare_cache` found or wrote it."""

    path: Path
    concepts: list[str]
    multilabel: bool
    counts: dict[str, int]  # items per split
    stats: NormStats  # per-channel mean/std of the train split (data.normalize=dataset)
    channels: int
    image_size: int
    preset: str
    report: str | None  # the import report's summary line (unknown tags, duplicates)
    hit: bool  # read as it was (False: decoded just now)
    seconds: float  # decoding time (a miss) or time to find it (a hit)

    def split_dir(self, split: str) -> Path:
        return self.path / f"split={split}"

    def labels(self) -> dict[str, np.ndarray]:
        """Each split's targets by index: (N, K) float32 multi-hot or (N,) int64 class ids."""
        with np.load(self.path / LABELS) as z:
            return {s: z[s] for s in SPLITS}

    def paths(self) -> dict[str, list[Path]]:
        """Each split's image paths by index (what the local path's datasets hold)."""
        raw = json.loads((self.path / ITEMS).read_text())
        return {s: [Path(p) for p in raw[s]] for s in SPLITS}


def _shape(d: DataConfig) -> tuple[int, int, str]:
    if d.channels is None or d.image_size is None or d.preset is None:
        raise ValueError("data: channels, image_size and preset are unresolved "
                         "(deepindex.data.inspect.resolve_data fills them in)")
    return d.channels, d.image_size, d.preset


def _sources(d: DataConfig) -> tuple[list[Path], list[Path]]:
    """(every image file the collection names, the text files it is described by), parsing only."""
    from deepindex.data.files import CONCEPTS_NAME, find_sidecar, read_collection, read_image_folder

    if not d.root:
        raise ValueError(f"data.root: required for {d.dataset}")
    root = Path(d.root)
    if d.dataset == "image-folder":  # a listing for training: one class folder refused, as training reads it
        return read_image_folder(root, dedupe=False, min_classes=2).paths, []
    manifest = Path(d.manifest) if d.manifest else find_sidecar(root)
    concepts = Path(d.concepts) if d.concepts else root / CONCEPTS_NAME
    items = read_collection(root, manifest, d.concepts, unknown_tags=d.unknown_tags, check_images=False,
                            dedupe=False)
    return items.paths, [manifest] + ([concepts] if concepts.is_file() else [])


def cache_key(d: DataConfig) -> str:
    """The cache key of a resolved file-collection config (see the module docstring)."""
    _shape(d)
    images, texts = _sources(d)
    material: dict[str, Any] = {k: getattr(d, k) for k in KEY_FIELDS}
    for k in ("root", "manifest", "concepts"):  # the same folder named from another working directory
        if material[k]:
            material[k] = str(Path(material[k]).resolve())
    material.update(format=FORMAT, pillow=PIL.__version__)
    h = hashlib.sha256(json.dumps(material, sort_keys=True).encode())
    for t in texts:
        h.update(f"\n{t.resolve()}\n".encode())
        h.update(t.read_bytes())
    for p in images:  # size + mtime: an image edited in place is a new cache, without reading any image
        st = p.stat()
        h.update(f"\n{p}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def cache_root(d: DataConfig, storage: str | Path) -> str:
    """The folder of ``d``'s decoded collections: ``data.cache_dir``, else ``<storage>/data_cache`` (a
    relative folder is the driver's: resolved, as the Ray Data tasks that read it run elsewhere)."""
    if d.cache_dir:
        return d.cache_dir if "://" in d.cache_dir else str(Path(d.cache_dir).expanduser().resolve())
    s = str(storage)
    return f"{s.rstrip('/')}/{CACHE_DIR}" if "://" in s else str(Path(s) / CACHE_DIR)


def share_cache(cfg: Config, storage: str) -> Config:
    """``cfg`` with ``data.cache_dir`` pinned to ``storage``'s cache: what a sweep or an audit hands its
    trials, whose runs each have a storage path of their own below it (an explicit one is kept; a dataset
    held in memory has no cache)."""
    from deepindex.config import FILE_DATASETS

    if cfg.data.cache_dir or cfg.data.dataset not in FILE_DATASETS:
        return cfg
    return cfg.override({"data.cache_dir": cache_root(cfg.data, storage)})


def cache_path(d: DataConfig, storage: str | Path) -> Path:
    return Path(cache_root(d, storage)) / cache_key(d)


def _load(path: Path, seconds: float) -> DecodedCache | None:
    try:
        meta = json.loads((path / COMPLETE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    if meta.get("format") != FORMAT:
        return None
    return DecodedCache(path, list(meta["concepts"]), bool(meta["multilabel"]), dict(meta["counts"]),
                        NormStats.from_dict(meta["stats"]), int(meta["channels"]), int(meta["image_size"]),
                        str(meta["preset"]), meta.get("report"), hit=True, seconds=seconds)


def find_cache(d: DataConfig, storage: str | Path) -> DecodedCache | None:
    """The complete cache of ``d`` under ``storage`` if there is one (nothing is decoded)."""
    return _load(cache_path(d, storage), 0.0)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold ``lock`` (flock: released by the kernel however the holder dies)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def prepare_cache(d: DataConfig, storage: str | Path) -> DecodedCache:
    """The decoded cache of ``d`` under ``storage`` (a filesystem path): found, or decoded now with Ray
    Data (on the connected Ray cluster).  Another process decoding the same key is waited for."""
    start = time.perf_counter()
    target = cache_path(d, storage)
    found = _load(target, time.perf_counter() - start)
    if found is not None:
        return found
    with _exclusive(target.parent / f".{target.name}.lock"):
        found = _load(target, time.perf_counter() - start)  # decoded by another trial while we waited
        if found is not None:
            return found
        return _decode(d, target)


def _read_items(d: DataConfig) -> FileItems:
    """The collection's items, exactly as the local path reads them (same order, same labels)."""
    from deepindex.data.files import read_collection, read_image_folder

    if not d.root:
        raise ValueError(f"data.root: required for {d.dataset}")
    if d.dataset == "image-folder":  # every image decoded whole here: one that does not is named, before Ray Data
        return read_image_folder(d.root)
    return read_collection(d.root, d.manifest, d.concepts, unknown_tags=d.unknown_tags)


def _decode_batch(batch: dict[str, np.ndarray], image_size: int, channels: int, preset: str
                  ) -> dict[str, np.ndarray]:
    """Ray Data map_batches: {split, index, path} -> {split, index, image (B, C, S, S) uint8}."""
    images = [decode_file(str(p), image_size, channels, preset) for p in batch["path"]]
    return {"split": batch["split"], "index": batch["index"].astype(np.int64), "image": np.stack(images)}


def _decode_all(split_paths: dict[str, list[Path]], out: Path, shape: tuple[int, int, str]) -> None:
    """Decode every split in one Ray Data run (tasks across the cluster) into ``out/split=<name>/``."""
    import ray.data

    channels, image_size, preset = shape
    rows = [{"split": s, "index": i, "path": str(p)} for s in SPLITS for i, p in enumerate(split_paths[s])]
    # Files of at most about BLOCK_BYTES of pixels; at least two decode tasks per CPU of the cluster.
    per_file = max(16, BLOCK_BYTES // (channels * image_size * image_size))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = max(math.ceil(len(rows) / per_file), min(math.ceil(len(rows) / _DECODE_BATCH), 2 * cpus))
    decode = functools.partial(_decode_batch, image_size=image_size, channels=channels, preset=preset)
    ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        decode, batch_size=_DECODE_BATCH, batch_format="numpy", num_cpus=1,
    ).write_parquet(str(out), partition_cols=["split"], max_rows_per_file=per_file)
    for s in SPLITS:  # a split no block held (never: each has at least one item) would have no folder
        (out / f"split={s}").mkdir(exist_ok=True)


def read_table(split_dir: Path, below: int | None = None, only: Sequence[int] | None = None) -> Any:
    """A cached split as a pyarrow table (index, image), sorted by index, read here (no Ray tasks);
    ``below``: only the items whose index is below it; ``only``: only those indices."""
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401 - registers Ray's tensor extension type, which the image column has

    filters: list[tuple[str, str, Any]] = []
    if below is not None:
        filters.append(("index", "<", below))
    if only is not None:
        filters.append(("index", "in", [int(i) for i in only]))
    table = pq.read_table(split_dir, columns=["index", "image"], filters=filters or None)
    return table.sort_by("index")


def read_images(split_dir: Path, below: int | None = None, only: Sequence[int] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(index (N,), image (N, C, S, S) uint8) of a cached split (see :func:`read_table`)."""
    table = read_table(split_dir, below, only)
    chunks = [c.to_numpy() for c in table.column("image").chunks]
    return table.column("index").to_numpy(), np.concatenate(chunks) if chunks else np.zeros((0,), dtype=np.uint8)


def _train_stats(train_dir: Path, train_ids: Sequence[str], seed: int) -> NormStats:
    """Per-channel mean/std of the training items the local path takes them from (``splits.stats_sample``)."""
    from deepindex.data.splits import stats_sample

    pick = stats_sample(train_ids, seed, STATS_SAMPLE)
    every = len(pick) == len(train_ids)
    _, u8 = read_images(train_dir, only=None if every else np.sort(pick).tolist())  # (N, C, S, S)
    c = u8.shape[1]
    s1, s2, n = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(u8), 64):  # float64 sums a chunk at a time: 2000 photos as float64 would be GBs
        unit = (u8[i : i + 64].astype(np.float32) / np.float32(255.0)).astype(np.float64)  # compute_stats' pixels
        per_channel = unit.transpose(1, 0, 2, 3).reshape(c, -1)  # (C, b*S*S)
        s1, s2, n = s1 + per_channel.sum(1), s2 + (per_channel * per_channel).sum(1), n + per_channel.shape[1]
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 - n * mean * mean, 0.0) / max(n - 1, 1)).clip(min=1e-6)  # unbiased, as torch's
    return NormStats(tuple(float(v) for v in mean), tuple(float(v) for v in std))


def _decode(d: DataConfig, target: Path) -> DecodedCache:
    from deepindex.atomic import swap_dir
    from deepindex.data.splits import file_split_indices

    start = time.perf_counter()
    shape = _shape(d)
    items = _read_items(d)
    idx = file_split_indices(items, d)  # the local path's draw
    split_paths = {s: [items.paths[i] for i in idx[s]] for s in SPLITS}
    labels = {s: items.targets[np.asarray(idx[s], dtype=np.int64)].numpy() for s in SPLITS}
    multilabel = d.dataset == "manifest"
    report = items.report.summary() if items.report is not None else None
    meta: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        _decode_all(split_paths, tmp, shape)
        stats = _train_stats(tmp / "split=train", [items.ids[i] for i in idx["train"]], d.seed)
        np.savez(tmp / LABELS, train=labels["train"], val=labels["val"], test=labels["test"])
        (tmp / ITEMS).write_text(json.dumps({s: [str(p) for p in split_paths[s]] for s in SPLITS}))
        meta.update(format=FORMAT, key=target.name, data={k: getattr(d, k) for k in KEY_FIELDS},
                    concepts=list(items.concepts), multilabel=multilabel,
                    counts={s: len(split_paths[s]) for s in SPLITS}, stats=stats.to_dict(), channels=shape[0],
                    image_size=shape[1], preset=shape[2], report=report,
                    decoded_in_s=round(time.perf_counter() - start, 3), created=time.time())
        (tmp / COMPLETE).write_text(json.dumps(meta, indent=1))  # last: marks the folder complete

    swap_dir(target, write, COMPLETE)
    loaded = _load(target, time.perf_counter() - start)
    if loaded is None:
        raise RuntimeError(f"data: the decode cache {target} was written but cannot be read back")
    return dataclasses.replace(loaded, hit=False)
