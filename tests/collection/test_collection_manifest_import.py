"""``deepindex collection import --manifest`` and what real manifests hold (found on review): a path on
several rows (one tag per row), tags the concept list lacks, and images that do not decode (an image
cut short among them, which a folder import took too)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepindex.collection import CollectionStore, list_collections
from deepindex.collection.imports import import_manifest
from deepindex.data.files import ManifestError, read_manifest
from support import collection_cli, png_bytes

_run = collection_cli


def _jpeg(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _cut_short(data: bytes) -> bytes:
    """The file a copy or download that stopped half way leaves: its header is whole, its pixels are not."""
    return data[: len(data) // 2]


def test_rows_of_one_path_are_one_item_with_the_tags_of_every_row(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """One tag per row: ``0.jpg,sky`` then ``0.jpg,sea``.  The second row was taken for an item already
    there and its tag was lost; training's reader merges the rows.  Now one item with both tags (and the
    first row's split, as training keeps it), counted as merged rows, not as items already there."""
    root = tmp_path / "m2"
    root.mkdir()
    for i in range(2):
        (root / f"{i}.jpg").write_bytes(_jpeg(i))
    (root / "copy.jpg").write_bytes(_jpeg(1))  # other path, same bytes as 1.jpg: an item of its own, as before
    manifest = root / "tags.csv"
    manifest.write_text("path,tags\n0.jpg,sky\n0.jpg,sea\n1.jpg,sea\n./0.jpg,cloud\ncopy.jpg,sky\n")
    rc, out, err = _run(capsys, "import", "m2", "--manifest", str(manifest))
    assert rc == 0, err
    assert out.startswith("imported 3 items into m2") and "(0 already there; 2 rows merged with an earlier row " \
        "of the same path)" in out, out
    s = CollectionStore.open("m2")
    assert s.count() == 3
    assert [(i, s.get(i).tags) for i in ("0.jpg", "1.jpg", "copy.jpg")] == [  # type: ignore[union-attr]
        ("0.jpg", ["cloud", "sea", "sky"]), ("1.jpg", ["sea"]), ("copy.jpg", ["sky"])]
    # What training reads for 0.jpg, the tags of every row of it.
    found = read_manifest(manifest, root, None)
    assert [found.concepts[j] for j in np.flatnonzero(found.targets[found.ids.index("0.jpg")].numpy())] == \
        s.get("0.jpg").tags  # type: ignore[union-attr]
    rc, out, _ = _run(capsys, "import", "m2", "--manifest", str(manifest), "--json")  # a re-run: nothing new
    doc = json.loads(out)
    assert rc == 0 and (doc["added"], doc["existing"], doc["merged"], doc["skipped"]) == (0, 3, 2, 0), doc

    # A split column: the first row of a path decides its item's split, as training's reader decides it.
    (root / "split.csv").write_text("path,tags,split\n0.jpg,sky,train\n0.jpg,sea,test\n1.jpg,sea,val\n1.jpg,sky,\n")
    res = import_manifest(CollectionStore.open("m3"), root / "split.csv")
    assert (res.added, res.existing, res.skipped, res.merged, res.split_conflicts) == (2, 0, 0, 2, 1), res
    s3 = CollectionStore.open("m3")
    assert [(i, s3.get(i).tags, s3.get(i).meta["split"]) for i in ("0.jpg", "1.jpg")] == [  # type: ignore[union-attr]
        ("0.jpg", ["sea", "sky"], "train"), ("1.jpg", ["sea", "sky"], "val")]
    trained = read_manifest(root / "split.csv", root, None)
    assert dict(zip(trained.ids, trained.splits or [], strict=True)) == {"0.jpg": "train", "1.jpg": "val"}
    rc, out, _ = _run(capsys, "import", "m4", "--manifest", str(root / "split.csv"))
    assert rc == 0 and "2 rows merged with an earlier row of the same path, 1 of them naming another split " \
        "(the first row's kept)" in out, out


