"""The index of one collection for one model version: derived data, rebuilt from the collection at will.

```
<dir>/manifest.json       format, model {uri, name, version}, collection, seq (the catalogue sequence
                          number the base covers), features {name: dim, metric, normalize, kind},
                          concepts, input size/channels, count, created
<dir>/items.jsonl         one {"id", "labels"} per base row
<dir>/probs.npy           (N, K) float32 concept probabilities: keyword search
<dir>/<feature>.npy       (N, D) float32 raw descriptors per feature point: query by example, rebuilds
<dir>/<feature>.faiss     the feature's approximate (HNSW/IVF) index, when it is one (exact ones are
                          rebuilt from the matrix at load)
<dir>/delta.jsonl         the changes applied after the base, append-only: {"seq", "op": "add", "id",
                          "labels", "probs", "features"} (arrays as base64 float32) or {"seq", "op":
                          "delete", "id"}; every line of a batch but its last has "more": true
```
A load reads the base and replays the delta one whole batch at a time (one :meth:`IndexStore.apply`):
a batch a crash cut short is not applied, and the writer's load removes it from the file, so its
next batch follows the last whole one (the catalogue still has those changes, and the next catch-up
applies them again).  A reader following the delta sees a batch whole or not at all.  An index answers for
the collection as of ``seq``; :meth:`IndexStore.apply` moves it forward with the catalogue's later
changes (appended to the delta and synced first, then applied in memory), so an add never rewrites
the index.  When the delta grows past a fraction of the base, :meth:`compact` writes a new base
with it folded in (atomically, :func:`deepindex.atomic.swap_dir`).  Deleted items stay in the
vector indexes until then and are filtered out of every answer.  No images: an index holds
vectors, probabilities and ids; the collection holds the originals.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from deepindex.atomic import recover_all, recover_dir, swap_dir
from deepindex.index.vectors import (
    QUERY_METRICS,
    VectorConfig,
    VectorIndex,
    allowed_metrics,
    check_metric,
    exact_knn,
    query_metric,
)

log = logging.getLogger(__name__)

FORMAT = 2
MANIFEST = "manifest.json"
DELTA = "delta.jsonl"
ITEMS = "items.jsonl"
# Fold the delta into a new base when it holds this many changes, or this fraction of the base.
COMPACT_MIN, COMPACT_FRACTION = 2000, 0.25
# The concept probabilities, queryable as a descriptor from the matrix keyword search uses; compared
# by cosine unless a query says otherwise (the best of the three on digit-scenes, README).
PROBS, PROBS_METRIC = "probs", "cosine"


class IndexMismatch(ValueError):
    """An index built with another model version than the one serving: refused, never used."""


class DeltaUnreadable(ValueError):
    """A reader cannot follow this index's delta past an unreadable line (a whole line, not one being
    written): only the writer's load mends that."""


class IndexRewritten(ValueError):
    """The folder a reader follows holds another base now (a compaction): load it again."""


class DuplicateItem(ValueError):
    pass


class IndexedModel(BaseModel):
    """The model version an index was built with."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())
    uri: str
    name: str
    version: str


class FeatureSpec(BaseModel):
    """One indexed feature point: its dimension and the vector index built over it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dim: int
    vector_config: VectorConfig
    kind: str  # the built index: flat | hnsw | ivf

    @property
    def metric(self) -> str:
        return self.vector_config.metric

    @property
    def normalize(self) -> bool:
        return self.vector_config.normalize

    @property
    def default_query_metric(self) -> str:
        """What the built index compares by: cosine on L2-normalised vectors, else its metric."""
        return "cosine" if self.normalize else self.metric


