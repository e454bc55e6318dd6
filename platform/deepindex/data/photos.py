"""An example colour photo collection, on disk like a user's: JPEGs + ``tags.csv`` + ``concepts.txt``.

Built deterministically from the colour photographs that ship inside the dependencies
(scikit-learn's ``china.jpg`` and ``flower.jpg``; scikit-image's astronaut, cat, coffee,
motorcycle, rocket, IHC slide, retina and Hubble deep field), nothing downloaded.  Each image
is a square crop of one photo, resized to ``size`` px, with 1-3 filled shapes drawn on it:

- shapes ``circle``, ``square``, ``triangle`` (tilted up to 15 degrees), 24-36 % of the side, inside
  the central 87.5 % (so the ``photo`` preset's centre crop never cuts one), not overlapping;
- colours ``red``, ``green``, ``blue`` of equal luminance (ITU-R 601 luma ~100, then the same
  random brightness factor for every colour): a grayscale copy cannot tell them apart, so the
  colour concepts need colour;
- concepts (``DEFAULT_CONCEPTS``): the colours present, the shapes present, and two bindings,
  ``red_circle`` and ``blue_square`` (a red circle / blue square is present), which need colour
  and shape together.  Any colour, shape or ``<colour>_<shape>`` may be chosen instead.

Held-out split (the ``split`` column, 70/15/15 %): every photo is cut into regions; train
crops come from its left 70 %, val crops from the top of its right 30 %, test crops from the
bottom: the test backgrounds are pixels no training image holds.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

COLOURS = {"red": (225, 45, 45), "green": (30, 150, 30), "blue": (60, 90, 255)}  # luma 98.8, 100.4, 99.8
SHAPES = ("circle", "square", "triangle")
DEFAULT_CONCEPTS = ("red", "green", "blue", "circle", "square", "triangle", "red_circle", "blue_square")
PHOTOS = (("sklearn", "china.jpg"), ("sklearn", "flower.jpg"), ("skimage", "astronaut.png"),
          ("skimage", "chelsea.png"), ("skimage", "coffee.png"), ("skimage", "motorcycle_left.png"),
          ("skimage", "rocket.jpg"), ("skimage", "ihc.png"), ("skimage", "retina.jpg"),
          ("skimage", "hubble_deep_field.jpg"))
SPLIT_FRACTIONS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
# Where in a photo each split's crops come from: (x0, y0, x1, y1) as fractions of width/height.
REGIONS = {"train": (0.0, 0.0, 0.7, 1.0), "val": (0.7, 0.0, 1.0, 0.5), "test": (0.7, 0.5, 1.0, 1.0)}
# A training recipe for this collection (dotted overrides, plus data.root=DIR): the ConvNet at
# 64 px, flip + crop augmentation, AdamW with a cosine decay.  The floor test, jobs/bench_photos.py
# and `make demo-photos` use it.
RECIPE = ("data.dataset=manifest", "data.image_size=64", "data.augment=flip,crop", "data.augment_strength=0.25",
          "model.channels=[16,32,64]", "model.convs_per_block=2", "model.dropout=0.1", "optim.name=adamw",
          "optim.lr=0.003", "optim.weight_decay=0.0001", "regularization.l2=0.0", "schedule.policy=cosine",
          "schedule.warmup_epochs=1", "train.batch_size=16", "train.epochs=12")
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-reduced: anti-aliased edges like a photo's
_UPRIGHT = {"square": math.pi / 4, "triangle": -math.pi / 2}  # polygon angle of an upright square / triangle
_MAX_TILT = 15.0  # degrees either way: shapes stand roughly upright, as drawn things in photos do
_PHOTO_SHORT_SIDE = 480  # photos are reduced once to this: crops of 30-45 % of it still exceed 128 px


@dataclass(frozen=True)
class PhotoCollection:
    root: Path
    manifest: Path
    concepts_file: Path
    train_config: Path  # RECIPE as a config file: deepindex train --config DIR/train.yaml
    concepts: list[str]
    counts: dict[str, int]  # images per split


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (importing scikit-learn takes seconds).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip = {"sklearn": "scikit-learn", "skimage": "scikit-image==0.26.0"}[package]
        raise ModuleNotFoundError(f"example photos: {package} is not installed (pip install {pip})")
    return Path(next(iter(spec.submodule_search_locations)))


def _photo(source: str, name: str) -> Image.Image:
    sub = ("datasets", "images") if source == "sklearn" else ("data",)
    path = _package_dir(source).joinpath(*sub, name)
    if not path.is_file():
        raise FileNotFoundError(f"example photos: {path} does not ship with {source} (nothing is downloaded)")
    with Image.open(path) as file:
        im = file.convert("RGB")
    if min(im.size) > _PHOTO_SHORT_SIDE:
        f = _PHOTO_SHORT_SIDE / min(im.size)
        im = im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.LANCZOS)
    return im


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[Image.Image, ...]:
    """The shipped colour photos, in a fixed order, reduced to a 480 px shorter side (cached)."""
    return tuple(_photo(src, name) for src, name in PHOTOS)


def check_concepts(concepts: list[str] | tuple[str, ...]) -> list[str]:
    out = []
    for c in concepts:
        colour, _, shape = c.partition("_")
        ok = c in COLOURS or c in SHAPES or (colour in COLOURS and shape in SHAPES)
        if not ok:
            raise ValueError(f"concepts: {c!r} is not a colour ({', '.join(COLOURS)}), a shape ({', '.join(SHAPES)}) "
                             f"or colour_shape")
        if c in out:
            raise ValueError(f"concepts: {c!r} given twice")
        out.append(c)
    if not out:
        raise ValueError("concepts: none given")
    return out


def _shape_polygon(kind: str, cx: float, cy: float, d: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        r = 0.8 * d / math.sqrt(2)  # side 0.8 d: about the area of the circle of diameter d
        return [(cx + r * math.cos(angle + k * math.pi / 2), cy + r * math.sin(angle + k * math.pi / 2))
                for k in range(4)]
    r = 0.6 * d  # triangle: circumradius 0.6 d
    return [(cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
            for k in range(3)]


def _place(rng: np.random.Generator, k: int, size: int) -> list[tuple[float, float, float]]:
    """Up to ``k`` non-overlapping (cx, cy, diameter) inside the central 87.5 % of the image."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(k):
        for _try in range(60):
            d = rng.uniform(0.24, 0.36) * size
            margin = d * 0.62 + 0.0625 * size  # triangle circumradius 0.6 d, plus the crop border
            cx, cy = rng.uniform(margin, size - margin, size=2)
            if all(math.hypot(cx - x, cy - y) > 0.62 * (d + e) for x, y, e in placed):
                placed.append((float(cx), float(cy), float(d)))
                break
    return placed


