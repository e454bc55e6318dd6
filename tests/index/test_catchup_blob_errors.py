"""Catch-up and the blob store: bytes that do not decode are skipped (an item no model can see), but a
blob store that fails to answer fails the catch-up, which is retried, and loses nothing.

The embedder is a stand-in (fixed descriptors): these tests are about which changes catch-up applies,
not what a model makes of the pixels."""
from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepindex.collection import CollectionStore
from deepindex.collection.blobs import BlobStore
from deepindex.index.catchup import catch_up
from deepindex.index.store import IndexStore
from deepindex.index.vectors import VectorConfig
from support import png_bytes

pytestmark = pytest.mark.timeout(60)


def _embed(pixels: np.ndarray) -> dict[str, np.ndarray]:
    n = len(pixels)
    return {"probs": np.full((n, 1), 0.5, np.float32), "penultimate": np.ones((n, 4), np.float32)}


def _empty_index(store: CollectionStore, where: Path) -> IndexStore:
    index = IndexStore.create(model={"uri": "m", "name": "m", "version": "1"}, collection=store.name,
                              seq=store.head(), concepts=["a"], ids=[], labels=[], probs=np.zeros((0, 1), np.float32),
                              features={"penultimate": np.zeros((0, 4), np.float32)},
                              vector_cfg=VectorConfig(kind="flat"), default_feature="penultimate", image_size=8,
                              channels=1, multilabel=True)
    index.save(str(where))
    return index


def _two_items_after_the_index(tmp_path: Path) -> tuple[CollectionStore, IndexStore, Any]:
    """A collection, its empty index, then two items added: (store, index, the second item)."""
    store = CollectionStore.open("c")
    index = _empty_index(store, tmp_path / "ix")
    store.add("cat-1", png_bytes(np.full((8, 8), 0.1)))
    store.add("cat-2", png_bytes(np.full((8, 8), 0.2)))
    second = store.get("cat-2")
    assert second is not None
    return store, index, second


def test_a_blob_store_that_fails_to_answer_fails_the_catch_up_and_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, index, flaky = _two_items_after_the_index(tmp_path)
    real_get = BlobStore.get

    def get(self: BlobStore, h: str, *a: Any, **k: Any) -> bytes:  # an S3 503, an NFS EIO: OSErrors
        if h == flaky.content_hash:
            raise OSError(errno.EIO, "Input/output error")
        return real_get(self, h, *a, **k)

    monkeypatch.setattr(BlobStore, "get", get)
    with pytest.raises(OSError, match="Input/output error"):
        catch_up(index, store, _embed)
    assert index.seq < store.head()  # not past the item it could not read
    monkeypatch.setattr(BlobStore, "get", real_get)  # the store answers again: the retry takes it
    catch_up(index, store, _embed)
    assert sorted(index.rows) == ["cat-1", "cat-2"] and index.seq == store.head()


def test_bytes_that_do_not_decode_are_skipped_and_the_catch_up_goes_on(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store, index, broken = _two_items_after_the_index(tmp_path)
    real_get = BlobStore.get
    monkeypatch.setattr(BlobStore, "get", lambda self, h, *a, **k: b"\x89PNG\r\n\x1a\n cut short"
                        if h == broken.content_hash else real_get(self, h, *a, **k))
    assert catch_up(index, store, _embed) == 2
    assert sorted(index.rows) == ["cat-1"] and index.seq == store.head()