def test_unknown_tags_has_an_option_and_the_error_names_it(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The error said ``data.unknown_tags=ignore|add to go on``, a training setting the import command
    had no way to pass.  Now ``--unknown-tags {error,ignore,add}``, and the error names it; training's
    reader still names its own setting."""
    root = tmp_path / "pets"
    root.mkdir()
    for i in range(2):
        (root / f"{i}.png").write_bytes(png_bytes(np.full((8, 8), 0.2 + 0.5 * i)))
    (root / "concepts.txt").write_text("cat\ndog\n")
    manifest = root / "tags.csv"
    manifest.write_text("path,tags\n0.png,cat;indoor\n1.png,dog\n")
    rc, out, err = _run(capsys, "import", "pets", "--manifest", str(manifest))
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err == (f"deepindex collection: error: {manifest}:2: unknown tag 'indoor' (not in the concept list; "
                   "--unknown-tags ignore|add to go on)\n"), err
    assert list_collections(None) == []  # refused before any collection was made
    with pytest.raises(ManifestError, match=r"data\.unknown_tags=ignore\|add to go on\)$"):
        read_manifest(manifest, root, ["cat", "dog"])  # training's words, unchanged

    rc, out, err = _run(capsys, "import", "ignored", "--manifest", str(manifest), "--unknown-tags", "ignore")
    assert rc == 0 and out.startswith("imported 2 items into ignored"), (out, err)
    assert "1 unknown tags dropped (--unknown-tags ignore)" in out, out
    assert CollectionStore.open("ignored").get("0.png").tags == ["cat"]  # type: ignore[union-attr]
    rc, out, err = _run(capsys, "import", "added", "--manifest", str(manifest), "--unknown-tags", "add", "--json")
    assert rc == 0 and json.loads(out)["added"] == 2 and json.loads(out)["unknown_tags"] == 1, (out, err)
    assert CollectionStore.open("added").get("0.png").tags == ["cat", "indoor"]  # type: ignore[union-attr]
    rc, out, err = _run(capsys, "import", "strict", "--manifest", str(manifest), "--unknown-tags", "error")
    assert rc == 2 and "unknown tag 'indoor'" in err
    with pytest.raises(SystemExit):  # argparse's own refusal of a value it does not offer
        _run(capsys, "import", "strict", "--manifest", str(manifest), "--unknown-tags", "keep")
    assert "--unknown-tags: invalid choice: 'keep'" in capsys.readouterr().err
    assert [c["name"] for c in list_collections(None)] == ["added", "ignored"]


def test_an_unreadable_image_in_a_manifest_is_skipped_and_counted(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """One image that does not decode failed the whole manifest's import (rc 2, nothing imported); the
    folder import skips and counts it, as the README says an import does.  Now the manifest import does
    too, and its summary says how many; an image cut short is one (its header alone is readable)."""
    root = tmp_path / "photos"
    root.mkdir()
    (root / "good.jpg").write_bytes(_jpeg(0))
    (root / "text.jpg").write_bytes(b"not an image")
    (root / "half.jpg").write_bytes(_cut_short(_jpeg(1)))
    (root / "half.png").write_bytes(_cut_short(png_bytes(np.random.default_rng(2).random((64, 64)))))
    manifest = root / "tags.csv"
    manifest.write_text("path,tags\ngood.jpg,sky\ntext.jpg,sky\nhalf.jpg,sea\nhalf.png,sea\ngood.jpg,sea\n")
    rc, out, err = _run(capsys, "import", "photos", "--manifest", str(manifest))
    assert rc == 0, err
    assert out.startswith("imported 1 items into photos from") and "(0 already there, 3 skipped: 3 unreadable " \
        "images; 1 row merged with an earlier row of the same path)" in out, out
    assert "skipped text.jpg: data: not a readable image" in err and "skipped half.jpg: data: not a readable " \
        "image (OSError: image file is truncated" in err and "skipped half.png" in err, err
    s = CollectionStore.open("photos")
    assert s.count() == 1 and s.get("good.jpg").tags == ["sea", "sky"]  # type: ignore[union-attr]
    assert all(s.get(i) is None for i in ("text.jpg", "half.jpg", "half.png"))
    rc, out, _ = _run(capsys, "import", "photos", "--manifest", str(manifest), "--json")
    doc = json.loads(out)
    assert rc == 0 and (doc["added"], doc["existing"], doc["skipped"], doc["unreadable"]) == (0, 1, 3, 3), doc


def test_an_image_cut_short_is_not_imported_from_a_folder_nor_added(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Its header is whole, so the folder import took it (reading the header only), and then an evaluation
    of the collection stopped on it with "image file is truncated", naming no item, and an index build
    left it out.  Now the import decodes each image whole: skipped and counted, as a non-image is."""
    from deepindex.index.collection import catalogue_collection

    root = tmp_path / "pets"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "whole.jpg").write_bytes(_jpeg(0))
    (root / "cat" / "half.jpg").write_bytes(_cut_short(_jpeg(1)))
    (root / "cat" / "half.png").write_bytes(_cut_short(png_bytes(np.random.default_rng(2).random((64, 64)))))
    rc, out, err = _run(capsys, "import", "pets", "--folder", str(root))
    assert rc == 0 and "imported 1 items into pets" in out and "2 skipped: 2 unreadable images" in out, (out, err)
    assert "skipped cat/half.jpg: data: not a readable image (OSError: image file is truncated" in err, err
    coll = catalogue_collection("pets", image_size=16, channels=3)
    assert coll.ids == ["cat/whole.jpg"]
    assert coll.unit_images(np.arange(len(coll))).shape == (1, 3, 16, 16)  # every item decodes
    rc, out, err = _run(capsys, "add", "pets", "half", str(root / "cat" / "half.jpg"))
    assert rc == 2 and err.startswith("deepindex collection: error: data: not a readable image (OSError: image "
                                      "file is truncated") and err.count("\n") == 1, err
    assert CollectionStore.open("pets").count() == 1