class IndexManifest(BaseModel):
    """``manifest.json``: what an index folder holds and which model version built it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    format: int = FORMAT
    model: IndexedModel
    collection: str
    seq: int  # the collection's changes up to this sequence number are in the base
    features: dict[str, FeatureSpec]
    default_feature: str
    concepts: list[str]
    multilabel: bool
    image_size: int
    channels: int
    preset: str | None = None  # the model's eval preset (deepindex.data.transforms.PRESETS)
    count: int  # base rows
    created: str
    source: dict[str, Any] = {}

    def check_model(self, name: str, version: str) -> None:
        """Refuse (:class:`IndexMismatch`) unless this index was built with ``name`` ``version``."""
        m = self.model
        if (m.name, m.version) != (name, version):
            raise IndexMismatch(f"index built with model {m.name} version {m.version}, "
                                f"serving {name} version {version}: refused")


@dataclass(frozen=True)
class IndexChange:
    """One catalogue change as the index applies it: an add with its model outputs, or a delete."""

    seq: int
    op: Literal["add", "delete"]
    id: str
    labels: list[str] = field(default_factory=list)
    probs: np.ndarray | None = None  # (K,)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (D,)

    def to_json(self, more: bool = False) -> str:
        """One line of the delta; ``more``: not the last change of its batch."""
        rec: dict[str, Any] = {"seq": self.seq, "op": self.op, "id": self.id}
        if self.op == "add":
            assert self.probs is not None
            rec.update(labels=self.labels, probs=_b64(self.probs),
                       features={k: _b64(v) for k, v in self.features.items()})
        if more:
            rec["more"] = True
        return json.dumps(rec)

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> IndexChange:
        if r["op"] == "delete":
            return cls(int(r["seq"]), "delete", str(r["id"]))
        return cls(int(r["seq"]), "add", str(r["id"]), list(r.get("labels") or []), _unb64(r["probs"]),
                   {k: _unb64(v) for k, v in r["features"].items()})


class RWLock:
    """Many readers or one writer: searches run side by side, an add waits for them and blocks them
    only while it swaps its rows in (the embedding and the delta's fsync happen before)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode()


def _unb64(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4").astype(np.float32)


def index_dir_name(model_name: str, version: str) -> str:
    """The folder of one model version's index inside a collection folder."""
    return f"{model_name}-{version}".replace("/", "_")


def read_manifest(path: str | Path) -> IndexManifest:
    p = Path(path) / MANIFEST
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"index: no index at {p.parent} (no {MANIFEST} in it)") from None
    except NotADirectoryError:  # a file named as the index (found on review: an internal failure, exit 1)
        raise FileNotFoundError(f"index: no index at {p.parent} (a file, not an index folder)") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"index: no index at {p.parent} (its {MANIFEST} is a folder)") from None
    if raw.get("format") != FORMAT:
        raise ValueError(f"index: {p.parent} has format {raw.get('format')}, expected {FORMAT} "
                         "(rebuild it: deepindex index build)")
    return IndexManifest.model_validate(raw)


def find_index(path: str | Path, model_name: str | None = None, version: str | None = None, *,
               recover: bool = True, collection: str | None = None) -> Path | None:
    """``path`` itself when it is an index; else its sub-folder built with ``version`` (a collection
    folder), of ``collection`` if given (an index of another collection, a folder copied or named by
    hand, is not this one's; collections do not share an index folder: each has its own by default).
    ``recover=False``: a reader's look, which leaves a killed writer's folders as they are."""
    p = Path(path)
    if recover:
        recover_dir(p, MANIFEST)
    if (p / MANIFEST).is_file():
        return p
    if version is None or not p.is_dir():
        return None
    if recover:
        recover_all(p, MANIFEST)  # a version's index that a killed writer left moved aside
    for sub in sorted(p.iterdir()):
        # Hidden folders are a writer's temp or moved-aside copies (deepindex.atomic), never an index.
        if not sub.name.startswith(".") and (sub / MANIFEST).is_file():
            try:
                manifest = read_manifest(sub)
            except (ValueError, OSError):
                continue  # an index of an older format: not this version's
            m = manifest.model
            if (m.version == version and (model_name is None or m.name == model_name)
                    and (collection is None or manifest.collection == collection)):
                return sub
    return None


def list_indexes(collection_dir: str | Path) -> list[tuple[Path, IndexManifest]]:
    """The complete indexes in a collection folder, oldest first."""
    p = Path(collection_dir)
    if not p.is_dir():
        return []
    out = []
    for sub in p.iterdir():
        if not sub.name.startswith(".") and (sub / MANIFEST).is_file():
            try:
                out.append((sub, read_manifest(sub)))
            except (ValueError, OSError):
                continue
    return sorted(out, key=lambda pm: (pm[0] / MANIFEST).stat().st_mtime)


