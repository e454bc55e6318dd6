"""The index deployment: the one replica that holds (and writes) the index.

Every call names the model version the caller's data came from; the index serves only when
its manifest says it was built with that version.  When the model moves to a new version the
replica looks for that version's index in the collection folder and loads it, else it holds
no index and answers ``index_unavailable`` (refused, never silently used).  Calls return
``{"error": {...}, "status": N}`` rather than raising, so the ingress maps them to HTTP as is.
"""
from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import numpy as np
from ray import serve

if TYPE_CHECKING:
    from deepindex.index.store import IndexStore

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(fn: Callable[Concatenate[IndexServer, _P], _R]) -> Callable[Concatenate[IndexServer, _P], _R]:
    """Serialise calls: Serve may run sync methods on a thread pool, and FAISS add is not safe under search."""
    import functools

    @functools.wraps(fn)
    def wrapper(self: IndexServer, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return fn(self, *args, **kwargs)

    return wrapper


def _err(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}, "status": status}


@serve.deployment(name="IndexService", num_replicas=1, health_check_period_s=10)
class IndexServer:
    def __init__(self, index_dir: str | None, persist_added: bool = True) -> None:
        self.index_dir, self.persist = index_dir, persist_added
        self.store: IndexStore | None = None
        self.path: Path | None = None
        # Why there is no index: set whenever ``store`` is None, None while one is loaded.
        self.problem: str | None = "no index directory configured" if not index_dir else "not loaded yet"
        self._lock = threading.RLock()  # see _locked

    def check_health(self) -> None:
        pass  # an index that is missing or refused is "not ready" (/readyz), not "unhealthy"

    # ---- version handshake ---------------------------------------------------------------
    def _sync(self, name: str, version: str) -> dict[str, Any] | None:
        """Make sure the loaded index matches (name, version); an error dict when it cannot."""
        from deepindex.index.store import IndexStore, find_index, read_manifest

        s = self.store
        if s is not None and (s.manifest.model.name, s.manifest.model.version) == (name, version):
            return None
        if not self.index_dir:
            return self._unavailable()
        try:
            path = find_index(self.index_dir, name, version)
            if path is None:
                self.store, self.problem = None, f"no index for model {name} version {version} under {self.index_dir}"
            else:
                read_manifest(path).check_model(name, version)  # an index of another version: refused
                self.store, self.path, self.problem = IndexStore.load(path), path, None
                log.info("index %s loaded (%d items, model version %s)", path, len(self.store), version)
        except Exception as e:  # noqa: BLE001 - a refused or broken index: serve without one, say why
            self.store, self.problem = None, str(e)
            log.warning("index refused: %s", e)
        return None if self.store is not None else self._unavailable()

    def _unavailable(self) -> dict[str, Any]:
        return _err(503, "index_unavailable", self.problem or "no index loaded")

    def _loaded(self) -> IndexStore:
        """The index, once ``_sync`` has answered no error."""
        assert self.store is not None, "_sync returned no error, so an index is loaded"
        return self.store

    @_locked
    def info(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        if name and version:
            self._sync(name, version)
        s = self.store
        if s is None:
            return {"loaded": False, "problem": self.problem, "count": 0}
        return {"loaded": True, "path": str(self.path), "count": len(s), "kind": s.vectors.kind,
                "metric": s.manifest.metric, "model": s.manifest.model.model_dump(),
                "collection": s.manifest.collection}

    # ---- queries -------------------------------------------------------------------------
    def _hits(self, pairs: Iterable[tuple[int, float]]) -> list[dict[str, Any]]:
        s = self._loaded()
        return [{"id": s.ids[r], "score": float(sc), "labels": s.meta[r].get("labels")} for r, sc in pairs]

    @_locked
    def keywords(self, concepts: list[str], mode: str, k: int, name: str, version: str) -> dict[str, Any]:
        from deepindex.index.keywords import rank

        if (e := self._sync(name, version)) is not None:
            return e
        s = self._loaded()
        index = {c: i for i, c in enumerate(s.manifest.concepts)}
        rows, scores = rank(s.probs, [index[c] for c in concepts if c in index], k, mode)
        return {"results": self._hits(zip(rows.tolist(), scores.tolist(), strict=True)), "count": len(s)}

    @_locked
    def similar_vector(self, embedding: np.ndarray, k: int, name: str, version: str) -> dict[str, Any]:
        if (e := self._sync(name, version)) is not None:
            return e
        s = self._loaded()
        hits = s.similar(embedding[None, :], k)[0]
        return {"results": self._hits(hits), "metric": s.manifest.metric, "count": len(s)}

    def _row(self, item_id: str, name: str, version: str) -> tuple[int | None, dict[str, Any] | None]:
        """(row of ``item_id``, None) or (None, the error to answer): index in sync, item known."""
        if (e := self._sync(name, version)) is not None:
            return None, e
        row = self._loaded().rows.get(item_id)
        if row is None:
            return None, _err(404, "unknown_item", f"no item {item_id!r} in the index")
        return row, None

    @_locked
    def similar_item(self, item_id: str, k: int, name: str, version: str) -> dict[str, Any]:
        row, e = self._row(item_id, name, version)
        if e is not None:
            return e
        assert row is not None  # _row gives a row or an error
        s = self._loaded()
        hits = s.similar(s.embeddings[row][None, :], k, exclude=[row])[0]
        return {"results": self._hits(hits), "metric": s.manifest.metric, "count": len(s)}

    @_locked
    def get(self, item_id: str, name: str, version: str) -> dict[str, Any]:
        row, e = self._row(item_id, name, version)
        if e is not None:
            return e
        assert row is not None  # _row gives a row or an error
        s = self._loaded()
        return {"id": item_id, "probs": s.probs[row], "concepts": s.manifest.concepts,
                "labels": s.meta[row].get("labels"), "meta": s.meta[row]}

    @_locked
    def thumbnail(self, item_id: str) -> dict[str, Any]:
        """PNG bytes of the item's model-size image (no version check: a picture does not depend on it)."""
        from PIL import Image

        s = self.store
        if s is None:
            return self._unavailable()
        row = s.rows.get(item_id)
        if row is None:
            return _err(404, "unknown_item", f"no item {item_id!r} in the index")
        if s.thumbs is None:
            return _err(404, "no_image", f"the index keeps no image of {item_id!r}")
        t = s.thumbs[row]  # (C, S, S) uint8
        im = Image.fromarray(t[0] if t.shape[0] == 1 else t.transpose(1, 2, 0))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return {"png": buf.getvalue()}

    @_locked
    def add(self, ids: list[str], probs: np.ndarray, embeddings: np.ndarray, thumbs: np.ndarray | None,
            name: str, version: str) -> dict[str, Any]:
        from deepindex.index.store import DuplicateItem

        if (e := self._sync(name, version)) is not None:
            return e
        s = self._loaded()
        try:
            s.add(ids, probs, embeddings, thumbs, [{"added": True} for _ in ids])
        except DuplicateItem as ex:
            return _err(409, "duplicate_item", str(ex))
        if self.persist:
            assert self.path is not None  # set with the store it was loaded from
            s.save(self.path)  # atomic: a crash leaves the previous complete index
        return {"added": ids, "count": len(s)}
