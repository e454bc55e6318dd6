"""The checkpoint contract: everything needed to rebuild a model, and nothing executable.

A checkpoint directory holds ``checkpoint.pt``: model/optimizer/scheduler ``state_dict``s,
the resolved config, the normalisation stats, the concept list, the task, the epoch and
the metrics of that epoch (plus the MLflow run id, so a resumed run continues the same
run).  It only holds tensors and plain containers, so ``torch.load(weights_only=True)``
reads it without unpickling code.  Writes are atomic: a temp file then ``os.replace``.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepindex.config import Config, from_dict
from deepindex.data.transforms import NormStats

FILENAME = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: torch.nn.Module  # eval mode, on CPU
    config: Config
    stats: NormStats
    concepts: list[str]
    multilabel: bool
    epoch: int
    metrics: dict[str, Any]


def save_checkpoint(directory: str | Path, *, model, config: Config, stats: NormStats, concepts: list[str],
                    multilabel: bool, epoch: int, optimizer=None, scheduler=None, metrics: dict | None = None,
                    extra: dict | None = None) -> Path:
    from deepindex.data.inspect import resolve_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Serving rebuilds the input transform from the saved config: its channels, size and preset
    # must be values, not "infer from the data" (a no-op for configs resolved before training).
    config = resolve_config(config)
    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    state = {
        "format": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": config.to_dict(),
        "stats": stats.to_dict(),
        "concepts": list(concepts),
        "multilabel": bool(multilabel),
        "epoch": int(epoch),
        "metrics": _plain(metrics or {}),
        "extra": _plain(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, directory / FILENAME)  # atomic: a reader sees the old or the new file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return directory / FILENAME


def _plain(d: dict) -> dict:
    """Metrics as plain floats/lists/str so weights_only loading accepts them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        if isinstance(v, (int, float, str, bool, type(None), list, dict)):
            out[k] = v
    return out


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, from a directory or the file itself; never executes code."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {p}")
    try:
        # weights_only: tensors and plain containers only; a pickled object is refused, never run.
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else e.__class__.__name__
        raise ValueError(f"checkpoint: {p} is not a loadable deepindex checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint: {p} is not a deepindex checkpoint (format {FORMAT_VERSION})")
    return state


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild the model of a checkpoint with no other file."""
    from deepindex.models import build_model

    state = read_checkpoint(path)
    cfg = from_dict(state["config"])
    # Local transfer weights were consumed at training time; the checkpoint holds them all.
    cfg = cfg.override({"model.weights": None})
    # ImageNet weights too (load_weights=False): serving needs no torch cache, and no download.
    model = build_model(cfg.model, len(state["concepts"]), cfg.data.channels, load_weights=False)
    model.load_state_dict(state["model"])
    model.eval()
    return LoadedModel(model, cfg, NormStats.from_dict(state["stats"]), state["concepts"], state["multilabel"],
                       state["epoch"], state["metrics"])
