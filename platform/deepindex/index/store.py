"""The index directory: one per (model version, collection).

```
<dir>/manifest.json    format, model {uri, name, version}, metric, vector index kind, concepts,
                       dim, count, collection, image size/channels, created
<dir>/vectors.faiss    the FAISS index over the embeddings (rows = item order)
<dir>/probs.npy        (N, K) float32 concept probabilities: keyword search
<dir>/embeddings.npy   (N, D) float32 raw embeddings: query by indexed item, rebuilds
<dir>/thumbs.npy       (N, C, S, S) uint8 model-size images: shown by the demo page (optional)
<dir>/items.jsonl      one {"id", ...metadata} per row
```
Writes are atomic: everything goes to a temp directory next to the target, then renames swap
it in, so a reader sees the old index or the new one, never half of one.  Items are added to a
loaded index in memory (FAISS ``add``: no rebuild) and ``save`` writes the whole directory again.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from deepindex.index.vectors import VectorConfig, VectorIndex

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"


class IndexMismatch(ValueError):
    """An index built with another model version than the one serving: refused, never used."""


class DuplicateItem(ValueError):
    pass


def index_dir_name(model_name: str, version: str) -> str:
    """The folder of one model version's index inside a collection folder."""
    return f"{model_name}-{version}".replace("/", "_")


def read_manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def find_index(path: str | Path, model_name: str | None = None, version: str | None = None) -> Path | None:
    """``path`` itself when it is an index; else its sub-folder built with ``version`` (a collection folder)."""
    p = Path(path)
    recover_interrupted(p)
    if (p / MANIFEST).is_file():
        return p
    if version is None or not p.is_dir():
        return None
    for old in p.glob(".*.old-*/x"):  # a version's index that a killed writer left moved aside
        recover_interrupted(p / old.parent.name[1:].split(".old-")[0])
    for sub in sorted(p.iterdir()):
        # Hidden folders are a writer's temp or moved-aside copies (atomic_write_dir), never an index.
        if not sub.name.startswith(".") and (sub / MANIFEST).is_file():
            m = read_manifest(sub)["model"]
            if m["version"] == version and (model_name is None or m["name"] == model_name):
                return sub
    return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, f"renameat2({a}, {b}): {os.strerror(err)}")


def _hold(folder: Path) -> int | None:
    """Lock a writer's temp folder for the writer's lifetime (``flock`` on the folder itself).

    The kernel drops the lock when the process dies, however it dies: a folder whose lock can be
    taken belongs to no live writer.  None where the filesystem has no ``flock`` (the folder is
    then never swept).
    """
    import fcntl

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


def _abandoned(folder: Path) -> bool:
    """No live writer holds ``folder`` (see :func:`_hold`)."""
    try:
        fd = _hold(folder)
    except OSError:  # gone meanwhile, or not ours to open
        return False
    if fd is None:
        return False
    os.close(fd)
    return True


