"""Which blob store a collection is opened with (found on review): opened with another than its own, a
collection only warned, and its writes went to the other store, so its bytes were split across two; a
check of its own store then found blobs missing, and an index build failed on them.  Now no store
given means the collection's own (recorded when it was created), and another given explicitly is
read from with a warning, never written to."""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import update

from deepindex.collection import CollectionStore, list_collections
from deepindex.collection.store import BlobStoreMismatch
from support import collection_cli, png_bytes

_run = collection_cli
pytestmark = pytest.mark.usefixtures("no_settings_env")


def _blob_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and len(p.name) == 64]


def test_without_blobs_a_collection_uses_its_own_store_and_another_store_is_refused_for_writes(
        tmp_path: Path, _state_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    images = {}
    for i, name in enumerate(("a", "b", "c")):
        images[name] = tmp_path / f"{name}.png"
        images[name].write_bytes(png_bytes(np.full((8, 8), 0.2 + 0.3 * i)))
    blobs_a, blobs_b = tmp_path / "x" / "blobsA", tmp_path / "x" / "blobsB"

    rc, out, err = _run(capsys, "add", "photos", "a", str(images["a"]), "--blobs", str(blobs_a))
    assert rc == 0 and out.startswith("added a to photos"), (out, err)
    # No --blobs: the collection's own store, not the default folder.
    rc, out, err = _run(capsys, "add", "photos", "b", str(images["b"]))
    assert rc == 0 and out.startswith("added b to photos") and "WARNING" not in err, (out, err)
    assert len(_blob_files(blobs_a)) == 2 and not _blob_files(_state_home / "collections")
    rc, out, err = _run(capsys, "check", "photos", "--blobs", str(blobs_a))
    assert rc == 0 and "2 rows, every blob present and intact" in out, (out, err)
    rc, out, err = _run(capsys, "check", "photos")
    assert rc == 0 and "every blob present" in out, (out, err)
    assert [c["blobs"] for c in list_collections()] == [str(blobs_a.resolve())]

    # Another store given: the write is refused, one line naming both, before anything is written.
    rc, out, err = _run(capsys, "add", "photos", "c", str(images["c"]), "--blobs", str(blobs_b))
    assert rc == 2 and out == "", (out, err)
    assert err.startswith("deepindex collection: error: collection photos: its images are in "
                          f"{blobs_a.resolve()}, but it was opened with blobs at {blobs_b}: adding refused"), err
    assert err.count("\n") == 1 and f"--blobs {blobs_a.resolve()}" in err, err
    # The same through the environment (as a pod's settings would give it), for an import.
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    (tmp_path / "folder" / "cat" / "c.png").write_bytes(images["c"].read_bytes())
    monkeypatch.setenv("DEEPINDEX_BLOBS_URL", str(blobs_b))
    rc, out, err = _run(capsys, "import", "photos", "--folder", str(tmp_path / "folder"))
    assert rc == 2 and out == "" and err.count("\n") == 1 and "adding refused" in err, (out, err)
    monkeypatch.delenv("DEEPINDEX_BLOBS_URL")
    assert not _blob_files(blobs_b) and CollectionStore.open("photos").count() == 2

    # Reads go on (a copy may be checked): its missing blobs are reported, nothing is written.
    rc, out, err = _run(capsys, "check", "photos", "--blobs", str(blobs_b))
    assert rc == 1 and "2 missing blobs" in out, (out, err)
    other = CollectionStore.open("photos", blobs_url=str(blobs_b))
    with pytest.raises(BlobStoreMismatch, match=r"^collection photos: .*: sweeping refused"):
        other.sweep(older_than_s=0)
    with pytest.raises(BlobStoreMismatch, match="adding refused"):
        other.add("c", images["c"].read_bytes())
    with pytest.raises(BlobStoreMismatch, match="adding refused"):
        other.add_bulk([("c", images["c"].read_bytes(), [], {})], source="upload")
    # A delete writes no bytes: it goes on (the service's DELETE and `collection rm` with any store).
    rc, out, err = _run(capsys, "rm", "photos", "b", "--blobs", str(blobs_b))
    assert rc == 0 and out.startswith("deleted b from photos"), (out, err)
    assert CollectionStore.open("photos").verify()["ok"]


def test_a_relative_blobs_folder_is_recorded_as_the_folder_it_named(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded as typed, a relative folder named another one from any other working directory (a Ray
    worker's, a pod's)."""
    catalogue = f"sqlite:///{tmp_path / 'catalogue.db'}"
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    CollectionStore.open("p", catalogue, blobs_url="rel-blobs").add("a", b"A")
    assert [c["blobs"] for c in list_collections(catalogue)] == [str((tmp_path / "here" / "rel-blobs").resolve())]
    monkeypatch.chdir(tmp_path / "elsewhere")
    s = CollectionStore.open("p", catalogue)
    assert s.image("a") == b"A" and s.blobs_mismatch is None
    s.add("b", b"B")
    assert len(_blob_files(tmp_path / "here" / "rel-blobs")) == 2
    assert not (tmp_path / "elsewhere" / "rel-blobs").exists()


def test_one_folder_named_as_a_path_or_a_file_url_is_one_store(tmp_path: Path) -> None:
    catalogue = f"sqlite:///{tmp_path / 'catalogue.db'}"
    folder = tmp_path / "blobs"
    CollectionStore.open("p", catalogue, str(folder)).add("a", b"A")
    for same in (f"file://{folder}", f"{folder}/", str(tmp_path / "x" / ".." / "blobs")):
        s = CollectionStore.open("p", catalogue, same)
        assert s.blobs_mismatch is None, same
        s.add(f"id-{len(same)}", same.encode())
    assert CollectionStore.open("p", catalogue).verify()["ok"]


def test_a_catalogue_recorded_with_a_relative_folder_is_matched_by_what_the_store_holds(tmp_path: Path) -> None:
    """A catalogue written before folders were recorded absolute holds the folder as it was typed
    (``--blobs blobs``); the service, started elsewhere, names it absolute.  The store given is the
    collection's own when it holds the collection's last bytes; one that does not is refused writes."""
    from deepindex.collection import catalogue as cat

    url = f"sqlite:///{tmp_path / 'catalogue.db'}"
    folder = tmp_path / "repo" / "blobs"
    CollectionStore.open("p", url, str(folder)).add("a", b"A")
    eng = cat.engine_for(url)
    with eng.begin() as conn:
        conn.execute(update(cat.collections).values(blobs_url="blobs"))
    s = CollectionStore.open("p", url, str(folder))
    assert s.blobs_mismatch is None
    s.add("b", b"B")
    other = CollectionStore.open("p", url, str(tmp_path / "empty-blobs"))
    with pytest.raises(BlobStoreMismatch, match=r"^collection p: its images are in 'blobs' \(a relative folder.*"
                                                r"adding refused"):
        other.add("c", b"C")
    assert CollectionStore.open("p", url, str(folder)).count() == 2 and not (tmp_path / "empty-blobs").exists()


def test_a_remote_store_is_opened_from_the_record_without_settings(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod or job without DEEPINDEX_BLOBS_URL reads and writes the bucket the collection was created
    with, not a local folder the other pods never see."""
    catalogue = f"sqlite:///{tmp_path / 'catalogue.db'}"
    remote = f"memory://deepindex-{uuid.uuid4().hex[:8]}/blobs"
    CollectionStore.open("p", catalogue, remote).add("a", b"in the bucket")
    s = CollectionStore.open("p", catalogue)
    assert s.blobs.url == remote and s.image("a") == b"in the bucket"
    s.add("b", b"also there")
    monkeypatch.setenv("DEEPINDEX_BLOBS_URL", remote + "/")  # the same bucket and prefix, as a pod names it
    t = CollectionStore.open("p", catalogue)
    assert t.blobs_mismatch is None and t.image("b") == b"also there" and t.verify()["ok"]
    monkeypatch.setenv("DEEPINDEX_BLOBS_URL", str(tmp_path / "local"))
    with pytest.raises(BlobStoreMismatch, match=f"its images are in {remote}, but it was opened with blobs at"):
        CollectionStore.open("p", catalogue).add("c", b"C")
