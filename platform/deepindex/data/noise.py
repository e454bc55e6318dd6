"""Synthetic web-label noise: a reproducible noisy benchmark with the clean labels kept.

``data.label_noise=p`` corrupts the tag sets of the train and validation splits (both stand
for "web data"); the test split stays clean, so a test score always measures the truth.

What the rate means: **p is the fraction of items whose tag set is wrong.**  Exactly
``round(p * N)`` items of a split, chosen at random, get one corruption each, its kind drawn
uniformly from the three mistakes a web tagger makes:

- ``drop``:  one true tag is missing           (1 (item, concept) pair flipped 1 -> 0)
- ``add``:   one false tag is added            (1 pair flipped 0 -> 1)
- ``swap``:  one true tag replaced by a false one (2 pairs: a missing and a wrong tag)

So "30 % label noise" means 30 % of the images carry a wrong tag set, as in "30 % of the
web results are mislabeled", and on average 4/3 (item, concept) pairs per corrupted item
are wrong.  An item with no tag can only get ``add``; one tagged with every concept only
``drop``.

Exclusive classes (``digits``, an image folder: (N,) class indices) have one mistake, ``relabel``:
the item is given another class, drawn uniformly (an image filed under the wrong query).  As (item,
concept) pairs that is a swap: the true class missing, a wrong one given.

Everything is a pure function of (clean labels, p, seed, split), so every Ray
worker derives the same noisy labels, and :class:`NoisyLabels` keeps the clean labels and
the mask of flipped pairs, against which an audit's detections are scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("drop", "add", "swap")
RELABEL = "relabel"  # the one mistake of an exclusive label
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}
_NOISE_STREAM = 0x5EED_0016  # keeps the noise stream apart from the scene generator's


@dataclass(frozen=True)
class NoisyLabels:
    clean: torch.Tensor  # (N, K) float 0/1: the truth (exclusive classes: (N,) int64)
    noisy: torch.Tensor  # (N, K) float 0/1: what training sees (exclusive classes: (N,) int64)
    flipped: torch.Tensor  # (N, K) bool: pairs where noisy != clean (for either kind of labels)
    kinds: list[str | None]  # per item: the corruption applied, or None

    @property
    def item_rate(self) -> float:
        """Fraction of items whose tag set differs from the truth."""
        return float(self.flipped.any(dim=1).float().mean()) if len(self.flipped) else 0.0


def multi_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, K) bool labels: a multi-hot matrix as it is, (N,) class indices one-hot."""
    if y.ndim == 2:
        return y > 0.5
    return torch.nn.functional.one_hot(y.long(), num_classes).bool()


def _chosen(n: int, rate: float, seed: int, split: str) -> tuple[np.random.Generator, np.ndarray]:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"data.label_noise: {rate} is not a rate in [0, 1]")
    rng = np.random.default_rng([seed, _SPLIT_STREAM.get(split, 3), _NOISE_STREAM])
    return rng, (rng.choice(n, size=round(rate * n), replace=False) if n else np.array([], dtype=int))


def corrupt_classes(clean: torch.Tensor, num_classes: int, rate: float, seed: int, split: str = "train"
                    ) -> NoisyLabels:
    """Give ``round(rate * N)`` items of (N,) class indices another class, drawn uniformly."""
    y = clean.detach().long().cpu().numpy()
    noisy = y.copy()
    kinds: list[str | None] = [None] * len(y)
    rng, chosen = _chosen(len(y), rate, seed, split)
    if num_classes > 1:
        for i in np.sort(chosen):
            other = int(rng.integers(num_classes - 1))
            noisy[i] = other + (other >= y[i])
            kinds[i] = RELABEL
    clean_t, noisy_t = torch.from_numpy(y), torch.from_numpy(noisy)
    flipped = multi_hot(clean_t, num_classes) ^ multi_hot(noisy_t, num_classes)
    return NoisyLabels(clean_t, noisy_t, flipped, kinds)


def corrupt(clean: torch.Tensor, rate: float, seed: int, split: str = "train",
            num_classes: int | None = None) -> NoisyLabels:
    """Corrupt ``round(rate * N)`` items of a (N, K) multi-hot matrix, or of (N,) class indices of
    ``num_classes`` exclusive classes (:func:`corrupt_classes`); see the module doc."""
    if clean.ndim == 1 and num_classes is not None:
        return corrupt_classes(clean, num_classes, rate, seed, split)
    if clean.ndim != 2:
        raise ValueError("data.label_noise: needs multi-label targets (N, K) or class indices and their number")
    y = clean.detach().to(torch.float32).cpu().numpy() > 0.5  # (N, K) bool
    n = y.shape[0]
    flipped = np.zeros_like(y)
    kinds: list[str | None] = [None] * n
    rng, chosen = _chosen(n, rate, seed, split)
    for i in np.sort(chosen):
        present, absent = np.flatnonzero(y[i]), np.flatnonzero(~y[i])
        possible = [kd for kd in KINDS
                    if (kd != "add" or len(absent)) and (kd != "drop" or len(present))
                    and (kd != "swap" or (len(present) and len(absent)))]
        if not possible:  # K == 0: nothing to corrupt
            continue
        kind = possible[int(rng.integers(len(possible)))]
        if kind in ("drop", "swap"):
            flipped[i, rng.choice(present)] = True
        if kind in ("add", "swap"):
            flipped[i, rng.choice(absent)] = True
        kinds[i] = kind
    noisy = y ^ flipped
    return NoisyLabels(torch.from_numpy(y.astype(np.float32)), torch.from_numpy(noisy.astype(np.float32)),
                       torch.from_numpy(flipped), kinds)
