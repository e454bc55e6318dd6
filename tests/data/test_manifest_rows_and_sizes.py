"""Found on review: a manifest naming one file twice (``./a.jpg`` and ``a.jpg``) was told "1 duplicate images
kept once (a.jpg = a.jpg)", the line for two names with equal bytes; a row naming a folder was a "missing
file"; an EXIF-rotated JPEG's size was recorded as stored (80 x 40), not as every decode shows it (40 x 80)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepindex.data.files import ManifestError, read_collection, read_manifest


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12), dtype=np.uint8)).save(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for i in range(3):
        _png(tmp_path / "photos" / f"a{i}.png", i)
    return tmp_path / "photos"


def test_rows_of_one_path_are_merged_and_counted_as_rows_not_as_duplicate_images(root: Path) -> None:
    m = root / "tags.csv"
    m.write_text("path,tags,split\n./a0.png,sky,train\na1.png,sea,\na0.png,sea,test\nx/../a0.png,boat,train\n")
    items = read_manifest(m, root, None)
    assert items.ids == ["a0.png", "a1.png"] and items.concepts == ["boat", "sea", "sky"]
    assert items.targets.tolist() == [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]  # every row's tags, one item
    assert items.splits == ["train", None]  # the first row's split
    report = items.report
    assert report is not None and (report.duplicates, report.merged_rows, report.merged_split_conflicts) == (0, 2, 1)
    summary = report.summary()
    assert "2 rows merged with an earlier row of the same path, 1 of them naming another split (the first row's " \
           "kept)" in summary and "duplicate" not in summary, summary
    # Listed without merging (what `collection import` merges itself, counting its own rows): every row.
    assert read_manifest(m, root, None, dedupe=False).ids == ["a0.png", "a1.png", "a0.png", "a0.png"]
    # Two names with equal bytes are still the duplicates line, and a later row of the copy's path merges.
    (root / "copy.png").write_bytes((root / "a1.png").read_bytes())
    m.write_text("path,tags\na0.png,sky\na1.png,sea\ncopy.png,boat\n./copy.png,sky\na2.png,sky\n")
    items = read_collection(root)
    report = items.report
    assert items.ids == ["a0.png", "a1.png", "a2.png"] and report is not None
    assert (report.duplicates, report.merged_rows) == (1, 1)
    assert "1 duplicate images kept once (copy.png = a1.png)" in report.summary()
    assert "1 row merged with an earlier row of the same path;" in report.summary(), report.summary()
    assert items.targets[1].tolist() == [1.0, 1.0, 1.0]  # boat, sea, sky: the copy's rows' tags too


def test_a_row_naming_a_folder_says_so(root: Path) -> None:
    (root / "sub").mkdir()
    _png(root / "sub" / "b.png", 7)
    m = root / "tags.csv"
    m.write_text("path,tags\na0.png,sky\nsub,sky\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(m, root, None)
    assert str(e.value) == f"{m}:3: sub is a folder, not an image file"
    m.write_text("path,tags\na0.png,sky\nnone.png,sky\n")  # a missing file: as before
    with pytest.raises(ManifestError, match=rf"^{m}:3: missing file none\.png \(no "):
        read_manifest(m, root, None)


@pytest.mark.parametrize("orientation, size", [(1, (80, 40)), (3, (80, 40)), (6, (40, 80)), (8, (40, 80)),
                                               (5, (40, 80))])
def test_an_exif_rotated_jpegs_size_is_the_upright_images(orientation: int, size: tuple[int, int]) -> None:
    from deepindex.collection.imports import image_meta
    from deepindex.data.transforms import decode_whole, to_model_mode

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 80, 3), dtype=np.uint8))  # 80 wide
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    data = buf.getvalue()
    meta = decode_whole(data)
    assert (meta["width"], meta["height"], meta["format"]) == (*size, "JPEG")
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (80, 40) and to_model_mode(im, 3).size == size  # what every decode shows
    assert (image_meta(data)["width"], image_meta(data)["height"]) == size  # what `collection import` records
