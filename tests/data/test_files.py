import json

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
