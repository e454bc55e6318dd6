"""The model deployment: the served model version, batched forward passes, live reload.

Every forward goes through ``@serve.batch``: concurrent single-image calls from the ingress
become one ``(B, C, S, S)`` tensor.  A daemon thread polls the model URI (the registry's
``champion``, or a checkpoint path) every ``reload_interval_s`` and swaps in the new version
when it changes; a batch in flight keeps the model it started with.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Served:
    resolved: Any  # deepindex.index.source.ResolvedModel
    lm: Any  # deepindex.checkpoint.LoadedModel


def _load(uri: str, tracking_uri: str | None) -> _Served:
    from deepindex.checkpoint import load_model
    from deepindex.index.source import resolve_model

    r = resolve_model(uri, tracking_uri)
    return _Served(r, load_model(r.checkpoint_path))


@serve.deployment(name="ConceptModel", health_check_period_s=10, health_check_timeout_s=30)
class ModelServer:
    def __init__(self, model: str, tracking_uri: str | None = None, reload_interval_s: float = 30.0,
                 max_batch_size: int = 32, batch_wait_timeout_s: float = 0.0, threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self._uri, self._tracking_uri = model, tracking_uri
        self._served = _load(model, tracking_uri)
        self.reloads, self.last_error, self.last_poll = 0, None, time.time()
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._stop = threading.Event()
        self._interval = reload_interval_s
        self._poller = None
        if reload_interval_s > 0:
            self._poller = threading.Thread(target=self._poll, name="model-reload", daemon=True)
            self._poller.start()
        log.info("serving %s version %s", self._served.resolved.name, self._served.resolved.version)

    # ---- reload ----------------------------------------------------------------------------
    def _poll(self) -> None:
        from deepindex.checkpoint import load_model
        from deepindex.index.source import resolve_model

        while not self._stop.wait(self._interval):
            try:
                r = resolve_model(self._uri, self._tracking_uri)
                cur = self._served.resolved
                if (r.name, r.version) != (cur.name, cur.version):
                    log.info("model %s: version %s -> %s, reloading", self._uri, cur.version, r.version)
                    self._served = _Served(r, load_model(r.checkpoint_path))  # one reference swap
                    self.reloads += 1
                self.last_error = None
            except Exception as e:  # keep serving the loaded version; report the problem
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("model reload check failed: %s", self.last_error)
            self.last_poll = time.time()

    def __del__(self):
        self._stop.set()

    def check_health(self) -> None:
        if self._served is None:
            raise RuntimeError("no model loaded")
        if self._poller is not None and not self._poller.is_alive():
            raise RuntimeError("the model reload thread died")

    # ---- calls -------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        s = self._served
        d = s.lm.config.data
        return {"uri": self._uri, "name": s.resolved.name, "version": s.resolved.version,
                "concepts": list(s.lm.concepts), "multilabel": s.lm.multilabel, "image_size": d.image_size,
                "channels": d.channels, "preset": d.preset, "reloads": self.reloads, "last_error": self.last_error}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def infer(self, pixels: list[np.ndarray]) -> list[dict[str, Any]]:
        """uint8 images (C, S, S) -> per image probabilities (K,), embedding (D,), version, batch size."""
        from deepindex.data.transforms import uint8_to_unit
        from deepindex.index.embed import infer_unit

        s = self._served
        d = s.lm.config.data
        shape = (d.channels, d.image_size, d.image_size)
        # After a reload to a model with another input size, callers holding the old spec get
        # an error entry (they refresh the spec and retry) instead of a failed batch for all.
        ok = [i for i, u in enumerate(pixels) if u.shape == shape]
        out: list[dict[str, Any]] = [{"error": "input_shape", "version": s.resolved.version} for _ in pixels]
        if ok:
            probs, emb = infer_unit(s.lm, uint8_to_unit(np.stack([pixels[i] for i in ok])))  # (B, K), (B, D)
            for j, i in enumerate(ok):
                out[i] = {"probs": probs[j], "embedding": emb[j], "name": s.resolved.name,
                          "version": s.resolved.version, "batch_size": len(ok)}
        return out