def render(photo: Image.Image, region: tuple[float, float, float, float], rng: np.random.Generator,
           size: int) -> tuple[Image.Image, list[tuple[str, str]]]:
    """One image: a square crop of ``photo`` within ``region``, with 1-3 shapes; and its (colour, shape)s."""
    W, H = photo.size
    x0, y0, x1, y1 = region[0] * W, region[1] * H, region[2] * W, region[3] * H
    side = min(rng.uniform(0.3, 0.45) * min(W, H), x1 - x0, y1 - y0)
    left, top = rng.uniform(x0, x1 - side), rng.uniform(y0, y1 - side)
    img = photo.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    big = size * _SUPERSAMPLE
    overlay = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    drawn = []
    for cx, cy, d in _place(rng, int(rng.integers(1, 4)), size):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        # One brightness factor for any colour, so luma says nothing about which colour it is.
        f = rng.uniform(0.75, 1.25)
        fill = (*(int(np.clip(c * f + rng.integers(-8, 9), 0, 255)) for c in COLOURS[colour]), 255)
        edge = (*(int(c * 0.6) for c in fill[:3]), 255)
        width = max(1, int(0.015 * big))
        cx, cy, d = cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, d * _SUPERSAMPLE
        if kind == "circle":
            draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=fill, outline=edge, width=width)
        else:
            tilt = _UPRIGHT[kind] + math.radians(rng.uniform(-_MAX_TILT, _MAX_TILT))
            draw.polygon(_shape_polygon(kind, cx, cy, d, tilt), fill=fill, outline=edge,
                         width=width)
        drawn.append((colour, kind))
    overlay = overlay.reduce(_SUPERSAMPLE)  # (size, size): box average of 4x4 blocks
    return Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB"), drawn


