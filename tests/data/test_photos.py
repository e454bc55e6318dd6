"""The example photo collection: deterministic, on disk like a user's, colour concepts that need colour."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from deepindex.cli import main
from deepindex.config import load_config
from deepindex.data.photos import COLOURS, DEFAULT_CONCEPTS, digest, make_photo_collection


@pytest.mark.timeout(60)
def test_collection_is_deterministic_and_complete(tmp_path):
    a = make_photo_collection(tmp_path / "a", n=40, size=128, seed=3)
    b = make_photo_collection(tmp_path / "b", n=40, size=128, seed=3)
    assert digest(a.root) == digest(b.root)  # same arguments, same bytes
    c = make_photo_collection(tmp_path / "c", n=40, size=128, seed=4)
    assert digest(c.root) != digest(a.root)

    cfg = load_config(a.train_config)  # the recipe travels with the collection
    assert cfg.data.root == str(a.root.resolve()) and cfg.data.dataset == "manifest" and cfg.data.augment

    rows = list(csv.DictReader(a.manifest.open(newline="")))
    assert len(rows) == 40 and set(rows[0]) == {"path", "tags", "split"}
    assert a.concepts_file.read_text().split() == list(DEFAULT_CONCEPTS)
    splits = [r["split"] for r in rows]
    assert splits.count("val") == 6 and splits.count("test") == 6 and splits.count("train") == 28
    for r in rows:
        with Image.open(a.root / r["path"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (128, 128)
        tags = r["tags"].split(";")
        assert tags and set(tags) <= set(DEFAULT_CONCEPTS)
        # Every image has a shape, so a colour and a shape; bindings only with both parts.
        assert any(t in COLOURS for t in tags) and any(t in ("circle", "square", "triangle") for t in tags)
        if "red_circle" in tags:
            assert {"red", "circle"} <= set(tags)


def test_colours_have_equal_luma_so_gray_cannot_tell_them_apart():
    luma = [0.299 * r + 0.587 * g + 0.114 * b for r, g, b in COLOURS.values()]
    assert max(luma) - min(luma) < 0.02 * np.mean(luma)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"^concepts: 'purple'"):
        make_photo_collection(tmp_path, n=40, concepts=["red", "purple"])
    with pytest.raises(ValueError, match=r"^size:"):
        make_photo_collection(tmp_path, n=40, size=64)


@pytest.mark.timeout(60)
def test_cli_writes_the_collection_and_refuses_a_full_folder(tmp_path, capsys):
    out = tmp_path / "photos"
    assert main(["example", "photos", str(out), "--n", "24", "--size", "128", "--concepts", "red,circle"]) == 0
    assert (out / "tags.csv").is_file() and (out / "concepts.txt").read_text().split() == ["red", "circle"]
    assert len(list(out.glob("*.jpg"))) == 24
    # The console: the result on stdout, our one progress line on stderr as a person reads it.
    written = capsys.readouterr()
    result = json.loads(written.out)
    assert result["root"] == str(out) and sum(result["splits"].values()) == 24
    line = f"example photos: 24 images ({result['splits']}) of 128 px in {out}"
    assert written.err.splitlines() == [line], written.err
    assert main(["example", "photos", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dir:" in err[0] and "--force" in err[0]
