"""``deepindex collection import|add``: a command that refuses its arguments creates no collection."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepindex.collection import list_collections
from support import collection_cli, png_bytes

_run = collection_cli


@pytest.mark.parametrize(("argv", "message"), [
    (("--batch-size", "0"), "batch-size: must be >= 1"),
    (("--batch-size", "-3"), "batch-size: must be >= 1"),
    (("--size", "0"), "size: must be >= 1"),
])
def test_a_refused_import_creates_no_collection(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...],
                                                message: str) -> None:
    rc, out, err = _run(capsys, "import", "c4", "--digit-scenes", "--size", "3", *argv)
    assert (rc, out, err) == (2, "", f"deepindex collection: error: {message}\n")
    assert list_collections(None) == []


@pytest.mark.parametrize(("item_id", "tags", "content", "message"), [
    ("bad id", [], "png", "id: 'bad id' must be 1-200 characters"),
    ("", [], "png", "id: '' must be 1-200 characters"),
    ("a/../b", [], "png", "id: 'a/../b' has a '.' or '..' segment"),
    ("ok-1", ["  "], "png", "tags: '  ' is not a non-empty string"),
    ("ok-1", ["x" * 300], "png", "tags: 'xxxx"),
    ("ok-1", [], "empty", "data: empty"),
    ("ok-1", [], "text", "data: not a readable image"),
])
def test_a_refused_add_creates_no_collection(tmp_path: Path, capsys: pytest.CaptureFixture[str], item_id: str,
                                             tags: list[str], content: str, message: str) -> None:
    img = tmp_path / "a.png"
    img.write_bytes({"png": png_bytes(np.eye(8)), "empty": b"", "text": b"not an image"}[content])
    rc, out, err = _run(capsys, "add", "c1", item_id, str(img), *[a for t in tags for a in ("--tag", t)])
    assert rc == 2 and out == "", (out, err)
    assert err.startswith(f"deepindex collection: error: {message}") and err.count("\n") == 1, err
    assert list_collections(None) == []
    # The same collection, once the add is right, is created and holds the item.
    rc, out, err = _run(capsys, "add", "c1", "ok-2", str(tmp_path / "b.png"))
    assert rc == 2 and "no such file" in err and list_collections(None) == []
    (tmp_path / "b.png").write_bytes(png_bytes(np.eye(8)))
    rc, out, err = _run(capsys, "add", "c1", "ok-2", str(tmp_path / "b.png"), "--tag", " seven ")
    assert rc == 0 and out.startswith("added ok-2 to c1 (seq 1"), (out, err)
    assert [(c["name"], c["count"]) for c in list_collections(None)] == [("c1", 1)]


def _split_folders(root: Path) -> None:
    """``train/`` and ``test/`` of the same layout, other images: the same relative paths."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "1.png").write_bytes(png_bytes(rng.random((8, 8))))


def test_an_id_prefix_takes_a_second_folder_whose_paths_repeat_the_first(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from deepindex.collection import CollectionStore

    _split_folders(tmp_path)
    rc, out, _ = _run(capsys, "import", "pets", "--folder", str(tmp_path / "train"))
    assert rc == 0 and out.startswith("imported 2 items into pets"), out
    rc, out, err = _run(capsys, "import", "pets", "--folder", str(tmp_path / "test"))
    assert rc == 0 and "imported 0 items" in out and ", 2 skipped)" in out, out
    assert "cat/1.png: id: 'cat/1.png' already exists in pets with other bytes" in err
    assert "--id-prefix" in err.splitlines()[-1], err  # the way out, named
    rc, out, err = _run(capsys, "import", "pets", "--folder", str(tmp_path / "test"), "--id-prefix", "test/")
    assert rc == 0 and out.startswith("imported 2 items into pets") and "pets now holds 4 items" in out, (out, err)
    store = CollectionStore.open("pets")
    item = store.get("test/dog/1.png")
    assert item is not None and item.tags == ["dog"] and item.meta["filename"] == "dog/1.png"
    assert store.image("test/dog/1.png") == (tmp_path / "test" / "dog" / "1.png").read_bytes()
    assert store.image("dog/1.png") == (tmp_path / "train" / "dog" / "1.png").read_bytes()
    # A re-run with the prefix finds its items there; the manifest importer takes the prefix the same way.
    rc, out, _ = _run(capsys, "import", "pets", "--folder", str(tmp_path / "test"), "--id-prefix", "test/")
    assert rc == 0 and "imported 0 items" in out and "(2 already there)" in out, out
    (tmp_path / "m.csv").write_text("path,tags\ntest/cat/1.png,cat\n")
    rc, out, _ = _run(capsys, "import", "pets", "--manifest", str(tmp_path / "m.csv"), "--id-prefix", "m:")
    assert rc == 0 and out.startswith("imported 1 items") and store.get("m:test/cat/1.png") is not None, out


def test_digit_scenes_of_another_seed_go_in_under_a_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    from deepindex.collection import CollectionStore

    assert _run(capsys, "import", "scenes", "--digit-scenes", "--size", "5")[0] == 0
    rc, out, _ = _run(capsys, "import", "scenes", "--digit-scenes", "--size", "5", "--seed", "1")
    assert rc == 0 and "imported 0 items" in out and "5 skipped" in out, out
    rc, out, _ = _run(capsys, "import", "scenes", "--digit-scenes", "--size", "5", "--seed", "1",
                      "--id-prefix", "seed1/")
    assert rc == 0 and out.startswith("imported 5 items") and "scenes now holds 10 items" in out, out
    item = CollectionStore.open("scenes").get("seed1/scene-000004")
    assert item is not None and item.meta["seed"] == 1


@pytest.mark.parametrize("prefix", ["../", "a b/", "./x", "x/../"])
def test_a_bad_id_prefix_is_refused_before_a_collection_is_made(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              prefix: str) -> None:
    _split_folders(tmp_path)
    for source in (("--digit-scenes", "--size", "3"), ("--folder", str(tmp_path / "train"))):
        rc, out, err = _run(capsys, "import", "c5", *source, "--id-prefix", prefix)
        assert (rc, out) == (2, ""), err
        assert err == (f"deepindex collection: error: id-prefix: {prefix!r} must be characters of A-Z a-z 0-9 . _ "
                       ": @ / + - with no '.' or '..' segment (e.g. train/)\n"), err
    assert list_collections(None) == []
