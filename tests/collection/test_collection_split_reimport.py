"""Found on review: re-importing a manifest whose split column changed neither applied the new split nor
said so, even with ``--update-tags`` (only tags were compared), and a retrieval evaluation reads the split
from the items' meta.  Now another split is counted as other tags are (``other_split``), and
``--update-tags`` applies it (``resplit``): a delete and an add of the same bytes in the change log."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepindex.collection import CollectionStore
from deepindex.collection.imports import import_manifest
from support import collection_cli, png_bytes

pytestmark = pytest.mark.usefixtures("no_settings_env")


def _photos(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        (root / name).write_bytes(png_bytes(rng.random((8, 8))))


def test_a_changed_split_is_counted_and_update_tags_applies_it(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    _photos(tmp_path)
    manifest = tmp_path / "tags.csv"
    manifest.write_text("path,tags,split\na.png,cat,train\nb.png,dog,test\nc.png,cat,val\n")
    rc, out, err = collection_cli(capsys, "import", "pets", "--manifest", str(manifest))
    assert rc == 0 and out.startswith("imported 3 items"), (out, err)
    store = CollectionStore.open("pets")
    head = store.head()
    manifest.write_text("path,tags,split\na.png,cat,test\nb.png,dog,test\nc.png,cat,val\n")  # a: train -> test

    res = import_manifest(store, manifest)  # what `collection import` runs and summarises
    assert (res.added, res.existing, res.other_tags, res.other_split, res.retagged, res.resplit) == (0, 3, 0, 1, 0, 0)
    rc, out, err = collection_cli(capsys, "import", "pets", "--manifest", str(manifest))
    assert rc == 0 and out.startswith("imported 0 items"), (out, err)
    assert "1 of them with another split: split not changed, --update-tags changes it" in out, out  # said so
    a = store.get("a.png")
    assert a is not None and a.meta["split"] == "train" and store.head() == head  # counted, not changed

    res = import_manifest(store, manifest, update_tags=True)
    assert (res.existing, res.other_tags, res.other_split, res.retagged, res.resplit) == (2, 0, 0, 0, 1)
    a = store.get("a.png")
    assert a is not None and a.meta["split"] == "test" and a.tags == ["cat"] and a.meta["filename"] == "a.png"
    assert [(c.op, c.item.id, c.item.meta.get("split")) for c in store.changes(after=head)] == [
        ("delete", "a.png", "train"), ("add", "a.png", "test")]
    assert store.count() == 3 and store.verify()["ok"]
    assert import_manifest(store, manifest, update_tags=True).resplit == 0  # done once: a re-run changes nothing

    # Tags and split both changed, through the CLI's --update-tags: one rewrite, both counted.
    head = store.head()
    manifest.write_text("path,tags,split\na.png,cat,test\nb.png,cat,train\nc.png,cat,val\n")
    res = import_manifest(store, manifest)
    assert (res.other_tags, res.other_split) == (1, 1)
    rc, out, err = collection_cli(capsys, "import", "pets", "--manifest", str(manifest), "--update-tags")
    assert rc == 0 and "tags updated on 1 item already there" in out, (out, err)
    assert "split updated on 1 item already there" in out, out
    b = store.get("b.png")
    assert b is not None and b.tags == ["cat"] and b.meta["split"] == "train" and store.head() == head + 2

    # A re-import that gives no split (no column, or an empty cell) leaves the items' split as it is.
    manifest.write_text("path,tags\na.png,cat\nb.png,cat\nc.png,cat\n")
    res = import_manifest(store, manifest, update_tags=True)
    assert (res.existing, res.other_split, res.resplit, res.retagged) == (3, 0, 0, 0)
    assert {it.id: it.meta.get("split") for it in store.snapshot()} == {"a.png": "test", "b.png": "train",
                                                                        "c.png": "val"}


def test_add_bulk_counts_and_applies_another_split(tmp_path: Path) -> None:
    s = CollectionStore.open("c", catalogue_url=f"sqlite:///{tmp_path / 'catalogue.db'}",
                             blobs_url=str(tmp_path / "blobs"))
    s.add_bulk([("a", b"A", ["x"], {"split": "train", "k": 1}), ("b", b"B", ["y"], {})], source="import")
    entries = [("a", b"A", ["x"], {"split": "test"}), ("b", b"B", ["y"], {"split": "val"})]
    res = s.add_bulk(entries, source="import")
    assert (res.existing, res.other_tags, res.other_split) == (2, 0, 2)  # no split before is another split too
    res = s.add_bulk(entries, source="import", retag=True)
    assert (res.existing, res.other_split, res.retagged, res.resplit) == (0, 0, 0, 2)
    assert s.get("a").meta == {"split": "test", "k": 1} and s.get("b").meta == {"split": "val"}  # type: ignore[union-attr]
    assert s.count() == 2 and s.verify()["ok"]
