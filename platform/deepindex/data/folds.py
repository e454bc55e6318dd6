"""K-fold cross-validation folds of the train split (``data.cv_folds`` / ``data.cv_fold``).

A fold is a pure function of (number of items, number of folds, seed): the audit's driver,
every fold's Ray Train workers and the label filter all derive the same folds without
shipping index lists around.
"""
from __future__ import annotations

import numpy as np

_FOLD_STREAM = 0xF01D  # keeps fold assignment apart from the split and noise streams


def fold_ids(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """(n,) int: the fold of every item; folds differ in size by at most one item."""
    if folds < 2:
        raise ValueError(f"data.cv_folds: needs at least 2 folds, got {folds}")
    if n < folds:  # (the audit checks its own audit.folds before it sets data.cv_folds)
        raise ValueError(f"data.cv_folds: {folds} folds need at least {folds} train items, there are {n}")
    order = np.random.default_rng([seed, _FOLD_STREAM]).permutation(n)
    ids = np.empty(n, dtype=np.int64)
    ids[order] = np.arange(n) % folds
    return ids


def fold_split(n: int, folds: int, fold: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices trained on, held-out indices) of ``fold``, each sorted."""
    ids = fold_ids(n, folds, seed)
    return np.flatnonzero(ids != fold), np.flatnonzero(ids == fold)