class Held:
    """A file kept open, identified by its inode: while it is held, no other file on its filesystem can
    take that inode number, so comparing it with a path's current inode says whether the path still
    names this file (found on review: after a compaction deleted the old folder, ext4 gave its freed
    inodes to the new files, and a reader comparing bare numbers missed the swap)."""

    def __init__(self, fd: int) -> None:
        self.ino = os.fstat(fd).st_ino
        self._closed = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, path: Path) -> Held | None:
        """``path`` held open, or None when there is no such file."""
        try:
            return cls(os.open(path, os.O_RDONLY))
        except FileNotFoundError:
            return None


def base_id(path: str | Path) -> int | None:
    """Which base the index folder ``path`` holds: its manifest's inode (a compaction writes a new
    one), read from an open file, so fresh on a filesystem that caches attributes (NFS); None: none."""
    try:
        with open(Path(path) / MANIFEST, "rb") as fh:
            return os.fstat(fh.fileno()).st_ino
    except FileNotFoundError:
        return None


def _read_tail(path: Path, start: int, hold: bool = False) -> tuple[int, int, bytes, Held | None] | None:
    """(inode, size, the bytes from ``start``, the file held open if ``hold``) of a file, read through one
    open file; None: no file."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            held = Held(os.dup(fh.fileno())) if hold else None
            if st.st_size <= start:
                return st.st_ino, st.st_size, b"", held
            fh.seek(start)
            return st.st_ino, st.st_size, fh.read(), held
    except FileNotFoundError:
        return None


def _batch_bytes(changes: Sequence[IndexChange]) -> bytes:
    """The delta lines of one batch: each but the last says more follow."""
    last = len(changes) - 1
    return "".join(c.to_json(more=i < last) + "\n" for i, c in enumerate(changes)).encode()


def _append_synced(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` and sync it; on any failure the file is cut back to its old end."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            with suppress(OSError):  # the write's own error is the one to report
                os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def _parse_delta(data: bytes, start: int, after: int | None = None) -> tuple[list[IndexChange], int, str | None]:
    """The changes of the whole batches in ``data`` (the delta from byte ``start``): (changes, the byte
    after the last whole batch, what stopped the read early: None, ``"unreadable"`` (a complete line
    that does not parse) or ``"gap"``).  A batch whose last line is not there yet (or a line without
    its newline) is being written, or was cut short by a crash, and is not read.  A line without
    "more" ends its batch (a delta written before batches were marked: every line its own).

    ``after``: the base's seq.  Catalogue seqs have no gaps and every change is applied in order, so
    the delta goes on from there with no gap; a batch that skips seqs was appended by a writer of
    another base (a build swapped this folder under a running service) and ends what can be applied:
    catching up from the catalogue applies the changes again (found on review: the skipped ones were
    lost, and an item deleted in them came back)."""
    changes: list[IndexChange] = []
    batch: list[IndexChange] = []
    at = pos = start
    for line in data.split(b"\n")[:-1]:  # the last piece: the unfinished line, or nothing
        try:
            r = json.loads(line)
            batch.append(IndexChange.from_record(r))
            more = r.get("more") is True
        except (ValueError, KeyError, TypeError):
            return changes, at, "unreadable"
        pos += len(line) + 1
        if not more:
            if after is not None:
                for c in batch:
                    if c.seq > after + 1:
                        return changes, at, "gap"
                    after = max(after, c.seq)
            changes += batch
            batch, at = [], pos
    return changes, at, None


def check_index_target(path: str | Path) -> None:
    """That ``path`` may take an index: new, empty, or an index (replaced whole by :meth:`IndexStore.save`).
    Anything else is refused: the swap removed what the folder held (found on review: ``index build --out``
    given the collection's folder removed every version's index and the service's state)."""
    p = Path(path)
    if p.is_dir() and not (p / MANIFEST).is_file() and any(p.iterdir()):
        raise ValueError(f"--out: {p} holds files and is not an index (no {MANIFEST}); writing the index there "
                         "would replace them: give a new or empty folder")
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out: {p} is a file, not a folder")


class IndexStore:
    """A loaded index: vector indexes per feature, probabilities, ids and labels, and the delta."""

    def __init__(self, manifest: IndexManifest, ids: list[str], labels: list[list[str]], probs: np.ndarray,
                 features: dict[str, np.ndarray], vectors: dict[str, VectorIndex], path: Path | None = None,
                 seq: int | None = None):
        self.manifest, self.path = manifest, path
        self.ids, self.labels = ids, labels
        self.probs = probs  # (N, K)
        self.features = features  # name -> (N, D) raw descriptors
        self.vectors = vectors  # name -> FAISS index over the same rows
        self.alive = np.ones(len(ids), dtype=bool)  # False: deleted since the base (filtered out)
        self.rows: dict[str, int] = {}
        for i, item in enumerate(ids):
            if item in self.rows:
                raise ValueError(f"index: duplicate item id {item!r}")
            self.rows[item] = i
        self.seq = manifest.seq if seq is None else seq
        self.delta_count = 0
        self._delta_at = 0  # bytes of the delta this copy has read (a reader's follow() goes on from there)
        self._delta: Held | None = None  # which delta file that was (held open: see Held)
        self._base: Held | None = None  # the manifest when loaded from a folder (held open)
        self._lock = threading.Lock()  # one writer at a time (apply, compact)
        self.rw = RWLock()  # readers (queries) vs the in-memory swap of a write

    # ---- build / load / save ---------------------------------------------------------------
    @classmethod
    def create(cls, *, model: dict[str, str], collection: str, seq: int, concepts: list[str], ids: list[str],
               labels: list[list[str]], probs: np.ndarray, features: dict[str, np.ndarray],
               vector_cfg: VectorConfig | dict[str, VectorConfig], default_feature: str, image_size: int,
               channels: int, multilabel: bool, source: dict[str, Any] | None = None,
               preset: str | None = None) -> IndexStore:
        """A new index over ``ids`` (the collection as of ``seq``) with one vector index per feature."""
        if default_feature not in features:
            raise ValueError(f"features: the default feature {default_feature!r} is not among {sorted(features)}")
        specs, vectors = {}, {}
        for name, x in features.items():
            cfg = vector_cfg[name] if isinstance(vector_cfg, dict) else vector_cfg
            vectors[name] = VectorIndex.build(x, cfg) if len(x) else VectorIndex.empty(x.shape[1], cfg)
            specs[name] = FeatureSpec(dim=int(x.shape[1]), vector_config=cfg, kind=vectors[name].kind)
        manifest = IndexManifest(
            model=IndexedModel.model_validate(model), collection=collection, seq=seq, features=specs,
            default_feature=default_feature, concepts=list(concepts), multilabel=multilabel, image_size=image_size,
            channels=channels, preset=preset, count=len(ids),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source=source or {})
        return cls(manifest, list(ids), [list(x) for x in labels], probs.astype(np.float32),
                   {k: v.astype(np.float32) for k, v in features.items()}, vectors)

    @classmethod
    def load(cls, path: str | Path, *, recover: bool = True) -> IndexStore:
        """The index in ``path``, its delta replayed.  ``recover=False``: a reader beside the index's
        writer (it never touches the folder, follows the delta with :meth:`follow`, and gets
        :class:`IndexRewritten` if a compaction swapped the folder while it read it)."""
        p = Path(path)
        if recover:
            recover_dir(p, MANIFEST)
        if not (p / MANIFEST).is_file():
            raise FileNotFoundError(f"index: no {MANIFEST} in {p}")
        base = Held.open(p / MANIFEST)  # which base this is (a reader's follow() checks it)
        m = read_manifest(p)
        rows = [json.loads(line) for line in (p / ITEMS).read_text().splitlines() if line]
        ids = [str(r["id"]) for r in rows]
        labels = [list(r.get("labels") or []) for r in rows]
        # allow_pickle=False: an index folder holds plain numeric arrays; an object array (a pickle)
        # is refused with a ValueError, never unpickled.
        probs = np.load(p / "probs.npy", allow_pickle=False)
        features, vectors = {}, {}
        for name, spec in m.features.items():
            x = np.load(p / f"{name}.npy", allow_pickle=False)
            features[name] = x
            saved = p / f"{name}.faiss"
            vectors[name] = (VectorIndex.load(str(saved), spec.vector_config) if saved.is_file()
                             else VectorIndex.build(x, spec.vector_config.model_copy(update={"kind": "flat"}))
                             if len(x) else VectorIndex.empty(spec.dim, spec.vector_config))
            if vectors[name].ntotal != len(ids) or x.shape != (len(ids), spec.dim):
                raise ValueError(f"index: {p} is inconsistent ({name}: vectors, ids and arrays differ in length)")
        if probs.shape != (len(ids), len(m.concepts)):
            raise ValueError(f"index: {p} is inconsistent (probabilities, ids and concepts differ in size)")
        store = cls(m, ids, labels, probs, features, vectors, path=p)
        store._base = base
        store._replay(p / DELTA, repair=recover)
        if not recover and (base is None or base_id(p) != base.ino):  # a compaction swapped the folder meanwhile
            raise IndexRewritten(f"index {p}: rewritten while it was read")
        return store

    def _replay(self, delta: Path, repair: bool) -> None:
        """Apply the delta's whole batches; ``repair`` (the writer's load): cut the file after them, so
        the next batch is not appended to a torn one (which every later read would stop at)."""
        got = _read_tail(delta, 0, hold=True)
        if got is None:
            return
        _, _, data, self._delta = got
        changes, self._delta_at, stop = _parse_delta(data, 0, after=self.seq)
        if stop or len(data) > self._delta_at:
            # A batch cut short by a crash (or an unreadable line, or one after a gap) ends the log: the
            # catalogue still has those changes and anything after them, and catching up applies them again.
            what = {"unreadable": "an unreadable line", "gap": "a gap in its seqs (another base's writer "
                    "appended to it)"}.get(stop or "", "a batch a crash cut short")
            if repair:
                with open(delta, "r+b") as fh:
                    fh.truncate(self._delta_at)
                    os.fsync(fh.fileno())
            log.warning("index %s: the delta ends in %s after %d changes; replay stops there%s", self.path, what,
                        len(changes), " (removed from the file)" if repair else "")
        self._apply_in_memory([c for c in changes if c.seq > self.seq])
        self.delta_count = len(changes)

    @property
    def base(self) -> Held | None:
        """The manifest of the base this copy was read from, held open (None: not from a folder): its
        ``ino`` is the folder's :func:`base_id` while the folder holds that base."""
        return self._base

    def follow(self) -> int:
        """Apply the changes the index's writer (another process) appended to the delta since this
        copy last read it, so a reader keeps up without reloading; returns how many.  A batch is read
        once it is whole (one being written, or one a crash cut short, is not read; the writer's next
        load removes a torn one, and its next batch takes its place).

        Raises :class:`IndexRewritten` when the folder holds another base now (a compaction swapped
        it: load it again), and :class:`DeltaUnreadable` at an unreadable whole line (only the writer's
        load mends that).  The delta is opened each time and its size read from the open file, so a
        shared filesystem that caches attributes (NFS: close-to-open) shows what was written."""
        if self.path is None:
            return 0
        with self._lock:
            # No delta yet when this copy was read: is its base still the folder's?
            if self._delta is None and (self._base is None or base_id(self.path) != self._base.ino):
                raise IndexRewritten(f"index {self.path}: another base (compacted)")
            got = _read_tail(self.path / DELTA, self._delta_at, hold=self._delta is None)
            if got is None:
                if self._delta is not None:
                    raise IndexRewritten(f"index {self.path}: its delta is gone (compacted)")
                return 0
            ino, size, data, held = got
            if self._delta is None:
                self._delta = held  # the first change since this copy's base
            elif ino != self._delta.ino or size < self._delta_at:
                raise IndexRewritten(f"index {self.path}: another delta (compacted)")
            if not data:
                return 0  # nothing new
            changes, at, stop = _parse_delta(data, self._delta_at, after=self.seq)
            if stop == "gap":  # another base's writer appended there (found on review: a reader applied it)
                raise DeltaUnreadable(f"index {self.path}: a batch of its delta after byte {at} skips seqs "
                                      "(another base's writer appended to it)")
            if stop:
                raise DeltaUnreadable(f"index {self.path}: a line of its delta after byte {at} is unreadable")
            self._delta_at = at
            self.delta_count += len(changes)
            new = [c for c in changes if c.seq > self.seq]
            if new:
                with self.rw.write():
                    self._apply_in_memory(new)
            return len(new)

    def save(self, path: str | Path) -> Path:
        """Write a base holding every live item (the delta folded in) atomically; the new folder has no delta."""
        check_index_target(path)
        live = np.flatnonzero(self.alive)
        specs = {}
        vectors: dict[str, VectorIndex] = {}
        for name, spec in self.manifest.features.items():
            x = self.features[name][live]
            cfg = spec.vector_config
            vectors[name] = VectorIndex.build(x, cfg) if len(x) else VectorIndex.empty(spec.dim, cfg)
            specs[name] = FeatureSpec(dim=spec.dim, vector_config=cfg, kind=vectors[name].kind)
        manifest = self.manifest.model_copy(update={"seq": self.seq, "count": len(live), "features": specs})
        ids = [self.ids[i] for i in live]

        def write(tmp: Path) -> None:
            np.save(tmp / "probs.npy", self.probs[live])
            for name in specs:
                np.save(tmp / f"{name}.npy", self.features[name][live])
                if vectors[name].kind != "flat":
                    vectors[name].save(str(tmp / f"{name}.faiss"))
            with open(tmp / ITEMS, "w") as fh:
                for i in live:
                    fh.write(json.dumps({"id": self.ids[i], "labels": self.labels[i]}) + "\n")
            # The manifest last: its presence marks a complete index.
            (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))

        target = swap_dir(path, write, MANIFEST)
        # This object now mirrors the new base (compaction keeps serving from it).  Queries wait only for
        # this swap of references: the vector indexes were built and the folder written above, beside them
        # (under the write lock, a compaction of 20k items held every query for ~3 s; found on review).
        with self.rw.write():
            self.manifest, self.path, self.delta_count, self._delta_at, self._delta = manifest, target, 0, 0, None
            self._base = Held.open(target / MANIFEST)
            self.ids, self.labels = ids, [self.labels[i] for i in live]
            self.probs = self.probs[live]
            self.features = {k: v[live] for k, v in self.features.items()}
            self.vectors = vectors
            self.alive = np.ones(len(ids), dtype=bool)
            self.rows = {item: i for i, item in enumerate(ids)}
        return target

    # ---- changes ------------------------------------------------------------------------------
    def apply(self, changes: Sequence[IndexChange]) -> int:
        """Apply catalogue changes after ``seq`` (older ones are skipped: applying twice is harmless):
        appended to the delta as one batch and synced when the index has a folder, then applied in
        memory.  A write that fails (a full disk) is cut from the file again and raises: nothing of
        the batch is applied.  Returns how many were applied."""
        with self._lock:
            new = [c for c in changes if c.seq > self.seq]
            if not new:
                return 0
            for c in new:  # refused before anything is written: a bad change in the delta would fail every load
                self._check_add(c)
            if self.path is not None:
                _append_synced(self.path / DELTA, _batch_bytes(new))
                self.delta_count += len(new)
            with self.rw.write():
                self._apply_in_memory(new)
            return len(new)

    def _check_add(self, c: IndexChange) -> None:
        """ValueError naming the item unless an add holds probabilities and every feature at the index's sizes."""
        if c.op != "add":
            return
        k = len(self.manifest.concepts)
        if c.probs is None or np.shape(c.probs) != (k,):
            raise ValueError(f"index: item {c.id} has {None if c.probs is None else np.shape(c.probs)} "
                             f"probabilities, the index {k}")
        for name, spec in self.manifest.features.items():
            got = (c.features or {}).get(name)
            if got is None or np.shape(got) != (spec.dim,):
                raise ValueError(f"index: item {c.id} has {None if got is None else np.shape(got)} for feature "
                                 f"{name}, the index ({spec.dim},)")

    def _apply_in_memory(self, changes: Iterable[IndexChange]) -> None:
        adds: list[IndexChange] = []
        pending: set[str] = set()  # the ids in ``adds``

        def flush() -> None:  # consecutive adds go into the arrays in one step
            if not adds:
                return
            start = len(self.ids)
            self.probs = np.concatenate([self.probs, np.stack([a.probs for a in adds])])  # type: ignore[misc]
            for name in self.manifest.features:
                x = np.stack([a.features[name] for a in adds]).astype(np.float32)
                self.features[name] = np.concatenate([self.features[name], x])
                self.vectors[name].add(x)
            self.alive = np.concatenate([self.alive, np.ones(len(adds), dtype=bool)])
            for j, a in enumerate(adds):
                self.ids.append(a.id)
                self.labels.append(list(a.labels))
                self.rows[a.id] = start + j
            adds.clear()
            pending.clear()

        for c in changes:
            if c.op == "delete" or c.id in pending:
                flush()  # the pending adds get their rows first: this change may be about one of them
            old = self.rows.get(c.id)
            if c.op == "delete" or (old is not None and self.alive[old]):
                flush()
                if old is not None:
                    self.alive[old] = False  # an id re-added after a delete gets a new row below
                    del self.rows[c.id]
            if c.op == "add":
                missing = [f for f in self.manifest.features if f not in c.features]
                if missing or c.probs is None:
                    raise ValueError(f"index: the add of {c.id} lacks {missing or ['probs']}")
                adds.append(c)
                pending.add(c.id)
            self.seq = max(self.seq, c.seq)
        flush()

    def needs_compaction(self) -> bool:
        return self.delta_count >= max(COMPACT_MIN, COMPACT_FRACTION * self.manifest.count)

    def compact(self) -> bool:
        """Fold the delta into a new base when it has grown (see ``COMPACT_*``); True when it did."""
        with self._lock:
            if self.path is None or not self.needs_compaction():
                return False
            start = time.perf_counter()
            n = self.delta_count
            self.save(self.path)  # under the writers' lock: queries go on while the new base is built
            log.info("index %s: compacted %d delta changes into the base (%d items) in %.2fs", self.path, n,
                     len(self), time.perf_counter() - start)
            return True

    # ---- queries ------------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return self.manifest.model.version

    def __len__(self) -> int:
        return int(self.alive.sum())

    def feature(self, name: str | None) -> str:
        """The feature point a query names (the index's default when None), or a ValueError naming ``feature``.

        ``probs`` is always queryable: every index holds the concept probabilities for keyword search,
        so they serve as a descriptor too (exact search over that (N, K) matrix), with no second copy.
        """
        name = name or self.manifest.default_feature
        if name not in self.manifest.features and name != PROBS:
            raise ValueError(f"feature: {name!r} is not indexed; this index answers "
                             f"{', '.join(self.query_features())}")
        return name

    def query_features(self) -> dict[str, tuple[str, ...]]:
        """Every feature a query may name -> the metrics it answers (the first is its default)."""
        out: dict[str, tuple[str, ...]] = {}
        for name, spec in self.manifest.features.items():
            ok = allowed_metrics(spec.kind, spec.metric, spec.normalize)
            out[name] = (spec.default_query_metric, *[m for m in ok if m != spec.default_query_metric])
        if PROBS not in out:
            out[PROBS] = (PROBS_METRIC, *[m for m in QUERY_METRICS if m != PROBS_METRIC])
        return out

    def default_metric(self, feature: str | None) -> str:
        return self.query_features()[self.feature(feature)][0]

    def check_query(self, feature: str | None, metric: str | None) -> tuple[str, str]:
        """(feature, metric) of a query, defaults filled in; a ValueError naming the parameter otherwise."""
        name = self.feature(feature)
        metric = query_metric(metric) if metric else self.default_metric(name)
        if name in self.manifest.features:
            spec = self.manifest.features[name]
            check_metric(metric, spec.kind, spec.metric, spec.normalize)
        else:  # probs: an exact search over the probability matrix answers any metric
            check_metric(metric, "flat", PROBS_METRIC, False)
        return name, metric

    def approximate(self, feature: str, metric: str) -> bool:
        """Whether :meth:`similar` answers ``feature`` by ``metric`` through an approximate vector index
        (HNSW, IVF: it may miss a near item), not an exact scan."""
        spec = self.manifest.features.get(feature)
        return spec is not None and spec.kind != "flat" and metric == spec.default_query_metric

    def _matrix(self, name: str) -> np.ndarray:
        return self.features.get(name, self.probs)  # probs: the keyword matrix

    def similar(self, queries: np.ndarray, k: int, exclude: Sequence[int | None] | None = None,
                feature: str | None = None, metric: str | None = None,
                mask: np.ndarray | None = None) -> list[list[tuple[int, float]]]:
        """k nearest live rows per query (Q, D) as (row, score), best first, higher is closer.

        ``feature`` and ``metric`` default to the index's; another metric than the built index's is
        answered exactly over the raw matrix where the index kind allows it (else a ValueError naming
        it).  ``exclude[q]`` drops one row; ``mask`` (N,) keeps only the rows where it is True.
        """
        name, metric = self.check_query(feature, metric)
        with self.rw.read():
            return self._similar(queries, k, exclude, name, metric, mask)

    def _similar(self, queries: np.ndarray, k: int, exclude: Sequence[int | None] | None, name: str, metric: str,
                 mask: np.ndarray | None) -> list[list[tuple[int, float]]]:
        keep = self.alive if mask is None else self.alive & mask
        n_keep = int(keep.sum())
        if n_keep == 0:
            return [[] for _ in range(len(queries))]
        spec = self.manifest.features.get(name)
        exact = spec is None or metric != spec.default_query_metric  # probs: never a vector index of its own
        fetch = min(k + (1 if exclude else 0) + int((~keep).sum()), len(self.ids))
        while True:
            if exact:
                scores, rows = exact_knn(self._matrix(name), queries, fetch, metric)
            else:
                scores, rows = self._rescored(name, metric, queries, self.vectors[name].search(queries, fetch)[1])
            out: list[list[tuple[int, float]]] = []
            short = False
            for q in range(len(queries)):
                skip = exclude[q] if exclude else None
                hits = [(int(r), float(s)) for r, s in zip(rows[q], scores[q], strict=True)
                        if r >= 0 and keep[r] and r != skip]
                short |= len(hits) < min(k, n_keep - (1 if skip is not None and keep[skip] else 0))
                out.append(hits[:k])
            # Approximate indexes can return fewer live hits than asked: ask for more, up to all rows.
            if not short or fetch >= len(self.ids):
                return out
            fetch = min(2 * fetch, len(self.ids))

    def _rescored(self, name: str, metric: str, queries: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A vector index's hits (Q, fetch) scored as :meth:`similarity` scores them, best first.

        The index finds the rows; their scores come from the one exact arithmetic every page and
        fusion use.  An L2 index of normalised vectors answers cosine but computed minus a distance
        (another scale), and even on one scale its float32 arithmetic is not the exact one: a page
        after the first, rescored exactly, compared its scores with the cursor's and lost or repeated
        items (found on review)."""
        x = self._matrix(name)
        out_s = np.full(rows.shape, np.nan, dtype=np.float32)
        out_r = np.full(rows.shape, -1, dtype=np.int64)
        for q in range(len(queries)):
            found = rows[q][rows[q] >= 0]
            if len(found):
                s, r = exact_knn(x[found], queries[q : q + 1], len(found), metric)
                out_s[q, : len(found)], out_r[q, : len(found)] = s[0], found[r[0]]
        return out_s, out_r

    def similarity(self, query: np.ndarray, feature: str | None = None, metric: str | None = None) -> np.ndarray:
        """(N,) exact scores of every row (deleted ones too: the caller masks) against one (D,) query,
        higher is closer: what fusion needs (a score for every item, not only the k nearest).  The same
        FAISS arithmetic as the vector indexes (which store their vectors whole), so an item scores the
        same here as in :meth:`similar`."""
        name, metric = self.check_query(feature, metric)
        with self.rw.read():
            x = self._matrix(name)
            q = np.asarray(query, dtype=np.float32).reshape(1, -1)
            if q.shape[1] != x.shape[1]:
                raise ValueError(f"example: a {q.shape[1]}-dimensional descriptor, {name} has {x.shape[1]}")
            out = np.full(len(x), -np.inf)
            if len(x):
                s, r = exact_knn(x, q, len(x), metric)
                out[r[0]] = s[0]
            return out

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.alive)

    def rank_keywords(self, concept_idx: list[int], k: int, mode: str = "all") -> list[tuple[int, float]]:
        """The k live rows ranked by the query concepts' presence probabilities (``keywords.rank``)."""
        from deepindex.index.keywords import rank

        with self.rw.read():
            live = self.live_rows()
            rows, scores = rank(self.probs[live], concept_idx, k, mode, exclusive=not self.manifest.multilabel,
                                names=self.manifest.concepts)
            return [(int(live[r]), float(s)) for r, s in zip(rows, scores, strict=True)]

    def item(self, item_id: str, feature: str | None = None) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(row, probabilities (K,), descriptor (D,)) of a live item, or None."""
        name = self.feature(feature)
        with self.rw.read():
            row = self.rows.get(item_id)
            if row is None:
                return None
            return row, self.probs[row].copy(), self._matrix(name)[row].copy()

    def hit(self, row: int, score: float) -> dict[str, Any]:
        return {"id": self.ids[row], "score": score, "labels": self.labels[row]}

    def memory_bytes(self) -> int:
        """Bytes the loaded arrays and vector indexes hold (what the replica's memory per item is made of)."""
        n = self.probs.nbytes + self.alive.nbytes + sum(x.nbytes for x in self.features.values())
        n += sum(v.memory_bytes() for v in self.vectors.values())
        n += sum(len(i) + 64 for i in self.ids)  # ids and the dict entry per row, roughly
        return n
