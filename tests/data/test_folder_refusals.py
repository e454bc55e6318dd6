"""Image folders that cannot train a model (found on review): an image that does not decode, far from the
few the inspection samples, failed inside a Ray Data task, ~50 lines of its traceback on the console and
a last line "UserCodeException: UDF failed to process a data block" naming no file; a single class folder
trained a "perfect" model (loss 0) without a word.  Both are refused in one line, as a manifest's bad row
is, before anything trains; a collection import still files one folder's images under its name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepindex.data.files import read_image_folder
from support import ONE_WORKER

HINT = ("an image folder needs at least 2 class folders; for images with no classes write a tags.csv "
        "(data.dataset=manifest)")


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24), dtype=np.uint8)).save(path)


def _folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 6) -> Path:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            _png(root / c / f"{i}.png", 10 * ci + i)
    return root


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _train(tmp_path: Path, root: Path, pipeline: str) -> list[str]:
    return ["train", "data.dataset=image-folder", f"data.root={root}", f"data.pipeline={pipeline}",
            "data.image_size=16", "data.channels=1", f"data.cache_dir={tmp_path / 'cache'}",
            "model.channels=[4]", "model.embed_dim=8", "train.batch_size=2", "train.epochs=1", *ONE_WORKER]


def _trained_anything(tmp_path: Path) -> list[Path]:
    """Checkpoints, and a decode cache written whole, anywhere under the test's folders."""
    return [p for p in tmp_path.rglob("*") if p.name.startswith("checkpoint_") or p.name == "cache.json"]


def test_an_image_that_does_not_decode_is_named_by_the_read_that_hashes_the_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path / "pets")
    _cut_short(root / "dog" / "3.png")
    with pytest.raises(ValueError) as e:
        read_image_folder(root)
    assert str(e.value) == f"data.root: unreadable image dog/3.png in {root} (OSError: image file is truncated)"
    (root / "dog" / "3.png").write_bytes(b"not an image at all")  # PIL names its stream: not in the line
    with pytest.raises(ValueError, match=r"^data\.root: unreadable image dog/3\.png in .* \(UnidentifiedImageError: "
                                         r"cannot identify image file\)$"):
        read_image_folder(root)
    assert len(read_image_folder(root, dedupe=False).paths) == 12  # a listing reads no image's bytes


@pytest.mark.parametrize("pipeline", ["ray", "local"])
def test_train_on_an_image_folder_with_an_image_cut_short_fails_in_one_line_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_local: None, pipeline: str) -> None:
    from deepindex.cli import main

    root = _folder(tmp_path / "pets", per_class=8)
    _cut_short(root / "dog" / "5.png")  # its header is whole: the inspection (headers only) passes it
    capsys.readouterr()
    assert main(_train(tmp_path, root, pipeline)) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the run's first event lines, then the error
    assert err[-1] == (f"deepindex train: error: data.root: unreadable image dog/5.png in {root} (OSError: image "
                       "file is truncated)"), err
    assert not any("Traceback" in line or "UserCodeException" in line for line in err), err
    assert _trained_anything(tmp_path) == []


def test_an_image_folder_of_one_class_is_refused_for_training_not_for_a_collection(tmp_path: Path) -> None:
    from deepindex.collection.imports import folder_source

    root = _folder(tmp_path / "one", classes=("images",))
    with pytest.raises(ValueError) as e:
        read_image_folder(root)
    assert str(e.value) == f"data.root: {root} holds 1 class folder (images): {HINT}"
    assert read_image_folder(root, dedupe=False).concepts == ["images"]  # a listing: as before
    with pytest.raises(ValueError, match="holds 1 class folder"):
        read_image_folder(root, dedupe=False, min_classes=2)
    src = folder_source(root)  # `collection import --folder`: one folder's images tagged with its name
    assert len(src.ids) == 6 and all(t == ["images"] for t in src.tags)
    _png(root / "others" / "0.png", 99)
    assert read_image_folder(root).concepts == ["images", "others"]
    # A lone split folder keeps its own message (point data.root into it), not this one.
    lone = _folder(tmp_path / "tv" / "train", classes=("cat", "dog")).parent
    with pytest.raises(ValueError, match=r"holds train folders \(a split, not classes\)"):
        read_image_folder(lone)


@pytest.mark.parametrize("pipeline", ["ray", "local"])
def test_train_on_an_image_folder_of_one_class_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], pipeline: str) -> None:
    import ray

    from deepindex.cli import main

    root = _folder(tmp_path / "one", classes=("images",), per_class=8)
    capsys.readouterr()
    ray.shutdown()  # refused before Ray starts (an earlier test may have left the session's up)
    assert main(_train(tmp_path, root, pipeline)) == 2
    assert not ray.is_initialized()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"deepindex train: error: data.root: {root} holds 1 class folder (images): {HINT}", err
    assert not any("Traceback" in line for line in err), err
    assert _trained_anything(tmp_path) == []


def test_failure_line_names_the_error_a_ray_data_task_raised_not_its_wrapper(tmp_path: Path, ray_local: None) -> None:
    """Ray Data wraps a map function's exception in "UserCodeException: UDF failed to process a data block",
    whose cause does not cross to the driver; the console's one line named that wrapper, not the file."""
    from deepindex.console import failure_line
    from deepindex.data.cache import _decode_all

    root = _folder(tmp_path / "pets", per_class=2)
    bad = root / "dog" / "1.png"
    _cut_short(bad)  # decoded by a Ray Data task: what an image changed after the folder was read meets
    paths = {"train": sorted(root.rglob("*.png")), "val": [], "test": []}
    with pytest.raises(Exception) as e:  # whatever Ray raises: its type names no file
        _decode_all(paths, tmp_path / "out", (1, 16, "fit"))
    assert "UserCodeException" in type(e.value).__name__  # as found: the task's exception only in its text
    assert failure_line(e.value).startswith(f"UnreadableImage: {bad}: unreadable image (OSError: image file is "
                                            "truncated"), failure_line(e.value)


def test_failure_line_follows_the_chain_of_causes_to_an_error_of_ours() -> None:
    from deepindex.config import ConfigError
    from deepindex.console import failure_line
    from deepindex.data.transforms import UnreadableImage

    try:
        try:
            raise UnreadableImage("cat/0.png: unreadable image (OSError: image file is truncated)")
        except UnreadableImage as inner:
            raise RuntimeError("a block failed") from inner
    except RuntimeError as outer:
        assert failure_line(outer) == "UnreadableImage: cat/0.png: unreadable image (OSError: image file is truncated)"

    class Wrapper(Exception):  # a wrapper with a ``cause`` (as Ray's task errors have)
        def __init__(self, cause: BaseException) -> None:
            super().__init__("wrapped")
            self.cause = cause

    assert failure_line(Wrapper(ConfigError("optim.lr: must be > 0"))) == "ConfigError: optim.lr: must be > 0"
    assert failure_line(Wrapper(KeyError("x"))) == "KeyError: 'x'"  # as before: the wrapped exception
    assert failure_line(RuntimeError("boom\nmore")) == "RuntimeError: boom"
