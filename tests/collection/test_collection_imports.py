"""Importers and the ``deepindex collection`` command: what goes in is what the files held, and a
re-run adds nothing."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepindex.cli import main
from deepindex.collection import CollectionStore
from deepindex.collection.imports import import_digit_scenes, import_folder, import_manifest
from support import png_bytes


def _store(name: str = "c") -> CollectionStore:
    return CollectionStore.open(name)


def test_digit_scenes_are_the_gallery_as_png_and_a_rerun_adds_nothing() -> None:
    from deepindex.index.collection import digit_gallery

    s = _store("digit-scenes")
    res = import_digit_scenes(s, size=40, seed=3)
    assert (res.added, res.existing, res.skipped) == (40, 0, 0)
    g = digit_gallery(40, seed=3)
    assert g.images is not None and g.labels is not None
    for i in (0, 17, 39):
        it = s.get(f"scene-{i:06d}")
        assert it is not None and it.tags == g.labels[i] and it.source == "digit-scenes"
        assert it.meta["width"] == it.meta["height"] == 32 and it.meta["split"] == "test"
        with Image.open(io.BytesIO(s.image(it.id))) as im:
            pixels = np.asarray(im, dtype=np.float32) / 255
        assert np.abs(pixels - g.images[i, 0]).max() <= 0.5 / 255 + 1e-6  # 8-bit PNG of the scene
    assert s.tags() == sorted({t for labels in g.labels for t in labels})
    again = import_digit_scenes(s, size=40, seed=3)
    assert (again.added, again.existing) == (0, 40) and s.head() == 40
    more = import_digit_scenes(s, size=50, seed=3)  # the gallery is prefix-stable: only the 10 new scenes
    assert (more.added, more.existing) == (10, 40) and s.count() == 50


def _folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            (root / cls / f"{cls}{i}.png").write_bytes(png_bytes(rng.random((8, 8))))
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    (root / "dog" / "with space.png").write_bytes(png_bytes(rng.random((8, 8))))


def test_folder_import_tags_by_class_skips_what_it_cannot_take(tmp_path: Path) -> None:
    _folder(tmp_path / "pets")
    s = _store("pets")
    res = import_folder(s, tmp_path / "pets")
    assert (res.added, res.existing, res.skipped) == (5, 0, 2), res.skipped_reasons
    assert any("broken.png: data: not a readable image" in r for r in res.skipped_reasons)
    assert any("with space.png" in r and "id:" in r for r in res.skipped_reasons)
    it = s.get("cat/cat1.png")
    assert it is not None and it.tags == ["cat"] and it.source == f"folder:{(tmp_path / 'pets').resolve()}"
    assert it.meta == {"filename": "cat/cat1.png", "width": 8, "height": 8, "format": "PNG"}
    assert s.image("cat/cat1.png") == (tmp_path / "pets" / "cat" / "cat1.png").read_bytes()
    assert s.tags() == ["cat", "dog"]
    again = import_folder(s, tmp_path / "pets")
    assert (again.added, again.existing, again.skipped) == (0, 5, 2) and s.head() == 5


def test_manifest_import_with_and_without_a_concept_list(tmp_path: Path) -> None:
    _folder(tmp_path / "pets")
    manifest = tmp_path / "tags.csv"
    manifest.write_text("path,tags\ncat/cat0.png,cat;indoor\ndog/dog1.png,dog|outdoor\ncat/cat2.png,\n")
    s = _store("tagged")
    res = import_manifest(s, manifest, tmp_path / "pets")
    assert (res.added, res.skipped) == (3, 0)
    assert s.get("cat/cat0.png").tags == ["cat", "indoor"]  # type: ignore[union-attr]
    assert s.get("cat/cat2.png").tags == []  # type: ignore[union-attr]
    assert s.tags() == ["cat", "dog", "indoor", "outdoor"]
    assert import_manifest(s, manifest, tmp_path / "pets").added == 0
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="unknown tag 'indoor'"):
        import_manifest(_store("strict"), manifest, tmp_path / "pets", concepts=concepts)
    jsonl = tmp_path / "tags.jsonl"
    jsonl.write_text(json.dumps({"path": "dog/dog0.png", "tags": ["dog"]}) + "\n")
    assert import_manifest(_store("strict"), jsonl, tmp_path / "pets", concepts=concepts).added == 1


def test_a_manifest_import_keeps_every_row_as_its_item(tmp_path: Path) -> None:
    """Found on review: two rows naming files with the same bytes were merged as training merges them: the
    second row's id went missing and its tags moved to the first.  A row written ./x.png (`find .`) became
    an id the collection refuses, and was skipped."""
    root = tmp_path / "pets"
    root.mkdir()
    same = png_bytes(np.full((8, 8), 0.25))
    for name in ("a.png", "b.png"):
        (root / name).write_bytes(same)
    (root / "c.png").write_bytes(png_bytes(np.full((8, 8), 0.75)))
    manifest = root / "tags.csv"
    manifest.write_text("path,tags\n./a.png,cat\nb.png,dog\nsub//../c.png,cat\n")
    s = _store("rows")
    res = import_manifest(s, manifest, root)
    assert (res.added, res.existing, res.skipped) == (3, 0, 0), res
    assert [(i, s.get(i).tags) for i in ("a.png", "b.png", "c.png")] == [  # type: ignore[union-attr]
        ("a.png", ["cat"]), ("b.png", ["dog"]), ("c.png", ["cat"])]


def test_manifest_inside_its_folder_needs_no_root_and_takes_its_concepts_txt(tmp_path: Path) -> None:
    """As training reads a collection (``data.root``): paths relative to the manifest's folder, and
    the ``concepts.txt`` there, when there is one, is the concept list (its order, unknown tags refused)."""
    _folder(tmp_path / "pets")
    manifest = tmp_path / "pets" / "tags.csv"
    manifest.write_text("path,tags\ncat/cat0.png,cat\ndog/dog1.png,dog;outdoor\n")
    s = _store("inside")
    assert import_manifest(s, manifest).added == 2
    assert s.get("dog/dog1.png").tags == ["dog", "outdoor"]  # type: ignore[union-attr]
    (tmp_path / "pets" / "concepts.txt").write_text("dog\ncat\n")
    with pytest.raises(ValueError, match="unknown tag 'outdoor'"):
        import_manifest(_store("inside-strict"), manifest)
    (tmp_path / "pets" / "concepts.txt").write_text("dog\ncat\noutdoor\n")
    strict = _store("inside-listed")
    assert import_manifest(strict, manifest).added == 2 and strict.tags() == ["cat", "dog", "outdoor"]


def test_cli_session(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The example session of the report, as a person types it."""
    def run(*argv: str) -> tuple[int, str, str]:
        rc = main(["collection", *argv])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, _ = run("ls")
    assert rc == 0 and "no collections yet" in out
    rc, out, _ = run("import", "scenes", "--digit-scenes", "--size", "30")
    assert rc == 0 and out.startswith("imported 30 items into scenes") and "(0 already there)" in out
    rc, out, _ = run("import", "scenes", "--digit-scenes", "--size", "30", "--json")
    assert rc == 0 and json.loads(out)["existing"] == 30 and json.loads(out)["added"] == 0
    img = tmp_path / "mine.png"
    img.write_bytes(png_bytes(np.eye(8)))
    rc, out, _ = run("add", "scenes", "mine-1", str(img), "--tag", "1")
    assert rc == 0 and out.startswith("added mine-1 to scenes (seq 31")
    rc, out, _ = run("add", "scenes", "mine-1", str(img), "--tag", "1")
    assert rc == 0 and "already in scenes" in out
    rc, _, err = run("add", "scenes", "scene-000000", str(img))
    assert rc == 2 and err.startswith("deepindex collection: error: id: 'scene-000000' already exists")
    rc, out, _ = run("rm", "scenes", "mine-1")
    assert rc == 0 and out.strip() == "deleted mine-1 from scenes (seq 32)"
    rc, _, err = run("rm", "scenes", "mine-1")
    assert rc == 2 and "no item 'mine-1'" in err
    rc, out, _ = run("info", "scenes", "--json")
    info = json.loads(out)
    assert rc == 0 and (info["count"], info["deleted"], info["head"]) == (30, 1, 32)
    rc, out, _ = run("info", "scenes")
    assert rc == 0 and out.startswith("scenes: 30 items (1 deleted), head 32")
    rc, out, _ = run("ls")
    assert rc == 0 and out.split()[:2] == ["scenes", "30"]
    rc, out, _ = run("check", "scenes")
    assert rc == 0 and "every blob present and intact" in out
    rc, _, err = run("info", "nope")
    assert rc == 2 and "no collection named 'nope'" in err
    rc, _, err = run("import", "x", "--manifest", str(tmp_path / "m.csv"))
    assert rc == 2 and err == f"deepindex collection: error: manifest: no such file {tmp_path / 'm.csv'}\n", err
    rc, _, err = run("import", "x", "--folder", str(tmp_path / "none"))
    assert rc == 2 and "no such folder" in err
    (tmp_path / "m.csv").write_text("path,tags\nnot/there.png,a\n")
    for flag, value in (("--root", "nodir"), ("--concepts", "nofile.txt")):
        rc, _, err = run("import", "y", "--manifest", str(tmp_path / "m.csv"), flag, str(tmp_path / value))
        assert rc == 2 and err.startswith(f"deepindex collection: error: {flag[2:]}: no such"), err
    rc, _, err = run("import", "y", "--manifest", str(tmp_path / "m.csv"))  # the root: the manifest's folder
    assert rc == 2 and "m.csv:2: missing file" in err and str(tmp_path / "not" / "there.png") in err, err
    rc, out, _ = run("ls")  # a folder or manifest that cannot be read creates no collection
    assert rc == 0 and [line.split()[0] for line in out.splitlines()] == ["scenes"]
