"""What real collections hold: flat folders with a sidecar, split columns, unknown tags,
duplicates, EXIF rotation, CMYK / palette / alpha / 16-bit images."""
import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from deepindex.config import ConfigError, load_config
from deepindex.data import build_splits
from deepindex.data.files import ManifestError, read_collection, read_manifest
from deepindex.data.transforms import decode_file, pil_to_uint8


def _jpeg(path, colour, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def _png(path, colour, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def flat(tmp_path):
    """A flat folder: 12 colour JPEGs, tags.csv beside them with a split column, one stray image."""
    root = tmp_path / "photos"
    for i in range(12):
        _jpeg(root / f"p{i}.jpg", (20 * i, 200 - 10 * i, 90))
    _jpeg(root / "stray.jpg", (1, 2, 3))
    splits = ["train"] * 6 + [""] * 2 + ["val"] * 2 + ["test"] * 2
    (root / "tags.csv").write_text("path,tags,split\n" + "".join(
        f"p{i}.jpg,{'sky' if i % 2 else 'sea'};{'boat' if i % 3 == 0 else ''},{s}\n" for i, s in enumerate(splits)))
    return root


@pytest.mark.timeout(120)
def test_flat_folder_with_a_sidecar_needs_no_manifest_or_concepts(flat):
    items = read_collection(flat)
    assert items.concepts == ["boat", "sea", "sky"]  # the tags found, sorted
    assert items.report.concepts_from_tags and items.report.unlisted_images == 1
    assert items.splits[:6] == ["train"] * 6 and items.splits[6:8] == [None, None]
    cfg = load_config(None, ["data.dataset=manifest", f"data.root={flat}", "data.image_size=16"])
    sp = build_splits(cfg.data)
    # Splits come from the column (empty cells train), not from a random draw.
    assert (len(sp.train), len(sp.val), len(sp.test)) == (8, 2, 2)
    assert sp.channels == 3 and sp.train[0][0].shape == (3, 16, 16) and sp.preset == "fit"
    assert "split column" in sp.report.summary() and "not in the tags file" in sp.report.summary()


def test_class_folders_without_a_tags_file_point_at_the_image_folder_dataset(tmp_path):
    """The layout most collections come in (torchvision's ImageFolder) read as a manifest: the error
    says how to read it, and the image-folder dataset does, one class per folder."""
    root = tmp_path / "shapes"
    for c in ("circle", "square", "triangle"):
        for i in range(3):
            _jpeg(root / c / f"{i}.jpg", (40 * i, 90, 9))
    (root / "notes").mkdir()  # a folder of no images is no class, nor is a hidden one
    _jpeg(root / ".ipynb_checkpoints" / "0.jpg", (1, 2, 3))
    with pytest.raises(FileNotFoundError) as e:
        read_collection(root)
    assert str(e.value) == (f"data.manifest: not given, and {root} holds none of tags.csv, tags.jsonl, manifest.csv, "
                            "manifest.jsonl; its folders of images (circle, square, triangle) read as one class each "
                            "with data.dataset=image-folder")
    sp = build_splits(load_config(None, ["data.dataset=image-folder", f"data.root={root}", "data.image_size=16"]).data)
    assert sp.concepts == ["circle", "square", "triangle"] and not sp.multilabel
    with pytest.raises(FileNotFoundError, match=r"manifest\.jsonl$"):  # nothing to point at
        read_collection(root / "notes")


def test_a_concepts_file_beside_the_images_is_used(flat):
    (flat / "concepts.txt").write_text("sky\nsea\nboat\n")
    assert read_collection(flat).concepts == ["sky", "sea", "boat"]


def test_a_concepts_file_has_comments_and_hashtag_concepts(flat):
    """``# ...`` is a comment wherever it is indented; ``#boat``, a web tag, is a concept (it used to be
    dropped as a comment, and every row tagged with it refused as an unknown tag)."""
    (flat / "concepts.txt").write_text("# the concepts of this collection\nsky\n  # indented\n#\nsea\n\n#boat\n")
    tags = (flat / "tags.csv").read_text().replace(";boat", ";#boat")
    (flat / "tags.csv").write_text(tags)
    items = read_collection(flat)
    assert items.concepts == ["sky", "sea", "#boat"]
    assert items.targets[:, 2].sum() == 4  # p0, p3, p6, p9


def test_csv_column_names_are_read_as_a_spreadsheet_writes_them(flat):
    """``Path, Tags, Split``: the same columns.  A "Split" column used to be an ignored extra field, and
    every row's split a random draw."""
    text = (flat / "tags.csv").read_text().split("\n", 1)[1]
    (flat / "tags.csv").write_text("Path, Tags ,Split\n" + text)
    items = read_collection(flat)
    assert items.splits[:6] == ["train"] * 6 and items.splits[-2:] == ["test", "test"]
    (flat / "tags.csv").write_text("path,tags,Split,split\n" + text)
    with pytest.raises(ManifestError, match=r"tags\.csv:1: the CSV header names 'split' twice$"):
        read_collection(flat)


def test_train_test_column_gets_a_val_split_carved_from_train(tmp_path):
    root = tmp_path / "r"
    for i in range(20):
        _jpeg(root / f"{i}.jpg", (10 * i, 5, 5))
    (root / "tags.jsonl").write_text("".join(
        json.dumps({"path": f"{i}.jpg", "tags": ["a"] if i % 2 else ["b"],
                    "split": "test" if i >= 16 else "Train"}) + "\n"
        for i in range(20)))
    cfg = load_config(None, ["data.dataset=manifest", f"data.root={root}", "data.image_size=8",
                             "data.val_fraction=0.25"])
    sp = build_splits(cfg.data)
    assert (len(sp.train), len(sp.val), len(sp.test)) == (12, 4, 4)
    test_paths = {p.name for p in sp.test.paths}
    assert test_paths == {"16.jpg", "17.jpg", "18.jpg", "19.jpg"}


def test_a_bad_split_value_names_the_line(flat):
    m = flat / "tags.csv"
    m.write_text("path,tags,split\np0.jpg,sky,train\np1.jpg,sea,holdout\n")
    with pytest.raises(ManifestError, match=r"tags\.csv:3: split 'holdout' must be train, val or test"):
        read_collection(flat)


@pytest.fixture
def tagged(tmp_path):
    root = tmp_path / "r"
    for i in range(6):
        _jpeg(root / f"{i}.jpg", (40 * i, 10, 10))
    m = tmp_path / "m.csv"
    m.write_text("path,tags\n0.jpg,sky\n1.jpg,sky;whale\n2.jpg,sea;whale;kraken\n3.jpg,sea\n4.jpg,sky\n5.jpg,sea\n")
    return root, m


def test_unknown_tags_by_policy(tagged):
    root, m = tagged
    with pytest.raises(ManifestError, match=r"m\.csv:3: unknown tag 'whale'.*data\.unknown_tags=ignore\|add"):
        read_manifest(m, root, ["sky", "sea"])
    ign = read_manifest(m, root, ["sky", "sea"], unknown_tags="ignore")
    assert ign.concepts == ["sky", "sea"] and ign.targets[2].tolist() == [0.0, 1.0]
    r = ign.report
    assert (r.unknown_tags, r.unknown_lines, r.unknown_names) == (3, 2, ["kraken", "whale"])
    assert "3 unknown tags on 2 lines ignored (2 distinct: kraken, whale)" in r.summary()
    add = read_manifest(m, root, ["sky", "sea"], unknown_tags="add")
    assert add.concepts == ["sky", "sea", "kraken", "whale"]
    assert add.targets[2].tolist() == [0.0, 1.0, 1.0, 1.0] and "added as concepts" in add.report.summary()
    with pytest.raises(ConfigError, match=r"^data\.unknown_tags"):
        load_config(None, ["data.unknown_tags=drop"])


def test_duplicates_by_content_are_kept_once_with_both_taggings(tmp_path):
    root = tmp_path / "r"
    for i in range(4):
        _jpeg(root / f"{i}.jpg", (60 * i, 10, 10))
    (root / "copy-of-1.jpg").write_bytes((root / "1.jpg").read_bytes())
    m = tmp_path / "m.csv"
    m.write_text("path,tags,split\n0.jpg,a,train\n1.jpg,a,train\n2.jpg,b,val\n3.jpg,b,test\ncopy-of-1.jpg,b,test\n")
    items = read_manifest(m, root, ["a", "b"])
    assert [p.name for p in items.paths] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert items.targets[1].tolist() == [1.0, 1.0]  # both rows' tags hold for the one picture
    assert items.splits[1] == "train"  # the first row's split: no copy leaks into the test split
    assert items.report.duplicates == 1 and "copy-of-1.jpg = 1.jpg" in items.report.summary()


def _exif_rotated_jpeg(orientation: int) -> bytes:
    # Stored pixels: left half red, right half blue; EXIF says how to display them.
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied_in_training_and_serving_alike(tmp_path):
    p = tmp_path / "phone.jpg"
    p.write_bytes(_exif_rotated_jpeg(6))  # 6: rotate 90 degrees clockwise to display
    arr = decode_file(p, 20, 3, "fit")  # (3, 20, 20): the shorter side of the upright 20x40 image
    # Upright, the image is 20 wide and 40 tall with red on top; the centre crop holds both.
    top, bottom = arr[:, 2, 10], arr[:, -3, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    with Image.open(p) as im:  # what serving does with uploaded bytes: the same function, the same pixels
        assert np.array_equal(pil_to_uint8(im, 20, 3, "fit"), arr)


def test_cmyk_palette_alpha_and_16bit_images_decode(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    r, g, b = decode_file(cmyk, 8, 3, "fit")[:, 4, 4]
    assert r > 200 and g < 60 and b < 60

    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.paste(0, (0, 0, 8, 16))  # left half: the transparent index
    pal.save(tmp_path / "pal.png", transparency=0)
    arr = decode_file(tmp_path / "pal.png", 16, 3, "fit")
    assert arr[:, 8, 2].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert arr[:, 8, 12].tolist() == [0, 200, 0]

    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 0))
    rgba.save(tmp_path / "a.png")
    assert decode_file(tmp_path / "a.png", 8, 3, "fit")[:, 4, 4].tolist() == [255, 255, 255]
    assert decode_file(tmp_path / "a.png", 8, 1, "fit")[0, 4, 4] == 255

    deep = Image.fromarray(np.full((16, 16), 65535 // 2, dtype=np.uint16))
    deep.save(tmp_path / "d16.png")
    assert abs(int(decode_file(tmp_path / "d16.png", 8, 1, "fit")[0, 4, 4]) - 127) <= 1  # scaled, not clipped

    # A float TIFF of values within 0..1 (what scientific and HDR tools write): 0..1, not a black image
    # read as 0..255; a NaN pixel reads as 0.
    ramp = np.tile(np.linspace(0.0, 1.0, 16, dtype=np.float32), (16, 1))
    ramp[0, 0] = np.nan
    Image.fromarray(ramp).save(tmp_path / "f32.tif")  # mode F
    row = decode_file(tmp_path / "f32.tif", 16, 1, "fit")[0, 8]
    assert row[0] == 0 and row[-1] == 255 and abs(int(row[8]) - 136) <= 2


def test_a_manifest_of_mixed_modes_trains_as_rgb(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(root / "a.jpg")
    Image.new("RGBA", (24, 30), (0, 0, 255, 128)).save(root / "b.png")
    Image.new("P", (30, 24), 3).save(root / "c.gif")
    Image.new("L", (24, 24), 100).save(root / "d.png")
    (root / "tags.csv").write_text("path,tags\na.jpg,x\nb.png,y\nc.gif,x\nd.png,y\n")
    cfg = load_config(None, ["data.dataset=manifest", f"data.root={root}", "data.val_fraction=0.25",
                             "data.test_fraction=0.25"])
    sp = build_splits(cfg.data)
    assert sp.channels == 3 and sp.image_size == 32  # colour in the sample -> RGB; tiny images -> 32 px
    x, _ = sp.train[0]
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


def test_adding_images_moves_no_other_item_between_splits(tmp_path):
    """Found on review: splits were a permutation of positions, so one added image reshuffled them
    (70 of 100 test items of a 1,001-image collection had been train items of its 1,000-image self) and
    a champion scored on a retrained candidate's test split had trained on most of it.  Items are now
    dealt by a hash of their id: one added image moves at most the items at the fractions' boundaries."""
    from deepindex.data.files import read_image_folder
    from deepindex.data.splits import file_split_indices

    root = tmp_path / "shapes"
    for i in range(200):  # PNG: two JPEGs of nearby solid colours can be the same bytes, which count once
        _png(root / ("a" if i % 2 else "b") / f"{i:03d}.png", (i, 90, 9))
    d = load_config(None, ["data.dataset=image-folder", f"data.root={root}"]).data

    def membership() -> dict[str, str]:
        items = read_image_folder(root)
        return {items.ids[i]: split for split, idx in file_split_indices(items, d).items() for i in idx}

    before = membership()
    _png(root / "a" / "000-new.png", (1, 2, 3))  # sorts before every other item of its folder
    after = membership()
    moved = [i for i in before if after[i] != before[i]]
    assert len(after) == 201 and len(moved) <= 2, moved
    assert sorted(Counter(after.values()).items()) == [("test", 20), ("train", 161), ("val", 20)]
    again = load_config(None, ["data.dataset=image-folder", f"data.root={root}", "data.seed=1"]).data
    items = read_image_folder(root)
    reseeded = {items.ids[i]: s for s, idx in file_split_indices(items, again).items() for i in idx}
    assert sum(reseeded[i] != after[i] for i in after) > 20  # the seed still draws other splits


def test_a_transparency_key_of_an_rgb_or_grey_image_is_composited_on_white(tmp_path):
    """PNG optimisers write an RGBA logo's binary alpha as RGB (or L) + a tRNS colour key: its transparent
    pixels came out black, where the same logo saved as RGBA came out white (found on review)."""
    from deepindex.data.transforms import decode_file

    rgb = Image.new("RGB", (16, 16), (0, 0, 0))
    rgb.paste((0, 200, 0), (8, 0, 16, 16))  # right half green, left half the keyed-out black
    rgb.save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    grey = Image.new("L", (16, 16), 0)
    grey.paste(90, (8, 0, 16, 16))
    grey.save(tmp_path / "grey.png", transparency=0)
    for name, right in (("rgb.png", [0, 200, 0]), ("grey.png", [90, 90, 90])):
        with Image.open(tmp_path / name) as im:
            assert "transparency" in im.info and im.mode in ("RGB", "L")
        arr = decode_file(tmp_path / name, 16, 3, "fit")
        assert arr[:, 8, 2].tolist() == [255, 255, 255], name  # keyed out: white
        assert arr[:, 8, 12].tolist() == right, name


def test_a_quoted_comma_in_the_tags_column_is_refused_naming_the_line(tmp_path):
    """pandas' to_csv quotes "dog,cat": one tag named "dog,cat", the item tagged neither (found on review)."""
    _jpeg(tmp_path / "a.jpg", (1, 2, 3))
    (tmp_path / "tags.csv").write_text('path,tags\na.jpg,"dog,cat"\n')
    with pytest.raises(ManifestError, match=r"tags.csv:2: tags 'dog,cat' hold a comma; separate a row's tags "
                                            r"with ';' or '\|'$"):
        read_collection(tmp_path)


def test_an_image_folders_copies_are_kept_once_and_hidden_only_folders_are_no_class(tmp_path):
    """A scraped folder's x.jpg and x (copy).jpg were dealt to train and test alike; manifests were deduplicated,
    image folders not (found on review).  A copy under another class keeps the first and is counted.  A
    folder whose only images are hidden (.ipynb_checkpoints) was a class no image trains."""
    from deepindex.data.files import read_image_folder

    root = tmp_path / "shapes"
    for i in range(6):
        _jpeg(root / ("a" if i % 2 else "b") / f"{i}.jpg", (i * 40, 90, 9))
    (root / "a" / "1 (copy).jpg").write_bytes((root / "a" / "1.jpg").read_bytes())
    (root / "b" / "1.jpg").write_bytes((root / "a" / "3.jpg").read_bytes())  # the same picture under b too
    _jpeg(root / "misc" / ".ipynb_checkpoints" / "x.jpg", (1, 2, 3))
    items = read_image_folder(root)
    assert items.concepts == ["a", "b"]
    # The first in the listing's order is kept ("1 (copy).jpg" sorts before "1.jpg").
    assert sorted(items.ids) == ["a/1 (copy).jpg", "a/3.jpg", "a/5.jpg", "b/0.jpg", "b/2.jpg", "b/4.jpg"]
    assert items.report is not None and items.report.summary() == (
        f"{root}: 6 items; 2 duplicate images kept once (a/1.jpg = a/1 (copy).jpg; b/1.jpg = a/3.jpg); 1 of them "
        "under another class than the first copy (kept under the first)")
    listed = read_image_folder(root, dedupe=False)  # a listing: every file, no byte read
    assert len(listed.ids) == 8 and listed.report is None
    cfg = load_config(None, ["data.dataset=image-folder", f"data.root={root}", "data.image_size=16",
                             "data.val_fraction=0.2", "data.test_fraction=0.2"])
    sp = build_splits(cfg.data)
    assert len(sp.train) + len(sp.val) + len(sp.test) == 6
