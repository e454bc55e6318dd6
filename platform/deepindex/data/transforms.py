"""Transform presets shared by training, evaluation, indexing and serving.

A model only ever sees ``normalize(to_tensor(preset(image)))`` with the per-channel mean and
std of the training split (or ImageNet's, for pretrained weights), which travel in the
checkpoint together with the preset's name.  Serving calls :func:`pil_to_uint8` /
:func:`image_to_tensor` with the checkpoint's preset and stats: the same transform, no
second copy.  :func:`decode_file` is the one place a file becomes model pixels (path ->
uint8 (C, S, S)); training, indexing and a future Ray Data pipeline all go through it.

Presets (the eval transform; train-time augmentation comes after it, in ``data.augment``):

- ``digit``: squash the whole image to S x S (the digit datasets; also what a checkpoint
  without a preset gets, so older checkpoints serve as before);
- ``photo``: RGB, S = 224, shorter side to S / 0.875 then centre crop S (ImageNet eval);
- ``fit``: shorter side to S then centre crop S: no distortion, and a square image loses
  nothing (what a file collection gets when no preset is given).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

if TYPE_CHECKING:  # torch is imported where a tensor is made: decoding alone (the serving ingress) needs none
    import torch

log = logging.getLogger(__name__)

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Preset:
    name: str
    channels: int  # default when data.channels is unset (fit: inferred from the files instead)
    image_size: int  # default when data.image_size is unset (fit: inferred from the files instead)
    resize: str  # "squash" | "crop"
    crop_ratio: float = 1.0  # crop: the shorter side is resized to S / crop_ratio first


PRESETS = {
    "digit": Preset("digit", 1, 32, "squash"),
    "photo": Preset("photo", 3, 224, "crop", 0.875),
    "fit": Preset("fit", 3, 224, "crop", 1.0),
}


@dataclass(frozen=True)
class NormStats:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> NormStats:
        return cls(tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"]))


def compute_stats(images: torch.Tensor) -> NormStats:
    """Per-channel mean/std of a (N, C, H, W) float tensor in [0, 1]."""
    x = images.transpose(0, 1).reshape(images.shape[1], -1).double()  # (C, N*H*W)
    mean = x.mean(dim=1)
    std = x.std(dim=1).clamp_min(1e-6)
    return NormStats(tuple(mean.tolist()), tuple(std.tolist()))


def normalize(x: torch.Tensor, stats: NormStats) -> torch.Tensor:
    """(B, C, H, W) or (C, H, W) in [0, 1] -> zero mean, unit variance per channel."""
    import torch

    shape = (-1, 1, 1)
    mean = torch.tensor(stats.mean, dtype=x.dtype, device=x.device).view(shape)
    std = torch.tensor(stats.std, dtype=x.dtype, device=x.device).view(shape)
    return (x - mean) / std


def imagenet_stats(channels: int) -> NormStats:
    """ImageNet's mean/std (what torchvision's pretrained weights expect); gray = their average."""
    mean, std = IMAGENET_STATS
    if channels == 1:
        return NormStats((sum(mean) / 3,), (sum(std) / 3,))
    return NormStats(mean, std)


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """Upright RGB or L, whatever the file holds (EXIF rotation, CMYK, palette, alpha, 16 bit).

    Transparent pixels are composited on white: their stored colour is arbitrary (often black),
    and a white page is what a viewer shows.
    """
    img = ImageOps.exif_transpose(img)  # phone photos store "rotate 90" in EXIF, not in pixels
    # A transparency key of a palette, RGB or grey image too (PNG optimisers write an RGBA logo's binary
    # alpha as RGB + tRNS: its transparent pixels came out black, found on review).
    if ("transparency" in img.info and img.mode in ("P", "RGB", "L")) or img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/float grayscale: convert("L") clips rather than scales, so scale to 0..255 first.  A
        # float image whose values lie within 0..1 (what scientific and HDR tools write) is 0..1.
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(arr.max()) if arr.size else 0.0
        hi = (65535.0 if img.mode.startswith("I;16") or top > 255 else
              1.0 if img.mode == "F" and top <= 1.0 else 255.0)
        img = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8), mode="L")
    if channels == 1:
        return img.convert("L") if img.mode in ("L", "RGB") else img.convert("RGB").convert("L")
    return img.convert("RGB")


# Beyond this aspect ratio an image is cut around its centre before the preset's resize (its output is
# then a hair off torchvision's, which resizes the whole sliver); every photo's aspect is far below it.
MAX_ASPECT = 64


def preset_resize(img: Image.Image, image_size: int, preset: str | None = None) -> Image.Image:
    """The preset's geometric eval transform on the PIL image.

    Exactly what torchvision.transforms.v2's ``resize`` (bilinear) and ``center_crop`` do to a PIL
    image (the same output sizes, anchors and PIL filter; ``tests/data/test_inspect.py`` holds
    them to it), written with PIL alone so that a process that only decodes (the serving ingress)
    never imports torch.
    """
    p = PRESETS[preset or "digit"]
    s = image_size
    if p.resize == "squash":
        # PIL's own bilinear resize, as before presets existed: old checkpoints serve unchanged.
        return img if img.size == (s, s) else img.resize((s, s), Image.Resampling.BILINEAR)
    short = round(s / p.crop_ratio)
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        # A sliver (a 1 x 100000 PNG is 274 bytes): resized whole, its long side would take ~20 GB (found on
        # review: a dead replica).  Only its centre can reach the crop: cut to MAX_ASPECT:1 around it first.
        keep = MAX_ASPECT * min(w, h)
        img = (img.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h)) if w > h
               else img.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep)))
        w, h = img.size
    if min(w, h) != short:  # shorter side -> short, the longer one in proportion (rounded down)
        long = int(short * max(w, h) / min(w, h))
        img = img.resize((short, long) if w <= h else (long, short), Image.Resampling.BILINEAR)
        w, h = img.size
    top, left = round((h - s) / 2.0), round((w - s) / 2.0)  # banker's rounding, as torchvision
    return img.crop((left, top, left + s, top + s))


def pil_to_uint8(img: Image.Image, image_size: int, channels: int, preset: str | None = None) -> np.ndarray:
    """A PIL image -> (C, S, S) uint8 through the eval preset at the model's input size.

    What serving ships from the ingress to the model replica: a quarter of the float32 bytes.
    """
    img = preset_resize(to_model_mode(img, channels), image_size, preset)
    arr = np.array(img)  # a writable copy: torch.from_numpy of a read-only array warns
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (1, S, S) or (3, S, S)
    return np.ascontiguousarray(arr)


def uint8_to_unit(arr: np.ndarray) -> np.ndarray:
    """uint8 pixels (any shape) -> float32 in [0, 1]."""
    return arr.astype(np.float32) / np.float32(255.0)


# What decoding an image's bytes can raise for bytes alone (never a bug of ours): PIL's errors, the bomb
# guard, and the arithmetic or memory errors of absurd sizes.  A build or catch-up skips such an item.
UNDECODABLE: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, ArithmeticError, MemoryError,
                                                Image.DecompressionBombError)


# EXIF orientations that turn an image a quarter (transposed, rotated 90 or 270, transversed): upright, its
# width is the stored height.
_QUARTER_TURNS = (5, 6, 7, 8)  # a tuple: a damaged EXIF gives any value, a list too


def decode_whole(data: bytes) -> dict[str, Any]:
    """Width, height and format of the image ``data``, once every byte of it decodes (a JPEG at 1/8 scale, its
    DCT's own and fast); raises what PIL raises (:data:`UNDECODABLE`).  A header alone passes an image cut
    short, which training, a retrieval evaluation or an index build then failed on, unnamed (found on review).

    The size is the upright image's, as every decode shows it (:func:`to_model_mode` applies the EXIF
    orientation): a phone's portrait JPEG stored 80 x 40 with "rotate 90" was recorded 80 wide (found on review)."""
    with Image.open(io.BytesIO(data)) as im:
        width, height, fmt = int(im.width), int(im.height), im.format
        im.draft(im.mode, (1, 1))  # a no-op for any format but JPEG
        im.load()
        # The orientation ImageOps.exif_transpose reads, read after load(): a PNG's eXIf chunk may follow its pixels.
        if im.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS:
            width, height = height, width
    return {"width": width, "height": height, "format": fmt}


