"""Channels, size and preset come from the data when the config leaves them unset; printed once."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from deepindex.config import ConfigError, load_config
from deepindex.data import build_splits
from deepindex.data.inspect import resolve_config, resolve_data
from deepindex.data.transforms import image_to_tensor, pil_to_uint8, preset_resize


def _folder(root, mode, size, n=10):
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        colour = (10 * i, 100, 200 - 10 * i) if mode == "RGB" else 10 * i
        Image.new(mode, size, colour).save(d / f"{i}.png")
    return root


def test_builtin_datasets_resolve_without_looking_at_files():
    d, notes = resolve_data(load_config().data)
    assert (d.preset, d.channels, d.image_size, d.normalize) == ("digit", 1, 32, "dataset") and notes == []
    d, _ = resolve_data(load_config(None, ["data.dataset=cifar10"]).data)
    assert (d.channels, d.image_size) == (3, 32)
    with pytest.raises(ValueError, match=r"^data\.preset: digit-scenes uses the digit preset"):
        resolve_data(load_config(None, ["data.preset=photo"]).data)


@pytest.mark.timeout(120)
def test_colour_folder_stays_rgb_and_the_size_comes_from_the_images(tmp_path, caplog):
    root = _folder(tmp_path / "imgs", "RGB", (150, 100))
    cfg = load_config(None, ["data.dataset=image-folder", f"data.root={root}"])
    assert cfg.data.channels is None and cfg.data.image_size is None  # unset, not 1 and 32
    with caplog.at_level(logging.INFO, logger="deepindex.data.inspect"):
        resolved = resolve_config(cfg)
        again = resolve_config(resolved)
    d = resolved.data
    assert (d.channels, d.image_size, d.preset) == (3, 96, "fit")  # median shorter side 100 -> 96
    assert again is resolved  # resolved once: nothing to infer, nothing printed the second time
    lines = [r.getMessage() for r in caplog.records if r.name == "deepindex.data.inspect"]
    assert len(lines) == 1 and "data.channels=3" in lines[0] and "data.image_size=96" in lines[0]
    # A command starting a run (build_trainer) puts it on the console, an event: the README's promise that
    # the first lines say what was inferred (it went to the log file only).  A checkpoint's load does not.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deepindex.events"):
        resolve_config(cfg, announce=True)
    events = [r.getMessage() for r in caplog.records if r.name == "deepindex.events"]
    assert events == [lines[0]], events


def test_gray_folder_is_one_channel_and_explicit_keys_win(tmp_path):
    root = _folder(tmp_path / "imgs", "L", (40, 40))
    d, _ = resolve_data(load_config(None, ["data.dataset=image-folder", f"data.root={root}"]).data)
    assert (d.channels, d.image_size) == (1, 40)
    d, _ = resolve_data(load_config(None, ["data.dataset=image-folder", f"data.root={root}", "data.preset=fit"]).data)
    assert (d.channels, d.image_size, d.preset) == (1, 40, "fit")  # fit names a transform, not a format
    d, notes = resolve_data(load_config(None, ["data.dataset=image-folder", f"data.root={root}", "data.channels=3",
                                               "data.image_size=24"]).data)
    assert (d.channels, d.image_size) == (3, 24) and not any("channels" in n for n in notes)


def test_photo_preset_is_rgb_224_with_imagenet_centre_crop(tmp_path):
    root = _folder(tmp_path / "imgs", "L", (40, 40))
    d, _ = resolve_data(load_config(None, ["data.dataset=image-folder", f"data.root={root}", "data.preset=photo"]).data)
    assert (d.channels, d.image_size, d.preset) == (3, 224, "photo")
    # A 256x320 image whose border differs from its middle: resize 256, crop 224 drops the border.
    arr = np.zeros((320, 256, 3), np.uint8)
    arr[16:-16, 16:-16] = 200
    out = np.asarray(preset_resize(Image.fromarray(arr), 224, "photo"))
    assert out.shape == (224, 224, 3) and out.min() == 200
    # fit keeps the whole of a square image; digit squashes a non-square one.
    sq = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3) % 251)
    assert np.array_equal(np.asarray(preset_resize(sq, 64, "fit")), np.asarray(sq))
    assert np.asarray(preset_resize(Image.fromarray(arr), 32, "digit")).shape == (32, 32, 3)


def _torchvision_preset(img, size, preset):
    """The eval presets as torchvision.transforms.v2 computes them on a PIL image."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from deepindex.data.transforms import PRESETS

    p = PRESETS[preset]
    if p.resize == "squash":
        return F.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR)
    short = round(size / p.crop_ratio)
    if min(img.size) != short:
        img = F.resize(img, short, interpolation=InterpolationMode.BILINEAR)
    return F.center_crop(img, [size, size])


@pytest.mark.parametrize("preset", ["digit", "photo", "fit"])
def test_presets_are_torchvisions_resize_and_centre_crop_pixel_for_pixel(preset):
    """preset_resize is written with PIL alone (the ingress never imports torch); it must be what
    torchvision's v2 resize + centre crop give, on odd and even, tall, wide, small and large images."""
    rng = np.random.default_rng(0)
    for (w, h) in [(40, 40), (255, 320), (320, 255), (17, 301), (513, 97), (224, 224), (256, 256), (31, 32)]:
        for mode in ("L", "RGB"):
            shape = (h, w) if mode == "L" else (h, w, 3)
            img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
            for size in (32, 224, 48):
                ours = np.asarray(preset_resize(img, size, preset))
                theirs = np.asarray(_torchvision_preset(img, size, preset))
                assert ours.shape == theirs.shape == ((size, size) if mode == "L" else (size, size, 3))
                assert np.array_equal(ours, theirs), (w, h, mode, size, preset)


