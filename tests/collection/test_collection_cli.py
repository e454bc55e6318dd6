"""``deepindex collection import|add``: a command that refuses its arguments creates no collection."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepindex.cli import main
from deepindex.collection import list_collections
from support import png_bytes


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["collection", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


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
