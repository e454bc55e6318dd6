"""The service opens a collection with the collection's own blob store unless told otherwise."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.schemas import ServeArgs


@pytest.mark.timeout(30)
def test_a_service_given_no_blob_store_writes_to_the_collections_own(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection imported with `--blobs X`, served with no blobs_url: the service's default folder was
    another store, so its adds split the collection's images (and, since writes to another store are refused,
    every HTTP add failed).  It opens the store the collection recorded; a blobs_url or DEEPINDEX_BLOBS_URL
    given still wins."""
    from deepindex.collection import BlobStoreMismatch, CollectionStore
    from deepindex.collection.imports import png_bytes

    monkeypatch.delenv("DEEPINDEX_BLOBS_URL", raising=False)
    own = tmp_path / "own-blobs"
    CollectionStore.open("photos", blobs_url=str(own)).add("a", png_bytes(np.zeros((8, 8), np.uint8)))
    args = ServeArgs(model=str(tmp_path / "m.pt"), collection="photos").resolved()
    assert args.blobs_url is None
    store = CollectionStore.open(args.collection, args.catalogue_url, args.blobs_url)  # as IndexServer opens it
    store.add("b", png_bytes(np.ones((8, 8), np.uint8)))
    assert store.blobs_mismatch is None and len(list(own.rglob("*"))) > 2  # both images in the one store
    monkeypatch.setenv("DEEPINDEX_BLOBS_URL", str(tmp_path / "elsewhere"))
    args = ServeArgs(model=str(tmp_path / "m.pt"), collection="photos").resolved()
    assert args.blobs_url == str(tmp_path / "elsewhere")
    with pytest.raises(BlobStoreMismatch):
        CollectionStore.open(args.collection, args.catalogue_url, args.blobs_url).add(
            "c", png_bytes(np.full((8, 8), 2, np.uint8)))
