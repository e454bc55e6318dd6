"""Re-running an import (found on review): it brought back every item the user had deleted since (only
live rows counted as there), and a manifest with corrected tags changed nothing without saying so.
Now an import skips an id whose latest change is a delete and counts it (``--readd-deleted`` brings
it back), and counts the items already there with other tags (``--update-tags`` changes them: a delete
and an add of the same bytes in the change log, so an index catches up with the new tags)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepindex.collection import CollectionStore
from deepindex.collection.imports import import_digit_scenes, import_manifest
from support import collection_cli, png_bytes

_run = collection_cli
pytestmark = pytest.mark.usefixtures("no_settings_env")


def _photos(folder: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(png_bytes(rng.random((8, 8))))


def test_a_rerun_folder_import_does_not_bring_back_a_deleted_photo(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "photos"
    _photos(root / "cat", ["p1.png", "p2.png", "p3.png"])
    rc, out, err = _run(capsys, "import", "photos", "--folder", str(root))
    assert rc == 0 and out.startswith("imported 3 items into photos"), (out, err)
    rc, out, err = _run(capsys, "rm", "photos", "cat/p1.png")
    assert rc == 0, err
    _photos(root / "cat", ["p4.png", "p5.png"], seed=1)  # new photos to add: the import is run again
    rc, out, err = _run(capsys, "import", "photos", "--folder", str(root))
    assert rc == 0 and out.startswith("imported 2 items into photos"), (out, err)
    assert "(2 already there; 1 deleted since, not re-added (--readd-deleted adds them))" in out, out
    assert "photos now holds 4 items" in out, out
    store = CollectionStore.open("photos")
    assert store.get("cat/p1.png") is None and store.count() == 4
    assert "cat/p1.png" not in {it.id for it in store.snapshot()}
    head = store.head()
    rc, out, _ = _run(capsys, "import", "photos", "--folder", str(root), "--json")
    doc = json.loads(out)
    assert (doc["added"], doc["existing"], doc["deleted_since"], doc["head"]) == (0, 4, 1, head), doc
    # Asked for, the deleted photo comes back (a new change); an explicit add of a deleted id always did.
    rc, out, err = _run(capsys, "import", "photos", "--folder", str(root), "--readd-deleted")
    assert rc == 0 and out.startswith("imported 1 items") and "deleted since" not in out, (out, err)
    back = store.get("cat/p1.png")
    assert back is not None and back.seq == head + 1 and store.count() == 5


def test_manifest_and_digit_scene_imports_skip_deleted_ids_an_explicit_add_does_not(tmp_path: Path) -> None:
    _photos(tmp_path, ["a.png", "b.png", "c.png"])
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,tags\na.png,cat\nb.png,dog\n")
    s = CollectionStore.open("m")
    assert import_manifest(s, manifest).added == 2
    s.delete("a.png")
    manifest.write_text("path,tags\na.png,cat\nb.png,dog\nc.png,cat\n")
    res = import_manifest(s, manifest)
    assert (res.added, res.existing, res.deleted_since) == (1, 1, 1) and s.get("a.png") is None
    res = import_manifest(s, manifest, readd_deleted=True)
    assert (res.added, res.existing, res.deleted_since) == (1, 2, 0) and s.get("a.png") is not None

    g = CollectionStore.open("scenes")
    import_digit_scenes(g, size=5, seed=0)
    g.delete("scene-000002")
    res = import_digit_scenes(g, size=6, seed=0)
    assert (res.added, res.existing, res.deleted_since) == (1, 4, 1) and g.get("scene-000002") is None
    assert g.count() == 5
    # An explicit add (the CLI's `collection add`, the service's POST) of a deleted id adds it again.
    data = g.image_by_hash(g.get("scene-000002", include_deleted=True).content_hash)  # type: ignore[union-attr]
    bulk = g.add_bulk([("scene-000002", data, ["2"], {})], source="upload", on_conflict="error")
    assert (bulk.added, bulk.deleted_since) == (1, 0) and g.get("scene-000002") is not None


def test_a_manifest_with_other_tags_is_counted_and_update_tags_changes_them(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _photos(tmp_path, ["a.png", "b.png"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.png", "tags": ["cat"], "split": "train"}) + "\n"
                        + json.dumps({"path": "b.png", "tags": ["dog"], "split": "test"}) + "\n")
    rc, out, err = _run(capsys, "import", "pets", "--manifest", str(manifest))
    assert rc == 0 and out.startswith("imported 2 items"), (out, err)
    store = CollectionStore.open("pets")
    head = store.head()
    cleaned = tmp_path / "cleaned_manifest.jsonl"  # as an audit writes it: a's label corrected
    cleaned.write_text(json.dumps({"path": "a.png", "tags": ["dog"], "split": "train"}) + "\n"
                       + json.dumps({"path": "b.png", "tags": ["dog"], "split": "test"}) + "\n")
    rc, out, err = _run(capsys, "import", "pets", "--manifest", str(cleaned))
    assert rc == 0 and out.startswith("imported 0 items"), (out, err)
    assert "(2 already there; 1 of them with other tags: tags not changed, --update-tags changes them)" in out, out
    assert store.get("a.png").tags == ["cat"] and store.head() == head  # type: ignore[union-attr]
    rc, out, _ = _run(capsys, "import", "pets", "--manifest", str(cleaned), "--json")
    assert (json.loads(out)["other_tags"], json.loads(out)["retagged"]) == (1, 0), out

    rc, out, err = _run(capsys, "import", "pets", "--manifest", str(cleaned), "--update-tags")
    assert rc == 0 and out.startswith("imported 0 items"), (out, err)
    assert "(1 already there; tags updated on 1 item already there)" in out and "pets now holds 2 items" in out, out
    a = store.get("a.png")
    assert a is not None and a.tags == ["dog"] and a.meta["split"] == "train" and a.meta["filename"] == "a.png"
    # In the change log: the row with the old tags deleted, one with the new added (the same bytes), so an
    # index catching up with changes() replaces the item's labels.
    changes = store.changes(after=head)
    assert [(c.seq, c.op, c.item.id, c.item.tags) for c in changes] == [
        (head + 1, "delete", "a.png", ["cat"]), (head + 2, "add", "a.png", ["dog"])]
    assert changes[0].item.content_hash == changes[1].item.content_hash == a.content_hash
    assert {it.id: it.tags for it in store.snapshot()} == {"a.png": ["dog"], "b.png": ["dog"]}
    assert {it.id: it.tags for it in store.snapshot(head)} == {"a.png": ["cat"], "b.png": ["dog"]}
    assert store.count() == 2 and store.tags() == ["dog"] and store.verify()["ok"]
    assert store.image("a.png") == (tmp_path / "a.png").read_bytes()
    # Done once: a re-run changes nothing.
    rc, out, _ = _run(capsys, "import", "pets", "--manifest", str(cleaned), "--update-tags")
    assert rc == 0 and "(2 already there)" in out and store.head() == head + 2, out


def test_add_bulk_retag_and_skip_deleted_on_both_catalogues(catalogue_url: str, tmp_path: Path) -> None:
    """The store's side, on SQLite and PostgreSQL: a retag is a tombstone and a row in one transaction (the
    one-live-row-per-id index holds), the live count stays, and a deleted id is skipped only when asked."""
    s = CollectionStore.open("c", catalogue_url=catalogue_url, blobs_url=str(tmp_path / "blobs"))
    s.add_bulk([("a", b"A", ["x"], {"k": 1}), ("b", b"B", ["y"], {}), ("c", b"C", [], {})], source="import")
    s.delete("c")
    head = s.head()
    entries = [("a", b"A", ["z", "x"], {"split": "val"}), ("b", b"B", ["y"], {}), ("c", b"C", [], {}),
               ("d", b"D", ["w"], {})]
    kept = s.add_bulk(entries, source="import", deleted="skip")
    assert (kept.added, kept.existing, kept.other_tags, kept.retagged, kept.deleted_since) == (1, 2, 1, 0, 1)
    assert s.get("a").tags == ["x"] and s.get("c") is None and s.head() == head + 1  # type: ignore[union-attr]
    head = s.head()
    res = s.add_bulk(entries, source="import", deleted="skip", retag=True)
    assert (res.added, res.existing, res.other_tags, res.retagged, res.deleted_since) == (0, 2, 0, 1, 1)
    a = s.get("a")
    assert a is not None and a.tags == ["z", "x"] and a.meta == {"k": 1, "split": "val"} and a.seq == head + 2
    assert [(c.op, c.item.id) for c in s.changes(head)] == [("delete", "a"), ("add", "a")]
    assert s.count() == 3 and s.verify()["ok"] and s.head() == head + 2
    readd = s.add_bulk(entries, source="import", deleted="readd", retag=True)
    assert (readd.added, readd.existing, readd.retagged, readd.deleted_since) == (1, 3, 0, 0)
    assert s.get("c") is not None and s.count() == 4 and s.verify()["ok"]


def test_an_index_catching_up_takes_the_updated_tags(tmp_path: Path) -> None:
    """The tags an ``--update-tags`` import changes reach an index by the one path every change takes:
    catch-up from ``changes()`` (the embedder is a stand-in: this is about which changes apply)."""
    from deepindex.index.catchup import catch_up
    from deepindex.index.store import IndexStore
    from deepindex.index.vectors import VectorConfig

    def embed(pixels: np.ndarray) -> dict[str, np.ndarray]:
        n = len(pixels)
        return {"probs": np.full((n, 2), 0.5, np.float32), "penultimate": np.ones((n, 4), np.float32)}

    _photos(tmp_path, ["a.png", "b.png"])
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,tags\na.png,cat\nb.png,dog\n")
    store = CollectionStore.open("pets")
    import_manifest(store, manifest)
    index = IndexStore.create(model={"uri": "m", "name": "m", "version": "1"}, collection="pets", seq=0,
                              concepts=["cat", "dog"], ids=[], labels=[], probs=np.zeros((0, 2), np.float32),
                              features={"penultimate": np.zeros((0, 4), np.float32)},
                              vector_cfg=VectorConfig(kind="flat"), default_feature="penultimate", image_size=8,
                              channels=1, multilabel=True)
    catch_up(index, store, embed)
    assert index.labels[index.rows["a.png"]] == ["cat"]
    manifest.write_text("path,tags\na.png,dog\nb.png,dog\n")
    assert import_manifest(store, manifest, update_tags=True).retagged == 1
    assert catch_up(index, store, embed) == 2 and index.seq == store.head()
    assert index.labels[index.rows["a.png"]] == ["dog"] and index.alive[index.rows["a.png"]]
    assert sorted(i for i, r in index.rows.items() if index.alive[r]) == ["a.png", "b.png"]
