"""The index deployment: the collection's writer, its indexes, and the model rollover.

One replica.  It owns every write to the collection (``POST``/``DELETE /v1/items``: the catalogue
row and the bytes are durable before it answers, then every loaded index applies the change) and
the pair being served: a model version and that version's index of the collection.

Rollover (``serving/rollover.py`` decides when): when the model URI the service follows
(``models:/NAME@champion``) resolves to a new version, the new version's index is built from the
collection by itself (Ray Data, on this cluster, sized to its free CPUs), loaded, and caught up with
the changes made meanwhile, while the old pair keeps answering.  Then, under the write lock (no add
can slip between), the serving pair becomes the new one; model replicas follow within a poll (they
ask :meth:`serving` every half second) and the old index stays loaded until they have, so a
response's model version and index version always match.  A rollback (the alias moved back) finds
the old index on disk and only catches it up.  The serving version is kept in ``serving.json`` in
the collection's index folder, so a restarted replica serves the same pair.

A model is its name and version (registry versions restart at 1 for every name): pairs, the model
replicas' reports and the calls that name a model are keyed by both (:class:`serving.rollover.ModelKey`).

Calls return ``{"error": {...}, "status": N}`` rather than raising, so the ingress maps them to HTTP
as they are.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from deepindex.atomic import write_file
from deepindex.checkpoint import LoadedModel
from deepindex.collection import BlobStoreMismatch, CollectionStore, DuplicateItem, UnknownItem
from deepindex.index.store import IndexStore
from serving.reads import WRITER_FILE, index_ref, search
from serving.reads import error as _err
from serving.rollover import ModelKey, Rollover
from serving.schemas import HEALTH_S, ServeArgs

if TYPE_CHECKING:
    from deepindex.index.embed import PixelEmbedder

log = logging.getLogger(__name__)

MODEL_POLL_S = 0.5  # how often model replicas confirm the version they serve


@dataclass
class Pair:
    """A model version with its index of the collection (and the model itself, for embedding changes)."""

    name: str
    version: str
    ref: str  # what loads exactly this version: models:/NAME/VERSION, or the checkpoint path
    index: IndexStore
    lm: LoadedModel

    _embedder: PixelEmbedder | None = field(default=None, init=False, repr=False)

    def embed(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The index's feature points of ``pixels`` (uint8 model inputs), from the graph the model
        replicas serve (built on first use, kept with the pair)."""
        if self._embedder is None:
            from deepindex.index.embed import PixelEmbedder

            self._embedder = PixelEmbedder(self.lm, list(self.index.manifest.features))
        return self._embedder(pixels)

    def ref_dict(self) -> dict[str, Any]:
        return index_ref(self.index)