def recover_interrupted(target: str | Path) -> None:
    """Put back an index that a writer moved aside and died before replacing (the two-rename swap),
    then remove what killed writers left next to it (temp and moved-aside folders)."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    if not (target / MANIFEST).is_file():
        olds = sorted(target.parent.glob(f".{target.name}.old-*/x"), key=lambda q: q.stat().st_mtime, reverse=True)
        for old in olds:
            if (old / MANIFEST).is_file() and not target.exists() and _abandoned(old.parent):
                os.rename(old, target)
                log.warning("index %s: restored the previous version left by an interrupted write", target)
                break
    if not (target / MANIFEST).is_file():
        return  # nothing complete to keep: leave every copy for a person to look at
    for left in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
        if left.is_dir() and _abandoned(left):
            try:
                shutil.rmtree(left)
                log.info("index %s: removed %s, left by an interrupted write", target, left.name)
            except OSError as e:  # read-only mount, or another process removing it too
                log.debug("index %s: could not remove %s: %s", target, left, e)


def atomic_write_dir(target: str | Path, write) -> Path:
    """Call ``write(tmp_dir)`` then swap ``tmp_dir`` in for ``target``: readers, and a writer killed at
    any point, see the old complete directory or the new one, never none.  The temp folders are
    locked while this writer lives; the next load or write removes those of a killed writer."""
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    held: list[int] = []

    def make(kind: str) -> Path:
        # Locked under a name the sweep ignores, then renamed: a sweep never sees it unlocked.
        # (A kill inside these two calls leaves an empty ``.new-`` folder, which stays.)
        folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new-"))
        fd = _hold(folder)
        if fd is not None:
            held.append(fd)
        named = folder.with_name(folder.name.replace(".new-", f".{kind}-", 1))
        os.rename(folder, named)
        return named

    tmp = make("tmp")
    try:
        write(tmp)
        for f in tmp.iterdir():  # durable before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if not target.exists():
            os.rename(tmp, target)
        elif not _exchange(tmp, target):  # when swapped, tmp holds the old version: removed below
            # Two renames: a crash between them leaves the old version under .old-*/x, where
            # recover_interrupted (run by every load and write) finds it and puts it back.
            old = make("old")
            os.rename(target, old / "x")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for fd in held:
            os.close(fd)
    return target


class IndexStore:
    """A loaded index: vectors, probabilities, ids, thumbnails and the manifest."""

    def __init__(self, manifest: dict, vectors: VectorIndex, ids: list[str], meta: list[dict],
                 probs: np.ndarray, embeddings: np.ndarray, thumbs: np.ndarray | None):
        self.manifest, self.vectors, self.ids, self.meta = manifest, vectors, ids, meta
        self.probs, self.embeddings, self.thumbs = probs, embeddings, thumbs  # (N, K), (N, D), (N, C, S, S)
        self.rows = {item: i for i, item in enumerate(ids)}
        if len(self.rows) != len(ids):
            raise ValueError("index: duplicate item ids")

    # ---- build / load / save -----------------------------------------------------------
    @classmethod
    def create(cls, *, model: dict, collection: str, concepts: list[str], ids: list[str], meta: list[dict],
               probs: np.ndarray, embeddings: np.ndarray, thumbs: np.ndarray | None, cfg: VectorConfig,
               image_size: int, channels: int, multilabel: bool, extra: dict | None = None) -> "IndexStore":
        vectors = VectorIndex.build(embeddings, cfg)
        manifest = {
            "format": FORMAT, "model": dict(model), "collection": collection, "metric": cfg.metric,
            "normalize": cfg.normalize, "kind": vectors.kind, "vector_config": cfg.model_dump(),
            "concepts": list(concepts), "multilabel": multilabel, "dim": int(embeddings.shape[1]),
            "count": len(ids), "image_size": image_size, "channels": channels,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {}),
        }
        return cls(manifest, vectors, list(ids), list(meta), probs.astype(np.float32),
                   embeddings.astype(np.float32), thumbs)

    @classmethod
    def load(cls, path: str | Path) -> "IndexStore":
        p = Path(path)
        recover_interrupted(p)
        if not (p / MANIFEST).is_file():
            raise FileNotFoundError(f"index: no {MANIFEST} in {p}")
        manifest = read_manifest(p)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"index: {p} has format {manifest.get('format')}, expected {FORMAT}")
        cfg = VectorConfig(**manifest["vector_config"])
        rows = [json.loads(line) for line in (p / "items.jsonl").read_text().splitlines() if line]
        ids = [r.pop("id") for r in rows]
        # allow_pickle=False: an index folder holds plain numeric arrays; an object array (a pickle)
        # is refused with a ValueError, never unpickled.
        thumbs = np.load(p / "thumbs.npy", allow_pickle=False) if (p / "thumbs.npy").is_file() else None
        store = cls(manifest, VectorIndex.load(str(p / "vectors.faiss"), cfg), ids, rows,
                    np.load(p / "probs.npy", allow_pickle=False), np.load(p / "embeddings.npy", allow_pickle=False),
                    thumbs)
        if not (store.vectors.ntotal == len(ids) == len(store.probs) == len(store.embeddings)):
            raise ValueError(f"index: {p} is inconsistent (vectors, ids and arrays differ in length)")
        return store

    def save(self, path: str | Path) -> Path:
        self.manifest["count"] = len(self.ids)

        def write(tmp: Path) -> None:
            self.vectors.save(str(tmp / "vectors.faiss"))
            np.save(tmp / "probs.npy", self.probs)
            np.save(tmp / "embeddings.npy", self.embeddings)
            if self.thumbs is not None:
                np.save(tmp / "thumbs.npy", self.thumbs)
            with open(tmp / "items.jsonl", "w") as fh:
                for item, m in zip(self.ids, self.meta):
                    fh.write(json.dumps({"id": item, **m}) + "\n")
            # The manifest last: its presence marks a complete index.
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2))

        return atomic_write_dir(path, write)

    # ---- queries -------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return self.manifest["model"]["version"]

    def check_model(self, name: str, version: str) -> None:
        m = self.manifest["model"]
        if m["version"] != version or m["name"] != name:
            raise IndexMismatch(f"index built with model {m['name']} version {m['version']}, "
                                f"serving {name} version {version}")

    def __len__(self) -> int:
        return len(self.ids)

    def similar(self, queries: np.ndarray, k: int, exclude: list[int | None] | None = None) -> list[list[tuple[int, float]]]:
        """k nearest rows per query (Q, D) as (row, score), best first; ``exclude[q]`` drops one row."""
        extra = 1 if exclude else 0
        scores, rows = self.vectors.search(queries, min(k + extra, len(self)) if len(self) else 1)
        out = []
        for q in range(len(queries)):
            skip = exclude[q] if exclude else None
            hits = [(int(r), float(s)) for r, s in zip(rows[q], scores[q]) if r >= 0 and r != skip]
            out.append(hits[:k])
        return out

    def add(self, ids: list[str], probs: np.ndarray, embeddings: np.ndarray, thumbs: np.ndarray | None,
            meta: list[dict] | None = None) -> list[int]:
        """Append items (no rebuild); an id already present is a :class:`DuplicateItem`."""
        dup = [i for i in ids if i in self.rows]
        if dup or len(set(ids)) != len(ids):
            raise DuplicateItem(f"item id already indexed: {(dup or ids)[0]}")
        if probs.shape[1] != self.probs.shape[1] or embeddings.shape[1] != self.embeddings.shape[1]:
            raise ValueError("index: added items have other shapes than the indexed ones")
        start = len(self.ids)
        self.vectors.add(embeddings)
        self.probs = np.concatenate([self.probs, probs.astype(np.float32)])
        self.embeddings = np.concatenate([self.embeddings, embeddings.astype(np.float32)])
        if self.thumbs is not None:  # keep rows aligned: an item without a picture gets a blank one
            t = thumbs if thumbs is not None else np.zeros((len(ids), *self.thumbs.shape[1:]), np.uint8)
            self.thumbs = np.concatenate([self.thumbs, t.astype(np.uint8)])
        self.ids.extend(ids)
        self.meta.extend(meta or [{} for _ in ids])
        for j, item in enumerate(ids):
            self.rows[item] = start + j
        self.manifest["count"] = len(self.ids)
        return list(range(start, len(self.ids)))
