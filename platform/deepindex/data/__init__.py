"""Datasets -> train/val/test splits, normalisation stats and the concept list.

``build_splits(cfg.data)`` is the one entry point (:mod:`deepindex.data.splits`, re-exported here):
training, evaluation, tuning and the benchmarks all call it, so every step sees the same splits for
the same config.  The names load on first use, so a process that only decodes images
(:mod:`deepindex.data.transforms`: the serving ingress) never imports torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepindex.data.splits import (
        ImageFileDataset,
        NormStats,
        SplitData,
        Splits,
        build_splits,
        normalize,
        split_len,
    )

__all__ = ["ImageFileDataset", "NormStats", "SplitData", "Splits", "build_splits", "normalize", "split_len"]


def __getattr__(name: str) -> Any:
    """``deepindex.data.<name>``: :mod:`deepindex.data.splits`' (imported on first use)."""
    import importlib
    import importlib.util

    if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(name)  # a dunder, or a submodule not imported yet: the import system's to load
    splits = importlib.import_module("deepindex.data.splits")  # not `from . import`: that asks this hook again
    try:
        return getattr(splits, name)
    except AttributeError:
        raise AttributeError(f"module 'deepindex.data' has no attribute {name!r}") from None