@serve.deployment(name="IndexService", num_replicas=1, health_check_period_s=HEALTH_S, max_ongoing_requests=256)
class IndexServer:
    def __init__(self, args: dict[str, Any]):
        from serving.logs import adopt_serve_logging

        adopt_serve_logging()
        self.args = ServeArgs.model_validate(args)
        a = self.args
        self.store = CollectionStore.open(a.collection, a.catalogue_url, a.blobs_url)
        self.pairs: dict[ModelKey, Pair] = {}  # loaded, by model (name, version)
        self.serving: ModelKey | None = None
        self.model_reports: dict[str, tuple[ModelKey, float]] = {}  # model replica -> (its model, when)
        self._write = threading.RLock()  # catalogue writes, index changes and the switch, one at a time
        self.rollover = Rollover(self)
        # Ingress replicas answer searches from copies of the served index in this folder (serving/reads.py)
        # when they find this nonce in it, so only where they share this replica's disk.
        self.nonce = uuid.uuid4().hex
        self._claim()
        # The saved pair is loaded before this replica takes requests (a restart answers at once with
        # what it served), then the rollover loop runs in the background.
        self.rollover.restore()
        self.rollover.start()

    def check_health(self) -> None:
        if not self.rollover.alive():
            raise RuntimeError("the rollover thread died")

    # ---- the serving pair ----------------------------------------------------------------------
    def serving_ref(self) -> dict[str, Any]:
        """What the model replicas serve: ``{"version", "ref", "name"}`` (None while nothing is chosen)."""
        return self.rollover.model_target()

    def report_model(self, replica: str, version: str, name: str | None = None) -> dict[str, Any]:
        """A model replica says which model (``name``, ``version``) it serves (every poll); answers what it
        should serve.  It reported the version alone, and a replica still on deepindex version 1 held
        nothing once photos version 1 was served (found on review)."""
        self.model_reports[replica] = (self._key(version, name), time.monotonic())
        return self.rollover.model_target()

    def model_versions(self, within_s: float = 3 * MODEL_POLL_S + 2) -> dict[str, ModelKey]:
        """The model (name, version) each model replica heard from lately serves (a stopped one drops out)."""
        now = time.monotonic()
        return {r: k for r, (k, t) in list(self.model_reports.items()) if now - t <= within_s}

    def _key(self, version: str, name: str | None) -> ModelKey:
        """The model ``name`` ``version``; a caller that names no model (``version`` alone, as a client of the
        handle may): the loaded pair of that version, the served one first."""
        if name is not None:
            return ModelKey(name, version)
        serving = self.serving
        if serving is not None and serving.version == version:
            return serving
        return next((k for k in list(self.pairs) if k.version == version), ModelKey(None, version))

    def _pair(self, version: str | None, name: str | None = None) -> tuple[Pair | None, dict[str, Any] | None]:
        """The loaded pair of model ``name`` ``version`` (no version: the served one), or a 503."""
        key = self._key(version, name) if version else self.serving
        pair = self.pairs.get(key) if key is not None else None
        if pair is None:
            what = (f"model {key.name} version {key.version}" if key is not None and key.name
                    else f"model version {key.version if key is not None else None}")
            why = self.rollover.problem() or f"no index of {self.args.collection} for {what} is loaded"
            return None, _err(503, "index_unavailable", why)
        return pair, None

    # ---- reads ------------------------------------------------------------------------------------
    def info(self, version: str | None = None, name: str | None = None) -> dict[str, Any]:
        """The index of model ``name`` ``version`` (no version: the served one).  ``serving``: the served
        version, ``serving_name`` its model's name."""
        pair, _ = self._pair(version, name)
        served = self.serving
        out: dict[str, Any] = {"collection": self.args.collection, "serving": served.version if served else None,
                               "serving_name": served.name if served else None,
                               "rollover": self.rollover.status(), "loaded": pair is not None,
                               "head": self.store.head(), "items": self.store.count(), "pid": os.getpid()}
        if pair is None:
            out.update(problem=self.rollover.problem() or "no index loaded", count=0)
            return out
        m = pair.index.manifest
        spec = m.features[m.default_feature]
        out.update(path=str(pair.index.path), count=len(pair.index), seq=pair.index.seq,
                   kind=spec.kind, metric=spec.default_query_metric, features=list(m.features),
                   model={"name": pair.name, "version": pair.version}, index=pair.ref_dict(),
                   memory_bytes=pair.index.memory_bytes())
        return out

    def query_info(self, version: str | None = None, name: str | None = None) -> dict[str, Any]:
        """What a query of model ``name`` ``version``'s index may name: its features (each with the metrics
        it answers, the default first), the default feature and the concepts (``min_prob.<concept>``)."""
        pair, e = self._pair(version, name)
        if e is not None:
            return e
        assert pair is not None
        m = pair.index.manifest
        return {"name": pair.name, "version": pair.version,
                "features": {k: list(v) for k, v in pair.index.query_features().items()},
                "default_feature": m.default_feature, "concepts": list(m.concepts), "multilabel": m.multilabel}

    def query(self, version: str, spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        """One search (:class:`deepindex.index.query.Query` fields in ``spec``) on model ``name``
        ``version``'s index: a page of hits, the next cursor, and the descriptor and metric used."""
        pair, e = self._pair(version, name)
        if e is not None:
            return e
        assert pair is not None
        return search(pair.index, spec)

    def reader(self) -> dict[str, Any]:
        """What an ingress replica checks before it answers searches from its own copy of the served
        index: the nonce this replica wrote into ``dir`` (``serving/reads.py``)."""
        self._claim()
        return {"nonce": self.nonce, "dir": str(self.rollover.dir)}

    def _claim(self) -> None:
        """This replica's nonce in the index folder, written again if another writer (a second app on
        the same folder) replaced it: its ingress replicas then answer from the index replica."""
        path = self.rollover.dir / WRITER_FILE
        try:
            if json.loads(path.read_text()).get("nonce") == self.nonce:
                return
        except (OSError, ValueError, AttributeError):
            pass
        write_file(path, json.dumps({"nonce": self.nonce, "pid": os.getpid()}))

    def get(self, item_id: str, name: str, version: str) -> dict[str, Any]:
        """The item as model ``name`` ``version``'s index holds it (its name was ignored: found on review)."""
        pair, e = self._pair(version, name)
        if e is not None:
            return e
        assert pair is not None
        got = pair.index.item(item_id)
        try:
            item = self.store.get(item_id)
        except ValueError:  # an id that cannot exist (the collection's id rules): not found
            item = None
        if got is None or item is None:
            return _err(404, "unknown_item", f"no item {item_id!r} in the collection")
        _, probs, _ = got
        return {"id": item_id, "probs": probs, "concepts": pair.index.manifest.concepts, "labels": item.tags,
                "meta": {**item.meta, "source": item.source, "added_at": item.added_at, "seq": item.seq,
                         "content_hash": item.content_hash, "bytes": item.size},
                "index": pair.ref_dict()}

    # ---- writes ----------------------------------------------------------------------------------------
    def add(self, items: list[tuple[str, bytes, list[str]]], source: str = "upload") -> dict[str, Any]:
        """Add items: durable in the collection first, then in every loaded index (the serving pair,
        and a rollover's next one), so a search of either version sees them on return."""
        # All or nothing: every id, tag and conflict is checked before a byte is written (found on review:
        # stored one by one, a conflict on the second item answered 409 with the first already stored, and
        # no index caught up with it).  Whatever was committed is indexed before the answer, even an error.
        with self._write:
            head = self.store.head()
            refused = None
            try:
                res = self.store.add_bulk([(i, d, t, {}) for i, d, t in items], source=source, on_conflict="error")
            except BlobStoreMismatch as ex:  # the service's settings, not the client's request: not a 4xx
                refused = _err(503, "collection_unavailable", str(ex))
            except DuplicateItem as ex:
                refused = _err(409, "duplicate_item", str(ex))
            except ValueError as ex:
                refused = _err(400, "bad_item", str(ex))
            seq = self.store.head()
            if seq > head:
                self._sync_all(seq)  # an index's failure here is not the client's: it is not a 4xx
            if refused is not None:
                return refused
        added = [it.id for it in res.items if it.seq > head]
        existing = [it.id for it in res.items if it.seq <= head]
        return {"added": added, "existing": existing, "seq": seq, "count": self.store.count(),
                "index": self._serving_dict()}

    def delete(self, item_id: str) -> dict[str, Any]:
        with self._write:
            try:
                it = self.store.delete(item_id)
            except (UnknownItem, ValueError):  # ValueError: an id that cannot exist
                return _err(404, "unknown_item", f"no item {item_id!r} in the collection")
            self._sync_all(it.deleted_seq or self.store.head())  # an index's failure is not a 404
        return {"deleted": item_id, "seq": it.deleted_seq, "count": self.store.count(), "index": self._serving_dict()}

    def _sync_all(self, upto: int) -> None:
        from deepindex.index.catchup import catch_up

        for pair in list(self.pairs.values()):
            catch_up(pair.index, self.store, pair.embed, upto=upto)

    def _serving_dict(self) -> dict[str, Any] | None:
        pair = self.pairs.get(self.serving) if self.serving is not None else None
        return pair.ref_dict() if pair is not None else None

    def image(self, item_id: str) -> dict[str, Any]:
        try:
            return {"bytes": self.store.image(item_id)}
        except (UnknownItem, ValueError):  # ValueError: an id that cannot exist
            return _err(404, "unknown_item", f"no item {item_id!r} in the collection")