class UnreadableImage(OSError):
    """An image file that cannot be decoded; the message names it."""


def decode_file(path: str | Path | IO[bytes], image_size: int, channels: int, preset: str | None = None
                ) -> np.ndarray:
    """An image file (or its bytes, as a binary stream) -> (C, S, S) uint8 at the preset: the one decode
    step for files and stored items."""
    # No JPEG draft mode (a reduced-scale decode): serving decodes uploads at full scale, and
    # training must see the pixels serving will see.
    try:
        with Image.open(path) as im:
            return pil_to_uint8(im, image_size, channels, preset)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        if not isinstance(path, (str, Path)):
            raise
        # A file that cannot be decoded (cut short, damaged, too big): named, where a training or build
        # stops on it (found on review: "image file is truncated", from inside a Ray Data task).
        raise UnreadableImage(f"{path}: unreadable image ({e.__class__.__name__}: {e})") from e


def pil_to_unit_tensor(img: Image.Image, image_size: int, channels: int, preset: str | None = None) -> torch.Tensor:
    """A PIL image -> (C, S, S) float32 in [0, 1] through the eval preset."""
    import torch

    return torch.from_numpy(uint8_to_unit(pil_to_uint8(img, image_size, channels, preset)))


def image_to_tensor(img: Image.Image, image_size: int, channels: int, stats: NormStats,
                    preset: str | None = None) -> torch.Tensor:
    """The eval preset: PIL image -> normalised (C, S, S) model input."""
    return normalize(pil_to_unit_tensor(img, image_size, channels, preset), stats)
