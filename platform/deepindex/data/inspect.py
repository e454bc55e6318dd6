"""Fill in what a data config leaves unset, from its preset or from the images themselves.

``data.channels``, ``data.image_size``, ``data.preset`` and ``data.normalize`` may be left
unset.  The digit datasets and CIFAR have fixed answers; a file collection (image folder or
manifest) is inspected: a sample of image headers says whether it holds colour (RGB stays
RGB) and what size its images are.  :func:`resolve_config` runs once on the driver (before
Ray Train starts its workers), logs what it chose in one line, and the workers, the
checkpoint and serving all see the resolved values.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from deepindex.data.transforms import PRESETS

if TYPE_CHECKING:
    from deepindex.config import Config, DataConfig

log = logging.getLogger(__name__)

SAMPLE = 256  # headers read to infer channels and size: enough for a median, cheap on any folder
MIN_SIZE, MAX_SIZE = 32, 224  # an inferred size stays in what the registered models train well on
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"}
_FIXED = {  # dataset -> (preset, channels, image_size): no data to inspect
    "digit-scenes": ("digit", 1, 32),
    "digits": ("digit", 1, 32),
    "cifar10": ("digit", 3, 32),
    "cifar100": ("digit", 3, 32),
}


@dataclass(frozen=True)
class ImageFormat:
    sampled: int
    total: int
    colour: int  # sampled images with colour
    short_side: int  # median shorter side, px



# The data keys that say how a model sees an image (the rest say which images): resolved once and
# kept in its checkpoint, so serving and any later scoring show it images the way it was trained on.
INPUT_KEYS = ("preset", "channels", "image_size", "normalize")

def _is_colour(im: Image.Image) -> bool:
    if im.mode in _COLOUR_MODES:
        return True
    if im.mode in ("P", "PA"):
        pal = im.getpalette() or []
        return any(not (pal[i] == pal[i + 1] == pal[i + 2]) for i in range(0, len(pal) - 2, 3))
    return False  # 1, L, LA, I, I;16, F


def inspect_images(paths: list[Path], sample: int = SAMPLE) -> ImageFormat:
    """Colour and size of an evenly spaced sample of ``paths`` (headers only, no decoding)."""
    if not paths:
        raise ValueError("data.root: no images to inspect")
    # Spread over the whole list (class folders are sorted: whole classes went unlooked-at when 257 to 511
    # paths gave a step of 1 and the first 256; found on review).
    picked = [paths[i] for i in np.linspace(0, len(paths) - 1, min(sample, len(paths))).round().astype(int)]
    colour, shorts = 0, []
    for p in picked:
        try:
            with Image.open(p) as im:
                colour += _is_colour(im)
                shorts.append(min(im.size))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:  # the bomb: a huge image
            raise ValueError(f"data.root: unreadable image {p} ({e.__class__.__name__})") from None
    return ImageFormat(len(picked), len(paths), colour, int(statistics.median(shorts)))


def data_files(d: DataConfig) -> list[Path]:
    """The image files of a file dataset (``config.FILE_DATASETS``), listed and parsed, not decoded: a
    missing folder, manifest or file fails here."""
    from deepindex.data.files import read_collection, read_image_folder

    if d.dataset == "image-folder":
        if not d.root:
            raise ValueError("data.root: required for an image folder")
        return read_image_folder(d.root, dedupe=False, min_classes=2).paths  # one class: refused before Ray
    if not d.root:
        raise ValueError("data.root: required for a manifest (paths in it are relative to the root)")
    # Parse only: every row's file exists, no decoding or hashing (the workers do that).
    items = read_collection(d.root, d.manifest, d.concepts, unknown_tags=d.unknown_tags, check_images=False,
                            dedupe=False)
    return items.paths


def _size_from(short_side: int) -> int:
    return max(MIN_SIZE, min(MAX_SIZE, short_side)) // 8 * 8


def resolve_data(d: DataConfig, *, pretrained: bool = False) -> tuple[DataConfig, list[str]]:
    """(a DataConfig with channels, image_size, preset and normalize set, notes on what was inferred)."""
    notes: list[str] = []
    updates: dict[str, Any] = {}
    if d.dataset in _FIXED:
        preset, channels, size = _FIXED[d.dataset]
        if d.preset not in (None, preset):
            # These images are made in memory at their size; another preset would only change serving.
            raise ValueError(f"data.preset: {d.dataset} uses the {preset} preset, not {d.preset}")
        updates = {"preset": preset, "channels": d.channels or channels, "image_size": d.image_size or size}
    elif d.preset == "photo":  # RGB 224 px: what ImageNet-style models take
        p = PRESETS[d.preset]
        updates = {"preset": d.preset, "channels": d.channels or p.channels,
                   "image_size": d.image_size or p.image_size}
    elif d.preset == "digit":  # a transform (squash to S x S) at its own size, on what the files hold
        # Its channels come from the images as with fit: colour photos squashed for speed stayed colour
        # in nobody's run but came out grey, without a word (found on review).
        p = PRESETS[d.preset]
        updates = {"preset": d.preset, "channels": d.channels, "image_size": d.image_size or p.image_size}
        if d.channels is None:
            fmt = inspect_images(data_files(d))
            updates["channels"] = 3 if fmt.colour else 1
            notes.append(f"data.channels={updates['channels']} ({fmt.colour} colour of {fmt.sampled} images "
                         f"sampled from {fmt.total})")
        if d.image_size is None:
            notes.append(f"data.image_size={p.image_size} (the digit preset's)")
    else:  # fit, or nothing said: what the files hold
        updates = {"preset": "fit", "channels": d.channels, "image_size": d.image_size}
        if d.channels is None or d.image_size is None:
            fmt = inspect_images(data_files(d))
            seen = f"{fmt.sampled} images sampled from {fmt.total}"
            if d.channels is None:
                updates["channels"] = 3 if fmt.colour else 1
                notes.append(f"data.channels={updates['channels']} ({fmt.colour} colour of {seen})")
            if d.image_size is None:
                updates["image_size"] = _size_from(fmt.short_side)
                notes.append(f"data.image_size={updates['image_size']} (median shorter side {fmt.short_side} px "
                             f"of {seen}, kept within {MIN_SIZE}-{MAX_SIZE})")
        if d.preset is None:
            notes.append(f"data.preset=fit (shorter side to {updates['image_size']} px, centre crop; "
                         f"data.preset=photo for ImageNet-style 224 px)")
    updates["normalize"] = d.normalize or ("imagenet" if pretrained else "dataset")
    if d.normalize is None and updates["normalize"] == "imagenet":
        notes.append("data.normalize=imagenet (the pretrained weights expect ImageNet's mean and std)")
    if all(getattr(d, k) == v for k, v in updates.items()):
        return d, []
    return d.model_copy(update=updates), notes


def resolve_config(cfg: Config, announce: bool = False) -> Config:
    """``cfg`` with its data section resolved; logs what was inferred, once, on the caller's side
    (``announce``: on the console, as a command starting a run does)."""
    from deepindex.console import announce as console_line
    from deepindex.models.transfer import expects_imagenet_input

    # ImageNet weights expect ImageNet's mean and std, fetched (model.pretrained) or as a torchvision file
    # (model.weights, what a machine without internet is given); the file is read only while it matters.
    d, notes = resolve_data(cfg.data, pretrained=cfg.data.normalize is None and expects_imagenet_input(cfg.model))
    if d is cfg.data:
        return cfg
    if notes:
        msg = "data: inferred %s; set these keys to choose otherwise"
        if announce:
            console_line(False, msg, "; ".join(notes))
        else:
            log.info(msg, "; ".join(notes))
    return cfg.override({f"data.{k}": getattr(d, k) for k in INPUT_KEYS})