def test_decoding_for_the_model_imports_no_torch():
    """The serving ingress decodes and resizes uploads (pil_to_uint8) without torch in its process."""
    import subprocess
    import sys

    code = ("import sys, io, numpy as np; from PIL import Image; import serving.ingress, serving.decode; "
            "from deepindex.data.transforms import pil_to_uint8; "
            "im = Image.fromarray(np.zeros((50, 70, 3), np.uint8)); "
            "assert pil_to_uint8(im, 224, 3, 'photo').shape == (3, 224, 224); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.timeout(120)
def test_eval_preset_is_what_serving_computes(tmp_path):
    root = _folder(tmp_path / "imgs", "RGB", (50, 70))
    cfg = load_config(None, ["data.dataset=image-folder", f"data.root={root}", "data.augment=crop,flip,jitter"])
    sp = build_splits(cfg.data)
    x, _ = sp.test[0]
    with Image.open(sp.test.paths[0]) as im:  # the serving transform, with the checkpoint's stats
        served = image_to_tensor(im, sp.image_size, sp.channels, sp.stats, sp.preset)
    assert torch.allclose(x, served)
    with Image.open(sp.test.paths[0]) as im:
        assert pil_to_uint8(im, sp.image_size, sp.channels, sp.preset).shape == (3, 48, 48)


@pytest.mark.timeout(120)
def test_checkpoints_hold_resolved_data_keys(tmp_path):
    from deepindex.checkpoint import load_model, save_checkpoint
    from deepindex.models import build_model

    root = _folder(tmp_path / "imgs", "RGB", (40, 40))
    cfg = load_config(None, ["data.dataset=image-folder", f"data.root={root}", "model.channels=[4]",
                             "model.embed_dim=8"])
    sp = build_splits(cfg.data)
    m = build_model(cfg.model, len(sp.concepts), sp.channels)
    save_checkpoint(tmp_path / "ck", model=m, config=cfg, stats=sp.stats, concepts=sp.concepts, multilabel=False,
                    epoch=0)
    d = load_model(tmp_path / "ck").config.data
    assert (d.channels, d.image_size, d.preset, d.normalize) == (3, 40, "fit", "dataset")


def test_bad_preset_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^data\.preset"):
        load_config(None, ["data.preset=imagenet"])


def test_the_sample_spreads_over_the_whole_folder(tmp_path):
    """Found on review: 257 to 511 paths gave a step of 1 and the first 256 of them, so the classes sorted
    last (here the only colour ones) were never looked at."""
    from deepindex.data.inspect import inspect_images

    paths = []
    for i in range(300):
        p = tmp_path / f"{i:03d}.png"
        Image.new("RGB" if i >= 256 else "L", (12, 12), (200, 30, 30) if i >= 256 else 90).save(p)
        paths.append(p)
    fmt = inspect_images(paths)
    assert fmt.sampled == 256 and 30 <= fmt.colour <= 44  # most of the last 44 (the colour ones) are looked at


def test_digit_preset_on_colour_files_keeps_their_colour_and_says_so(tmp_path):
    """data.preset=digit names a transform (squash to S x S) at its own size; a user who picks it to squash
    colour photos gets colour, not 1-channel input without a word (found on review)."""
    root = _folder(tmp_path / "imgs", "RGB", (200, 150))
    d, notes = resolve_data(load_config(None, ["data.dataset=image-folder", f"data.root={root}",
                                               "data.preset=digit"]).data)
    assert (d.channels, d.image_size, d.preset) == (3, 32, "digit")
    assert any(n.startswith("data.channels=3 (") for n in notes) and "data.image_size=32 (the digit preset's)" in notes
    gray = _folder(tmp_path / "gray", "L", (40, 40))
    d, _ = resolve_data(load_config(None, ["data.dataset=image-folder", f"data.root={gray}", "data.preset=digit"]).data)
    assert (d.channels, d.image_size) == (1, 32)
    d, notes = resolve_data(load_config(None, ["data.dataset=image-folder", f"data.root={root}", "data.preset=digit",
                                               "data.channels=1", "data.image_size=48"]).data)
    assert (d.channels, d.image_size) == (1, 48) and notes == []  # explicit keys win, nothing to say


def test_a_torchvision_weights_file_is_normalised_as_imagenet_weights_are(tmp_path):
    """model.weights naming torchvision's own state dict (ImageNet weights fetched by hand, what a machine
    without internet is given) expects ImageNet's mean and std, as model.pretrained does; one of our files
    makes no such claim, and data.normalize set by the user wins."""
    from torchvision.models import resnet18

    root = _folder(tmp_path / "imgs", "RGB", (64, 64))
    tv = tmp_path / "resnet18-tv.pth"
    torch.save(resnet18().state_dict(), tv)
    ours = tmp_path / "ours.pt"
    torch.save({"body.net.conv1.weight": torch.zeros(64, 3, 7, 7)}, ours)
    base = ["data.dataset=image-folder", f"data.root={root}", "model.name=resnet18"]
    assert resolve_config(load_config(None, [*base, f"model.weights={tv}"])).data.normalize == "imagenet"
    assert resolve_config(load_config(None, [*base, f"model.weights={ours}"])).data.normalize == "dataset"
    assert resolve_config(load_config(None, [*base, f"model.weights={tv}", "data.normalize=dataset"])
                          ).data.normalize == "dataset"