def tags_of(drawn: list[tuple[str, str]], concepts: list[str]) -> list[str]:
    present = {c for c, _ in drawn} | {s for _, s in drawn} | {f"{c}_{s}" for c, s in drawn}
    return [c for c in concepts if c in present]


def _split_plan(n: int, seed: int) -> list[str]:
    counts = [round(f * n) for _, f in SPLIT_FRACTIONS[1:]]
    plan = ["val"] * counts[0] + ["test"] * counts[1]
    plan = ["train"] * (n - len(plan)) + plan
    order = np.random.default_rng([seed, 7]).permutation(n)
    return [plan[i] for i in order]


def make_photo_collection(out: str | Path, n: int = 600, size: int = 160, seed: int = 0,
                          concepts: list[str] | tuple[str, ...] = DEFAULT_CONCEPTS,
                          quality: int = 90) -> PhotoCollection:
    """Write ``n`` JPEGs, ``tags.csv`` (path, tags, split) and ``concepts.txt`` under ``out``.

    Deterministic: the same arguments write the same bytes.
    """
    if not 128 <= size <= 224:
        raise ValueError(f"size: {size} px is outside 128-224")
    if n < 20:
        raise ValueError(f"n: {n} images are too few for train/val/test splits (at least 20)")
    concepts = check_concepts(list(concepts))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    plan = _split_plan(n, seed)
    rows = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        split = plan[i]
        photo = photos[int(rng.integers(len(photos)))]
        img, drawn = render(photo, REGIONS[split], rng, size)
        name = f"img-{i:05d}.jpg"
        img.save(out / name, "JPEG", quality=quality)
        rows.append((name, ";".join(tags_of(drawn, concepts)), split))
    with open(out / "tags.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "tags", "split"])
        w.writerows(rows)
    (out / "concepts.txt").write_text("".join(c + "\n" for c in concepts), encoding="utf-8")
    (out / "train.yaml").write_text(recipe_yaml(out), encoding="utf-8")
    counts = {s: plan.count(s) for s, _ in SPLIT_FRACTIONS}
    log.info("example photos: %d images (%s) of %d px in %s", n, counts, size, out)
    return PhotoCollection(out, out / "tags.csv", out / "concepts.txt", out / "train.yaml", concepts, counts)


def recipe_yaml(root: Path) -> str:
    """RECIPE as a training config file (sections of keys), with ``data.root`` set to ``root``."""
    from deepindex.config import parse_overrides

    nested: dict = {}
    for key, value in {**parse_overrides(list(RECIPE)), "data.root": str(Path(root).resolve())}.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return "# deepindex train --config THIS_FILE: a recipe for the example photo collection\n" + \
        yaml.safe_dump(nested, sort_keys=False)


def digest(root: str | Path) -> str:
    """A hash of a collection's images, tags.csv and concepts.txt (names and bytes).

    ``train.yaml`` is left out: it names the folder, which differs between equal collections.
    """
    h = hashlib.sha256()
    for p in sorted(Path(root).iterdir()):
        if p.is_file() and p.name != "train.yaml":
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()
