"""Which checkpoint a model URI names, and its version.

The MLflow registry (``deepindex.tracking.registry.resolve_model``) resolves
``models:/NAME@champion`` and ``models:/NAME/VERSION``.  A plain checkpoint path (a directory
holding ``checkpoint.pt`` or the file itself) resolves here too, with name ``local`` and
version ``file-`` + the first 12 hex digits of the file's sha256: the version changes exactly
when the weights change, which is what index refusal and live reload key on.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from deepindex.checkpoint import FILENAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    checkpoint_path: str
    name: str
    version: str


def file_version(checkpoint: str | Path) -> str:
    """``file-<12 hex>`` of ``checkpoint.pt`` (read in chunks: checkpoints can be large)."""
    h = hashlib.sha256()
    with open(checkpoint, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "file-" + h.hexdigest()[:12]


def resolve_local(path: str | Path) -> ResolvedModel:
    p = Path(path).expanduser()
    f = p / FILENAME if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"model: no checkpoint at {path}")
    return ResolvedModel(str(f.resolve()), "local", file_version(f))


def _registry_resolver():
    """The registry's ``resolve_model`` when the tracking package is there, else None."""
    try:
        mod = importlib.import_module("deepindex.tracking.registry")
    except ModuleNotFoundError as e:
        # Only a missing tracking package means "no registry"; a broken import inside it is a bug.
        if e.name and e.name.startswith("deepindex.tracking"):
            return None
        raise
    return getattr(mod, "resolve_model", None)


def resolve_model(model_uri: str, tracking_uri: str | None = None) -> ResolvedModel:
    """``models:/NAME@alias``, ``models:/NAME/VERSION`` or a checkpoint path -> (path, name, version)."""
    if not model_uri:
        raise ValueError("model: empty model URI")
    registry = _registry_resolver()
    if registry is not None:
        r = registry(model_uri, tracking_uri)
        return ResolvedModel(str(r.checkpoint_path), str(r.name), str(r.version))
    if model_uri.startswith("models:/"):
        raise ValueError(f"model: {model_uri} needs the model registry (deepindex.tracking), which is not installed")
    return resolve_local(model_uri)
