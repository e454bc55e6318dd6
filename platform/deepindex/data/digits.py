"""digit-scenes: the embedded default dataset, built from scikit-learn's bundled digits.

``sklearn.datasets.load_digits`` ships 1,797 real handwritten 8x8 glyphs (no download).
A *scene* is a square canvas holding 1..max_digits glyphs at random positions and scales;
its concepts are the digits present (multi-label, 10 concepts).  The single-label variant
(``digits``) holds exactly one glyph per canvas.  Train, validation and test scenes draw
from disjoint glyph sets, so a test score measures generalisation to unseen handwriting.

Everything is a pure function of (split, sizes, seed): two workers on two nodes build the
same tensors without shipping them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CONCEPTS = [str(d) for d in range(10)]
SPLITS = ("train", "val", "test")
# Fractions of the 1,797 glyphs given to each split (disjoint sets of writers' glyphs).
GLYPH_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


@dataclass(frozen=True)
class TensorSplit:
    images: torch.Tensor  # (N, 1, S, S) float32 in [0, 1]
    targets: torch.Tensor  # (N, 10) float32 multi-hot, or (N,) int64 class index
    concepts: list[str]


def glyph_split(seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of the bundled glyphs per split; disjoint, deterministic in ``seed``."""
    n = len(_load_glyphs()[1])
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(GLYPH_FRACTIONS["train"] * n)
    n_val = int(GLYPH_FRACTIONS["val"] * n)
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


@functools.lru_cache(maxsize=1)
def _load_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """The glyphs and their digits, (1797, 8, 8) in [0, 1] and (1797,): ``load_digits()``'s data, read
    from the file scikit-learn ships without importing ``sklearn.datasets`` (1.7 s of imports, paid
    by every Train worker that builds a digit dataset).  Read-only arrays: callers copy what they change."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("data: the digit datasets need scikit-learn (pip install scikit-learn)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float32)  # (1797, 65): 64 pixels (0..16), the digit
    images = (raw[:, :-1] / 16.0).reshape(-1, 8, 8)
    targets = raw[:, -1].astype(np.int64)
    images.flags.writeable = False
    targets.flags.writeable = False
    return images, targets


def make_scenes(
    split: str,
    n: int,
    *,
    image_size: int = 32,
    max_digits: int = 4,
    multilabel: bool = True,
    seed: int = 0,
) -> TensorSplit:
    """Build ``n`` scenes of ``split`` ("train", "val" or "test").

    Multi-label scenes place 1..max_digits glyphs, one per cell of a 2x2 grid, so glyphs
    never hide each other and the label (the set of digits present) is always visible.
    Single-label scenes place one glyph anywhere on the canvas.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if multilabel and not 1 <= max_digits <= 4:
        raise ValueError(f"data.max_digits: 1 to 4 (one glyph per cell of a 2x2 grid), got {max_digits}")
    glyphs, labels = _load_glyphs()
    pool = glyph_split(seed)[split]
    # Each split gets its own stream, so changing train_size does not change the test set.
    rng = np.random.default_rng([seed, SPLITS.index(split), int(multilabel)])
    canvas = np.zeros((n, image_size, image_size), dtype=np.float32)
    # (N, 10) multi-hot float32, or (N,) int64 class ids
    targets: np.ndarray = np.zeros((n, len(CONCEPTS)), dtype=np.float32) if multilabel else np.zeros(n, dtype=np.int64)

    cell = image_size // 2
    # Glyph side in pixels: multi-label glyphs fill 60-100% of a cell; single ones 35-75% of the canvas.
    lo, hi = (max(4, int(0.6 * cell)), cell) if multilabel else (max(4, int(0.35 * image_size)), int(0.75 * image_size))
    sizes = np.arange(lo, hi + 1)
    resized = _resize_cache(glyphs[pool], sizes.tolist())  # size -> (len(pool), s, s)
    d = _draw(rng, n, len(pool), sizes, image_size, max_digits if multilabel else 0)
    _paste(canvas, d, resized)
    digits = labels[pool[d.glyph]]
    if multilabel:
        targets[d.scene, digits] = 1.0
    else:
        targets[d.scene] = digits
    return TensorSplit(torch.from_numpy(canvas).unsqueeze(1), torch.from_numpy(targets), list(CONCEPTS))


@dataclass(frozen=True)
class Placements:
    """One row per glyph placed: its scene, glyph (index into the split's pool), side and top-left corner."""
    scene: np.ndarray
    glyph: np.ndarray
    side: np.ndarray
    y0: np.ndarray
    x0: np.ndarray


def _draw(rng: np.random.Generator, n: int, pool: int, sizes: np.ndarray, image_size: int,
          max_digits: int) -> Placements:
    """Where every glyph of ``n`` scenes goes.  ``max_digits`` > 0: multi-label scenes, 1..max_digits
    glyphs in distinct cells of a 2x2 grid, each inside its cell (so none overlaps another); 0: one
    glyph per scene, anywhere on the canvas.

    The draws are the ones this module has always made, one scalar at a time in the same order (a
    size is ``sizes[integers(len(sizes))]``, the very draw ``choice(sizes)`` makes): the scenes stay the
    same tensors, and so do the floors, audits and searches calibrated on them.  Only pasting (about
    half of the loop's cost) is done in bulk (:func:`_paste`)."""
    ns, rows = len(sizes), []
    side_of = sizes.tolist()
    if max_digits:
        cell = image_size // 2
        for i in range(n):
            for c in rng.choice(4, size=int(rng.integers(1, max_digits + 1)), replace=False).tolist():
                g = int(rng.integers(pool))
                s = side_of[int(rng.integers(ns))]
                y0 = (c // 2) * cell + int(rng.integers(0, cell - s + 1))
                rows.append((i, g, s, y0, (c % 2) * cell + int(rng.integers(0, cell - s + 1))))
    else:
        for i in range(n):
            g = int(rng.integers(pool))
            s = side_of[int(rng.integers(ns))]
            y0 = int(rng.integers(0, image_size - s + 1))
            rows.append((i, g, s, y0, int(rng.integers(0, image_size - s + 1))))
    a = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return Placements(a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4])


def _paste(canvas: np.ndarray, d: Placements, resized: dict[int, np.ndarray], chunk: int = 4096) -> None:
    """Write every placed glyph into ``canvas`` (N, S, S), a group of equal sides at a time, through
    flat indices.  Placements never overlap (one glyph per cell, or per scene), so plain assignment is exact."""
    _, h, w = canvas.shape
    flat = canvas.reshape(-1)
    for s in np.unique(d.side).tolist():
        rows = np.flatnonzero(d.side == s)
        offsets = (np.arange(s)[:, None] * w + np.arange(s)[None, :]).reshape(-1)  # a patch's pixels, row-major
        for part in np.array_split(rows, max(1, -(-len(rows) // chunk))):
            base = d.scene[part] * (h * w) + d.y0[part] * w + d.x0[part]
            flat[(base[:, None] + offsets[None, :]).reshape(-1)] = resized[s][d.glyph[part]].reshape(-1)


def _resize_cache(glyphs: np.ndarray, sizes: list[int]) -> dict[int, np.ndarray]:
    g = torch.from_numpy(glyphs).unsqueeze(1)  # (G, 1, 8, 8)
    out = {}
    for s in sizes:
        r = F.interpolate(g, size=(s, s), mode="bilinear", align_corners=False)
        out[s] = r.squeeze(1).clamp_(0, 1).numpy()
    return out
