"""The checkpoint contract: everything needed to rebuild a model, and nothing executable.

A checkpoint directory holds ``checkpoint.pt``: model/optimizer/scheduler ``state_dict``s,
the resolved config, the normalisation stats, the concept list, the task, the epoch and
the metrics of that epoch (plus the MLflow run id, so a resumed run continues the same
run).  It only holds tensors and plain containers, so ``torch.load(weights_only=True)``
reads it without unpickling code.  Writes are atomic: a temp file then ``os.replace``.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from deepindex.atomic import write_file
from deepindex.config import Config, from_dict
from deepindex.data.transforms import NormStats

if TYPE_CHECKING:
    from deepindex.models import ConceptModel
    from deepindex.train.optim import EpochScheduler

FILENAME = "checkpoint.pt"
FORMAT_VERSION = 1
# What every reader may take as there (save_checkpoint writes them all): the model's rebuild and its task.
REQUIRED_KEYS = ("model", "config", "stats", "concepts", "multilabel", "epoch")


@dataclass
class LoadedModel:
    model: ConceptModel  # eval mode, on CPU
    config: Config
    stats: NormStats
    concepts: list[str]
    multilabel: bool
    epoch: int
    metrics: dict[str, Any]

    # The model's input: a checkpoint's config holds resolved data keys (save_checkpoint resolves them).
    @property
    def channels(self) -> int:
        return _resolved(self.config.data.channels, "data.channels")

    @property
    def image_size(self) -> int:
        return _resolved(self.config.data.image_size, "data.image_size")

    @property
    def preset(self) -> str | None:
        return self.config.data.preset


def _resolved(value: int | None, key: str) -> int:
    if value is None:
        raise ValueError(f"checkpoint: {key} is unset (a checkpoint's config holds the resolved input shape)")
    return value


def save_checkpoint(directory: str | Path, *, model: torch.nn.Module, config: Config, stats: NormStats,
                    concepts: list[str], multilabel: bool, epoch: int, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: EpochScheduler | None = None, metrics: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, streams: dict[str, Any] | None = None) -> Path:
    """``streams``: what a resumed run needs to go on drawing as the uninterrupted one would
    (every rank's random state, the fp16 loss scaler's): tensors and plain values."""
    from deepindex.data.inspect import resolve_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Serving rebuilds the input transform from the saved config: its channels, size and preset
    # must be values, not "infer from the data" (a no-op for configs resolved before training).
    config = resolve_config(config)
    module = cast(torch.nn.Module, model.module) if hasattr(model, "module") else model  # unwrap DDP
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
        "streams": streams,
    }
    # atomic: a reader sees the old or the new file
    return write_file(directory / FILENAME, lambda tmp: torch.save(state, tmp))


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """Metrics as plain floats/lists/str so weights_only loading accepts them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        if isinstance(v, (int, float, str, bool, type(None), list, dict)):
            out[k] = v
    return out


def checkpoint_file(path: str | Path) -> Path:
    """``checkpoint.pt`` of a checkpoint folder (Ray's folders may hold more files), or the file itself."""
    p = Path(path).expanduser()
    return p / FILENAME if p.is_dir() else p


def checkpoint_version(path: str | Path) -> str:
    """``file-`` + 12 hex digits of the checkpoint file's sha256: the version of a model given as a
    path, which changes exactly when the weights change (what index refusal and live reload key on)."""
    h = hashlib.sha256()
    with open(checkpoint_file(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):  # in chunks: checkpoints can be large
            h.update(chunk)
    return "file-" + h.hexdigest()[:12]


def _load_failure(e: BaseException) -> str:
    """The cause in torch.load's error.  With ``weights_only`` its first line is advice about torch
    2.6's default and its last a link; the cause lies between (``Trying to load unsupported GLOBAL
    posix.system ...``, or ``Unsupported operand 103`` after "WeightsUnpickler error:")."""
    lines = [ln.strip() for ln in str(e).replace("WeightsUnpickler error:", "\n").splitlines() if ln.strip()]
    cause = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file an issue",
                                                      "Check the documentation"))]
    return (cause or lines or [e.__class__.__name__])[0][:160]


def _foreign_format(p: Path) -> str | None:
    """What a file that ``torch.save`` cannot have written looks like (it writes a zip archive, or a
    pickle that starts with its protocol byte), so a JSON or image file is named for what it is
    rather than by the unpickler's ``Unsupported operand 123``."""
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return "it is empty"
    return f"it starts with {head!r}, and torch.save writes a zip archive"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, from a directory or the file itself; never executes code."""
    p = checkpoint_file(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {p}")
    foreign = _foreign_format(p)
    if foreign is not None:
        raise ValueError(f"checkpoint: {p} is not a PyTorch file ({foreign})")
    try:
        # weights_only: tensors and plain containers only; a pickled object is refused, never run.
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint: {p} is not a loadable deepindex checkpoint ({_load_failure(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint: {p} is not a deepindex checkpoint (format {FORMAT_VERSION})")
    missing = [k for k in REQUIRED_KEYS if state.get(k) is None]
    if missing:
        # A hand-made or cut-down file: serving, indexing and promotion each failed on the first key they
        # read, with a bare KeyError ('concepts') and no file named (found on review).  As model.weights
        # such a file still serves: its "model" alone is read there (load_local_weights).
        raise ValueError(f"checkpoint: {p} has no {', '.join(missing)} (a deepindex checkpoint holds "
                         f"{', '.join(REQUIRED_KEYS)})")
    return state


def _mismatch(e: RuntimeError) -> str:
    """The first line of torch's load_state_dict report that names keys (missing, unexpected, a size)."""
    lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
    first = lines[0] if lines else str(e)
    return first if len(first) <= 300 else first[:297] + "..."


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild the model of a checkpoint with no other file."""
    from deepindex.models import build_model

    state = read_checkpoint(path)
    cfg = from_dict(state["config"])
    # Local transfer weights were consumed at training time; the checkpoint holds them all.
    cfg = cfg.override({"model.weights": None})
    # ImageNet weights too (load_weights=False): serving needs no torch cache, and no download.
    model = build_model(cfg.model, len(state["concepts"]), _resolved(cfg.data.channels, "data.channels"),
                        load_weights=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # the weights are another architecture's than the config says
        raise ValueError(f"{path}: its weights do not fit the model its config describes ({cfg.model.name}): "
                         f"{_mismatch(e)}") from None
    model.eval()
    return LoadedModel(model, cfg, NormStats.from_dict(state["stats"]), state["concepts"], state["multilabel"],
                       state["epoch"], state.get("metrics") or {})
