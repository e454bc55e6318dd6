import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from deepindex.config import load_config
from deepindex.data import build_splits
from deepindex.data.files import ManifestError, read_image_folder, read_manifest, resolve_inside


def _img(path, value=128, size=(10, 12), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture
def folder(tmp_path):
    for c, v in (("cat", 50), ("dog", 200)):
        for i in range(10):
            _img(tmp_path / "imgs" / c / f"{i}.png", v + i)
    return tmp_path / "imgs"


def test_image_folder_classes_and_splits(folder):
    items = read_image_folder(folder)
    assert items.concepts == ["cat", "dog"] and len(items.paths) == 20
    cfg = load_config(None, ["data.dataset=image-folder", f"data.root={folder}", "data.image_size=16"])
    sp = build_splits(cfg.data)
    assert not sp.multilabel and len(sp.train) + len(sp.val) + len(sp.test) == 20
    x, y = sp.train[0]
    assert x.shape == (1, 16, 16) and y.dtype == torch.int64


@pytest.fixture
def manifest_root(tmp_path):
    root = tmp_path / "root"
    for i in range(12):
        _img(root / f"a{i}.png", 10 * i)
    (tmp_path / "concepts.txt").write_text("sky\nsea\nboat\n")
    return root, tmp_path / "concepts.txt"


def test_csv_and_jsonl_manifests(tmp_path, manifest_root):
    root, concepts = manifest_root
    csv = tmp_path / "m.csv"
    csv.write_text("path,tags\n" + "".join(f"a{i}.png,sky;{'sea' if i % 2 else 'boat'}\n" for i in range(12)))
    items = read_manifest(csv, root, ["sky", "sea", "boat"])
    assert items.targets.shape == (12, 3) and items.targets[:, 0].sum() == 12 and items.targets[1, 1] == 1
    jl = tmp_path / "m.jsonl"
    jl.write_text("".join(json.dumps({"path": f"a{i}.png", "tags": ["sea"]}) + "\n" for i in range(12)))
    assert read_manifest(jl, root, ["sky", "sea", "boat"]).targets[:, 1].sum() == 12
    cfg = load_config(None, ["data.dataset=manifest", f"data.manifest={csv}", f"data.root={root}",
                             f"data.concepts={concepts}", "data.image_size=8"])
    sp = build_splits(cfg.data)
    assert sp.multilabel and sp.concepts == ["sky", "sea", "boat"]


@pytest.mark.parametrize("line, message", [
    ("missing.png,sky", "missing file"),
    ("a1.png,sky;whale", "unknown tag 'whale'"),
    ("../outside.png,sky", "escapes the root"),
    ("/etc/passwd,sky", "relative path under the root"),
    ("bad.png,sky", "unreadable image"),
])
def test_bad_manifest_line_is_named(tmp_path, manifest_root, line, message):
    root, _ = manifest_root
    (root / "bad.png").write_bytes(b"not an image at all")
    _img(tmp_path / "outside.png")
    m = tmp_path / "m.csv"
    m.write_text(f"path,tags\na0.png,sky\n{line}\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(m, root, ["sky", "sea"])
    assert f"{m}:3:" in str(e.value) and message in str(e.value)


def test_review_finds_tags_after_a_comma_a_cut_jpeg_a_huge_image_and_a_bom_are_named_not_lost(tmp_path, manifest_root):
    """Found on review: "a0.png,sky,sea" kept sky and dropped sea silently; a JPEG cut in half passed the
    image check and failed later in training without a name; a PNG whose header says 20000x20000 escaped
    as a traceback; a byte-order mark (Excel's "CSV UTF-8") made the first concept '\ufeffsky'."""
    from deepindex.data.files import read_concepts
    from deepindex.data.transforms import UnreadableImage, decode_file

    root, _ = manifest_root
    m = tmp_path / "m.csv"
    m.write_text("path,tags\na0.png,sky\na1.png,sky,sea\n")
    with pytest.raises(ManifestError, match=rf"^{m}:3: more fields than the header names; separate a row's tags "
                                            r"with ';' or '\|'"):
        read_manifest(m, root, ["sky", "sea"])
    whole = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, quality=95)
    (root / "cut.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    Image.new("L", (1, 1)).save(root / "huge.png")
    data = bytearray((root / "huge.png").read_bytes())
    data[16:24] = (20000).to_bytes(4, "big") * 2  # IHDR width and height: a decompression bomb by its header
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # its CRC, so that it reads as a PNG
    (root / "huge.png").write_bytes(bytes(data))
    for name in ("cut.jpg", "huge.png"):
        m.write_text(f"path,tags\na0.png,sky\n{name},sky\n")
        with pytest.raises(ManifestError, match=rf"^{m}:3: unreadable image {name} "):
            read_manifest(m, root, ["sky", "sea"])
    with pytest.raises(UnreadableImage, match=r"cut\.jpg: unreadable image \(OSError: image file is truncated"):
        decode_file(root / "cut.jpg", 16, 3)
    bom = tmp_path / "concepts.txt"
    bom.write_bytes("\ufeffsky\nsea\n".encode())
    assert read_concepts(bom) == ["sky", "sea"]
    m.write_bytes("\ufeffpath,tags\na0.png,sky\n".encode())
    assert read_manifest(m, root, ["sky", "sea"]).targets.tolist() == [[1.0, 0.0]]


def test_hidden_files_in_an_image_folder_are_not_images_of_its_classes(folder):
    """Found on review: macOS's ._<name> files and .ipynb_checkpoints were listed as images, and the build
    failed on them ("cannot identify image")."""
    (folder / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (folder / "dog" / ".ipynb_checkpoints").mkdir()
    _img(folder / "dog" / ".ipynb_checkpoints" / "0-checkpoint.png")
    items = read_image_folder(folder)
    assert len(items.paths) == 20 and not any("/." in i or i.startswith(".") for i in items.ids)


def test_symlink_escape_is_refused(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="escapes"):
        resolve_inside(root, "link/x.png")


def test_cifar_never_downloads(tmp_path):
    cfg = load_config(None, ["data.dataset=cifar10", f"data.root={tmp_path}", "data.channels=3"])
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_splits(cfg.data)
    assert not any(tmp_path.iterdir())


def test_an_image_folder_of_split_folders_is_refused_not_trained_as_classes(tmp_path, capsys):
    """Found on review: tv/{train,val}/{cat,dog}/*.png (torchvision's ImageFolder per split) trained "train vs
    val" as its two classes, without a word.  Refused, before Ray starts, naming the folder to point at."""
    import re

    import ray

    from deepindex.cli import main
    from deepindex.data.files import find_sidecar

    tv = tmp_path / "tv"
    for split in ("train", "val"):
        for c, v in (("cat", 50), ("dog", 200)):
            for i in range(3):
                _img(tv / split / c / f"{i}.png", v + i + (10 if split == "val" else 0))
    message = (f"data.root: {tv} holds train/val folders (a split, not classes): point data.root at {tv / 'train'}, "
               "or write a manifest with a split column")
    with pytest.raises(ValueError) as e:
        read_image_folder(tv)
    assert str(e.value) == message
    ray.shutdown()  # whichever test ran before: the refusal below must come before Ray starts
    assert main(["train", "data.dataset=image-folder", f"data.root={tv}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"deepindex train: error: {message}"]
    assert not ray.is_initialized()
    with pytest.raises(FileNotFoundError) as nf:
        find_sidecar(tv)
    assert re.search(r"its folders of images \(train/val\) are a split, not classes: "
                     rf"data\.dataset=image-folder with data\.root={re.escape(str(tv / 'train'))}", str(nf.value))
    assert read_image_folder(tv / "train").concepts == ["cat", "dog"]
    (tv / "val").rename(tv / "Test")  # any spelling SPLIT_NAMES knows, in any case
    with pytest.raises(ValueError, match=r"holds Test/train folders \(a split, not classes\)"):
        read_image_folder(tv)
    _img(tv / "cat" / "0.png")  # a class among the split names: classes, as before
    assert read_image_folder(tv, dedupe=False).concepts == ["Test", "cat", "train"]


def test_a_jsonl_tags_string_with_a_comma_is_refused_as_a_csvs_is(tmp_path, manifest_root):
    """Found on review: JSONL "tags": "sky,sea" became one concept named "sky,sea", silently (a CSV refuses a
    comma in its tags, and the README says JSONL works the same)."""
    root, _ = manifest_root
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"path": "a0.png", "tags": "sky;sea"}) + "\n"
                 + json.dumps({"path": "a1.png", "tags": "sky,sea"}) + "\n")
    with pytest.raises(ManifestError, match=rf"^{m}:2: tags 'sky,sea' hold a comma; separate a row's tags with "
                                            r"';' or '\|', or give them as a list$"):
        read_manifest(m, root, None)
    m.write_text(json.dumps({"path": "a0.png", "tags": "sky;sea"}) + "\n"
                 + json.dumps({"path": "a1.png", "tags": ["sky", "sea"]}) + "\n")
    items = read_manifest(m, root, None)
    assert items.concepts == ["sea", "sky"] and items.targets.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_stats_of_a_split_column_come_from_items_drawn_by_id_not_its_first_rows(tmp_path, monkeypatch):
    """A manifest concatenated from two sources (or sorted by class or date) pins its splits with a column,
    in its own order: the stats came from its first rows, one source alone (found on review: a dark first
    2,000 images put the bright rest at 8.7 sigma).  They come from items drawn by id now; a split drawn by
    id gives the same sample as before (its first items)."""
    from deepindex.data import splits as splits_module

    monkeypatch.setattr(splits_module, "_STATS_SAMPLE", 20)
    rows = ["path,tags,split"]
    for i in range(80):  # 40 dark train images, then 40 bright ones; a val and a test row
        arr = np.full((8, 8), 40 if i < 40 else 210, np.uint8)
        arr[0, 0] = i  # each image its own bytes (equal ones are one item)
        Image.fromarray(arr, mode="L").save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'a' if i % 2 else 'b'},{'val' if i == 78 else 'test' if i == 79 else 'train'}")
    (tmp_path / "tags.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, ["data.dataset=manifest", f"data.root={tmp_path}", "data.image_size=8",
                             "data.channels=1", "data.preset=fit"])
    mean = build_splits(cfg.data, train_augment=False).stats.mean[0]
    assert 0.35 < mean < 0.70, mean  # both sources (all dark: 40/255 = 0.16; all bright: 0.82)
    # Without the column, the split is drawn by id and its first items are the sample, as before.
    assert np.array_equal(splits_module.stats_sample([str(i) for i in range(10)], 0, 20), np.arange(10))
    ids = [f"x{i}" for i in range(100)]
    order = splits_module.id_order(ids, 3)
    assert np.array_equal(splits_module.stats_sample([ids[i] for i in order], 3, 20), np.arange(20))
