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
Writes are atomic (:func:`deepindex.atomic.swap_dir`): a reader sees the old index or the new
one, never half of one.  Items are added to a
loaded index in memory (FAISS ``add``: no rebuild) and ``save`` writes the whole directory again.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from deepindex.atomic import recover_all, recover_dir, swap_dir
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


class IndexedModel(BaseModel):
    """The model version an index was built with."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())
    uri: str
    name: str
    version: str


class IndexManifest(BaseModel):
    """``manifest.json``: what an index folder holds and which model version built it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    format: int = FORMAT
    model: IndexedModel
    collection: str
    metric: str
    normalize: bool
    kind: str
    vector_config: VectorConfig
    concepts: list[str]
    multilabel: bool
    dim: int
    count: int
    image_size: int
    channels: int
    created: str
    source: dict[str, Any] = {}

    def check_model(self, name: str, version: str) -> None:
        """Refuse (:class:`IndexMismatch`) unless this index was built with ``name`` ``version``."""
        m = self.model
        if (m.name, m.version) != (name, version):
            raise IndexMismatch(f"index built with model {m.name} version {m.version}, "
                                f"serving {name} version {version}: refused")


def read_manifest(path: str | Path) -> IndexManifest:
    p = Path(path) / MANIFEST
    raw = json.loads(p.read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"index: {p.parent} has format {raw.get('format')}, expected {FORMAT}")
    return IndexManifest.model_validate(raw)


def find_index(path: str | Path, model_name: str | None = None, version: str | None = None) -> Path | None:
    """``path`` itself when it is an index; else its sub-folder built with ``version`` (a collection folder)."""
    p = Path(path)
    recover_dir(p, MANIFEST)
    if (p / MANIFEST).is_file():
        return p
    if version is None or not p.is_dir():
        return None
    recover_all(p, MANIFEST)  # a version's index that a killed writer left moved aside
    for sub in sorted(p.iterdir()):
        # Hidden folders are a writer's temp or moved-aside copies (deepindex.atomic), never an index.
        if not sub.name.startswith(".") and (sub / MANIFEST).is_file():
            m = read_manifest(sub).model
            if m.version == version and (model_name is None or m.name == model_name):
                return sub
    return None


class IndexStore:
    """A loaded index: vectors, probabilities, ids, thumbnails and the manifest."""

    def __init__(self, manifest: IndexManifest, vectors: VectorIndex, ids: list[str], meta: list[dict[str, Any]],
                 probs: np.ndarray, embeddings: np.ndarray, thumbs: np.ndarray | None) -> None:
        self.manifest, self.vectors, self.ids, self.meta = manifest, vectors, ids, meta
        self.probs, self.embeddings, self.thumbs = probs, embeddings, thumbs  # (N, K), (N, D), (N, C, S, S)
        self.rows = {item: i for i, item in enumerate(ids)}
        if len(self.rows) != len(ids):
            raise ValueError("index: duplicate item ids")

    # ---- build / load / save -----------------------------------------------------------
    @classmethod
    def create(cls, *, model: dict[str, str], collection: str, concepts: list[str], ids: list[str],
               meta: list[dict[str, Any]], probs: np.ndarray, embeddings: np.ndarray, thumbs: np.ndarray | None,
               cfg: VectorConfig, image_size: int, channels: int, multilabel: bool,
               source: dict[str, Any] | None = None) -> IndexStore:
        vectors = VectorIndex.build(embeddings, cfg)
        manifest = IndexManifest(
            model=IndexedModel.model_validate(model), collection=collection, metric=cfg.metric,
            normalize=cfg.normalize, kind=vectors.kind, vector_config=cfg, concepts=list(concepts),
            multilabel=multilabel, dim=int(embeddings.shape[1]), count=len(ids), image_size=image_size,
            channels=channels, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source=source or {})
        return cls(manifest, vectors, list(ids), list(meta), probs.astype(np.float32),
                   embeddings.astype(np.float32), thumbs)

    @classmethod
    def load(cls, path: str | Path) -> IndexStore:
        p = Path(path)
        recover_dir(p, MANIFEST)
        if not (p / MANIFEST).is_file():
            raise FileNotFoundError(f"index: no {MANIFEST} in {p}")
        manifest = read_manifest(p)
        cfg = manifest.vector_config
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
        self.manifest.count = len(self.ids)

        def write(tmp: Path) -> None:
            self.vectors.save(str(tmp / "vectors.faiss"))
            np.save(tmp / "probs.npy", self.probs)
            np.save(tmp / "embeddings.npy", self.embeddings)
            if self.thumbs is not None:
                np.save(tmp / "thumbs.npy", self.thumbs)
            with open(tmp / "items.jsonl", "w") as fh:
                for item, m in zip(self.ids, self.meta, strict=True):
                    fh.write(json.dumps({"id": item, **m}) + "\n")
            # The manifest last: its presence marks a complete index.
            (tmp / MANIFEST).write_text(self.manifest.model_dump_json(indent=2))

        return swap_dir(path, write, MANIFEST)

    # ---- queries -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def similar(self, queries: np.ndarray, k: int, exclude: list[int | None] | None = None
                ) -> list[list[tuple[int, float]]]:
        """k nearest rows per query (Q, D) as (row, score), best first; ``exclude[q]`` drops one row."""
        extra = 1 if exclude else 0
        scores, rows = self.vectors.search(queries, min(k + extra, len(self)) if len(self) else 1)
        out = []
        for q in range(len(queries)):
            skip = exclude[q] if exclude else None
            hits = [(int(r), float(s)) for r, s in zip(rows[q], scores[q], strict=True) if r >= 0 and r != skip]
            out.append(hits[:k])
        return out

    def add(self, ids: list[str], probs: np.ndarray, embeddings: np.ndarray, thumbs: np.ndarray | None,
            meta: list[dict[str, Any]] | None = None) -> list[int]:
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
        self.manifest.count = len(self.ids)
        return list(range(start, len(self.ids)))
