"""Catching an index up with its collection: the catalogue's changes after the index's ``seq``,
embedded with the index's model version and applied (added items, deleted ones).

One code path for every way an index falls behind: items added or deleted while a new version's
index was being built, while a service was down, or through the service a moment ago.  An item
whose bytes do not decode is applied as a delete (it cannot be found by content), so the index
still moves past it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from deepindex.collection import Change, CollectionStore
from deepindex.data.transforms import UNDECODABLE
from deepindex.index.store import IndexChange, IndexStore

log = logging.getLogger(__name__)

# uint8 model inputs (B, C, S, S) -> {"probs": (B, K), feature: (B, D), ...}
Embedder = Callable[[np.ndarray], dict[str, np.ndarray]]
Progress = Callable[[int, int], None]  # (changes applied, changes known to be pending)

BATCH = 256


def to_index_changes(changes: Sequence[Change], store: CollectionStore, index: IndexStore,
                     embed: Embedder) -> list[IndexChange]:
    """Catalogue changes -> index changes: adds read back from the blob store and embedded in one batch."""
    from deepindex.index.embed import image_bytes_to_unit

    m = index.manifest
    shape = (m.channels, m.image_size, m.image_size)
    adds = [c for c in changes if c.op == "add"]
    pixels = np.zeros((len(adds), *shape), dtype=np.uint8)
    ok = np.ones(len(adds), dtype=bool)
    for j, c in enumerate(adds):
        # Read outside the decode's guard: a blob store that fails to answer (an S3 5xx, an NFS EIO: OSErrors
        # too) fails the catch-up, which is retried; caught with the decode's errors, the item was applied
        # as a delete and the index's seq moved past it for good (found on review).
        data = store.image_by_hash(c.item.content_hash)
        try:
            pixels[j] = image_bytes_to_unit(data, m.image_size, m.channels, m.preset)
        except UNDECODABLE as e:  # what PIL raises on bytes it cannot read
            ok[j] = False
            log.warning("index %s: item %s does not decode (%s); not indexed", index.path, c.item.id, e)
    out = embed(pixels) if len(adds) else {}
    row = {c.seq: j for j, c in enumerate(adds)}
    result = []
    for c in changes:
        r = row.get(c.seq)
        if r is None or not ok[r]:  # a delete, or an add whose bytes do not decode
            result.append(IndexChange(c.seq, "delete", c.item.id))
        else:
            result.append(IndexChange(c.seq, "add", c.item.id, list(c.item.tags), out["probs"][r],
                                      {f: out[f][r] for f in m.features}))
    return result


def catch_up(index: IndexStore, store: CollectionStore, embed: Embedder, upto: int | None = None,
             progress: Progress | None = None) -> int:
    """Apply every catalogue change after ``index.seq`` (up to ``upto``, default the head as it is when
    each batch is read); returns how many were applied.  Compacts the index when its delta has grown."""
    applied = 0
    head = store.head()
    if index.seq > head:
        # Past the collection's last change: the index was built from another catalogue (a move to
        # PostgreSQL, one restored from a backup, another collection of the name).  Catching up did
        # nothing, and the index served another collection's items (found on review).
        raise ValueError(f"index {index.path or ''}: built up to change {index.seq} of {index.manifest.collection}, "
                         f"but {store.name} has {head} changes: it was built from another catalogue; "
                         "build it again (deepindex index build)")
    made = index.manifest.source.get("collection_created_at")
    if made is not None and abs(float(made) - store.created_at) > 1e-6:
        # Another collection of the name (its catalogue deleted and the images imported again, a move to
        # PostgreSQL, another --catalogue): with a head at or past the index's seq, it was caught up as if it
        # were this one, serving the old items and never indexing the new ones up to that seq (found on review).
        raise ValueError(f"index {index.path or ''}: built from another collection named {store.name} (created "
                         f"{_when(float(made))}; this one {_when(store.created_at)}): build it again "
                         "(deepindex index build)")
    target = head if upto is None else upto
    while index.seq < target:
        changes = store.changes(after=index.seq, upto=target, limit=BATCH)
        if not changes:
            break
        applied += index.apply(to_index_changes(changes, store, index, embed))
        if progress is not None:
            progress(applied, applied + max(0, target - index.seq))
        if upto is None:
            target = max(target, store.head())
    index.compact()
    return applied


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
