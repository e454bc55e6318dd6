"""The served model: its version and batched forward passes, in a model deployment or in the ingress.

:class:`ServedModel` holds it.  Every forward goes through ``@serve.batch``: concurrent
single-image calls become one ``(B, C, S, S)`` tensor.  :class:`ModelServer` is the deployment
that wraps one (model replicas of their own: the default); with ``model_in_ingress`` each ingress
replica holds one itself and answers without a hop to another process (``serving/ingress.py``).

Which version to serve is the index replica's decision (it moves model and index together,
``serving/index.py``): a task on the replica's event loop tells it every half second which
model (name and version) it serves and asks which to serve, loads a new version next to the served one (a task
of its own, in a thread, while the reports go on), and swaps the reference; a batch in flight
keeps the model it started with.  Until the index replica answers (the first seconds of a start), the
replica serves what the model URI resolves to.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve

from deepindex.checkpoint import LoadedModel, load_model
from deepindex.index.embed import Forward, optimized_forward
from deepindex.tracking.registry import ResolvedModel, resolve_model
from serving.schemas import HEALTH_S

log = logging.getLogger(__name__)

POLL_S = 0.5
REPORT_RETRY_S = 30.0  # a version without a retrieval report: ask again after this long
REFUSED_RETRY_S = 30.0  # a model file that held another version than asked: loaded again after this long


@dataclass(frozen=True)
class _Served:
    resolved: ResolvedModel
    lm: LoadedModel
    batch: int  # the replica's batch size for this model (``forward_batch_size``, or measured)
    forwards: dict[tuple[str, ...], Forward] = field(default_factory=dict)

    def forward(self, names: tuple[str, ...]) -> Forward:
        """The optimized forward for these feature points (:func:`optimized_forward`): built on first
        use, kept while this version is served."""
        f = self.forwards.get(names)
        if f is None:
            f = self.forwards[names] = optimized_forward(self.lm, names)[0]
        return f


BATCH_OVERHEAD_S = 0.001  # a batch's serving work besides its forward (@serve.batch, a thread hop, results)
FAST_ENOUGH = 1.03  # a batch size this close to the fastest per image counts as fast (the largest wins)


def fastest_batch(forward: Callable[[int], object], cap: int, clock: Callable[[], float] = time.perf_counter,
                  rounds: int = 2, budget_s: float = 0.5, overhead_s: float = BATCH_OVERHEAD_S
                  ) -> tuple[int, dict[int, float]]:
    """The batch size to serve with: of the powers of two up to ``cap`` (and ``cap``), the one whose
    ``forward(n)`` plus ``overhead_s`` takes the least time per image, and the seconds per image of
    each (the overhead included: for a sub-millisecond forward it is what bigger batches save).

    Every size is timed once a round, in turn, for ``rounds`` rounds and then until ``budget_s``
    has passed (a millisecond forward is timed many times, a slow one twice); each size keeps its
    fastest call, so a start-up elsewhere on the machine that slows a few calls does not decide.
    Bigger is not always faster per image: on a CPU, ResNet-18 at 224 px runs faster per image in
    small batches than in batches of 32 (activations that fit the caches).  A size within
    ``FAST_ENOUGH`` of the fastest counts as fast, and the largest such one wins (fewer, fuller
    batches under load).  The margin is kept narrow: ResNet-18 on its optimized graph timed 18.8 ms
    an image at 8 and 19.6 at 32 (4 % apart), and served 49.7 img/s to 32 clients in batches of 8
    against 47.4 in batches of 32 (2026-12-04, one run each); at 10 % it got 32."""
    sizes = sorted({1 << k for k in range(cap.bit_length())} | {cap})
    forward(sizes[0])  # the first call's one-off allocations are not the model's speed
    per = dict.fromkeys(sizes, float("inf"))
    start, done = clock(), 0
    while done < rounds or clock() - start < budget_s:
        for n in sizes:
            t = clock()
            forward(n)
            per[n] = min(per[n], (clock() - t + overhead_s) / n)
        done += 1
    best = min(per.values())
    return max(n for n, v in per.items() if v <= FAST_ENOUGH * best), per


def _load(ref: str, tracking_uri: str | None, max_batch_size: int, batch_size: int) -> _Served:
    """Load version ``ref`` and build its optimized forward; with ``batch_size`` 0, time that forward to
    choose the batch size (:func:`fastest_batch`, at most ``max_batch_size``)."""
    r = resolve_model(ref, tracking_uri)
    lm = load_model(r.checkpoint_path)
    served = _Served(r, lm, min(batch_size, max_batch_size))
    probs = served.forward(("probs",))
    if served.batch:
        return served
    shape = (lm.channels, lm.image_size, lm.image_size)
    batch, per = fastest_batch(lambda n: probs(np.zeros((n, *shape), np.float32)), max_batch_size)
    log.info("model %s version %s: batches of %d (ms per image by batch size: %s)", r.name, r.version, batch,
             ", ".join(f"{n}: {1e3 * v:.2f}" for n, v in per.items()))
    return _Served(r, lm, batch, served.forwards)


def _is(wanted: tuple[str | None, str], r: ResolvedModel) -> bool:
    """Whether ``r`` is the (name, version) the index replica serves (no name given: any name)."""
    return wanted[1] == r.version and wanted[0] in (None, r.name)


class ServedModel:
    """The model a replica serves, following the index replica's choice of version.

    ``offload``: run each batch's forward in a worker thread, so the replica's event loop (an
    ingress's HTTP requests) goes on meanwhile; a model replica does nothing else, and runs it inline.
    ``batch_size``: the batches to form (at most ``max_batch_size``); 0: the fastest per image,
    measured whenever a version loads (:func:`fastest_batch`).
    """

    def __init__(self, model: str, index: Any = None, tracking_uri: str | None = None, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.0, threads: int = 0, offload: bool = False,
                 batch_size: int = 0) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self._uri, self._tracking_uri, self._index, self._offload = model, tracking_uri, index, offload
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._max_batch, self._batch_size = max_batch_size, batch_size
        self._served = _load(model, tracking_uri, max_batch_size, batch_size)
        self.reloads = 0
        self.last_error: str | None = None
        # ((name, version), its retrieval report): registry versions restart at 1 for every name
        self._report: tuple[tuple[str, str], dict[str, Any] | None] | None = None
        self._report_at = 0.0
        # serve.batch's wrapper has these setters; its annotation (a plain Callable) does not say so.
        self.infer.set_max_batch_size(self._served.batch)  # type: ignore[attr-defined]
        self.infer.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._follower: asyncio.Task[None] | None = None
        self._wanted: tuple[str | None, str] | None = None  # the (name, version) the index replica last asked for
        self._load_error: str | None = None  # why the last load did not swap in, if it did not
        self._refused_at: dict[str, tuple[tuple[str | None, str], float]] = {}  # ref -> (asked, when it held another)
        self.ensure_following()
        log.info("serving %s version %s", self._served.resolved.name, self._served.resolved.version)

    # ---- following the index replica's choice ------------------------------------------------
    def ensure_following(self) -> None:
        """Run :meth:`_follow` on the replica's event loop (handles are called from it, not from threads).
        Started from the constructor when it runs on the loop, else from the first call or health check."""
        if self._index is None or (self._follower is not None and not self._follower.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._follower = loop.create_task(self._follow())

    async def _follow(self) -> None:
        """Report the served version every ``POLL_S`` and load the one the index replica wants.

        The load runs as a task of its own (:meth:`_reload`) while this loop goes on reporting the version
        still served: the index replica keeps a version's index loaded while a replica reports it, and a
        load that took longer than its patience (a download, a big model's batch timing) had the old
        index unloaded under a replica still answering with the old model (found on review)."""
        loading: asyncio.Task[None] | None = None
        while True:
            await asyncio.sleep(POLL_S)
            try:
                cur = self._served.resolved
                # The model's name too: the index replica keeps a pair loaded while a replica answers with
                # it, and deepindex version 1 is not photos version 1 (found on review: reported as "1", a
                # replica still on deepindex held nothing, its searches went to photos' index).
                want = await self._index.report_model.remote(self._replica, cur.version, cur.name)
                # By name and version: registry versions restart at 1 for every model name.
                self._wanted = (want.get("name"), want["version"]) if want and want.get("version") else None
                if self._wanted and _is(self._wanted, cur):
                    self._load_error = None  # what is served is what is wanted
                elif (self._wanted and (loading is None or loading.done())
                        and not self._refused(want["ref"], self._wanted)):
                    loading = asyncio.get_running_loop().create_task(self._reload(want["ref"], self._wanted))
                if loading is None or loading.done():
                    self.last_error = self._load_error
            except Exception as e:  # noqa: BLE001 - keep serving the loaded version; report the problem
                self.last_error = f"{type(e).__name__}: {e}"
                log.debug("model: could not ask the index replica which version to serve: %s", self.last_error)

    async def _reload(self, ref: str, wanted: tuple[str | None, str]) -> None:
        """Load ``ref`` (the index replica's ``version``) beside the served model, then swap it in, unless
        the index replica has changed its mind meanwhile or ``ref`` now holds another version (a model
        file replaced since: retried after ``REFUSED_RETRY_S``, not reloaded on every poll).  ``wanted``:
        the (name, version) the index replica serves."""
        version = wanted[1]
        try:
            new = await asyncio.to_thread(_load, ref, self._tracking_uri, self._max_batch, self._batch_size)
        except Exception as e:  # noqa: BLE001 - keep serving the loaded version; report the problem
            self._load_error = f"{type(e).__name__}: {e}"
            log.warning("model: could not load version %s (%s): %s", version, ref, self._load_error)
            return
        got, name = new.resolved.version, new.resolved.name
        if not _is(wanted, new.resolved):
            self._refused_at[ref] = (wanted, time.monotonic())
            self._load_error = (f"model: {ref} holds version {got}, not version {version} that the index serves"
                                if got != version else f"model: {ref} holds model {name}, not {wanted[0]} that the "
                                f"index serves")
            log.warning("%s; serving version %s meanwhile", self._load_error, self._served.resolved.version)
            return
        if wanted != self._wanted:
            log.info("model: loaded version %s, but the index replica now serves %s", got, self._wanted)
            return
        log.info("model: version %s -> %s", self._served.resolved.version, got)
        self._served = new  # one reference swap: a batch in flight keeps its model
        self.infer.set_max_batch_size(new.batch)  # type: ignore[attr-defined]
        self.reloads += 1
        self._load_error = None

    def _refused(self, ref: str, wanted: tuple[str | None, str]) -> bool:
        seen = self._refused_at.get(ref)
        return seen is not None and seen[0] == wanted and time.monotonic() - seen[1] < REFUSED_RETRY_S

    # ---- calls -------------------------------------------------------------------------------
    async def retrieval(self) -> dict[str, Any]:
        """The served version's retrieval report (``deepindex evaluate-retrieval --attach``) or None:
        read once per version; a version without one is asked again after ``REPORT_RETRY_S``."""
        from deepindex.tracking.retrieval import report_for

        r = self._served.resolved
        cached = self._report
        if cached is None or cached[0] != (r.name, r.version) or (
                cached[1] is None and time.monotonic() - self._report_at >= REPORT_RETRY_S):
            report: dict[str, Any] | None = None
            try:
                report = await asyncio.to_thread(report_for, r, self._tracking_uri)
            except Exception as e:  # noqa: BLE001 - the figures are optional: serve without them
                log.warning("model: no retrieval report for version %s: %s: %s", r.version, type(e).__name__, e)
            cached = self._report = ((r.name, r.version), report)
            self._report_at = time.monotonic()
        return {"name": r.name, "version": r.version, "report": cached[1]}

    async def info(self) -> dict[str, Any]:
        self.ensure_following()
        s = self._served
        d = s.lm.config.data
        return {"uri": self._uri, "name": s.resolved.name, "version": s.resolved.version,
                "concepts": list(s.lm.concepts), "multilabel": s.lm.multilabel, "image_size": d.image_size,
                "channels": d.channels, "preset": d.preset, "batch_size": s.batch, "reloads": self.reloads,
                "last_error": self.last_error, "at": time.time()}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def infer(self, items: list[tuple[np.ndarray, tuple[str, ...]]]) -> list[dict[str, Any]]:
        """(uint8 image (C, S, S), the feature points it needs besides ``probs``) each -> per image
        probabilities (K,), ``features`` {name: (D,)}, version, batch size.  One pass for the batch
        computes the union of the feature points asked for."""
        from deepindex.data.transforms import uint8_to_unit

        pixels = [u for u, _ in items]
        features = [fs for _, fs in items]
        s = self._served
        d = s.lm.config.data
        shape = (d.channels, d.image_size, d.image_size)
        have = set(s.lm.model.feature_points())
        # After a reload to a model with another input size, callers holding the old spec get
        # an error entry (they refresh the spec and retry) instead of a failed batch for all; so does
        # a feature point this version lacks.
        out: list[dict[str, Any]] = [{"error": "input_shape", "version": s.resolved.version} for _ in pixels]
        ok = []
        for i, (u, fs) in enumerate(zip(pixels, features, strict=True)):
            if u.shape != shape:
                continue
            if not set(fs) <= have:
                out[i] = {"error": "unknown_feature", "version": s.resolved.version,
                          "message": f"feature: {sorted(set(fs) - have)} not in {sorted(have)}"}
                continue
            ok.append(i)
        if ok:
            names = ("probs", *sorted({f for i in ok for f in features[i] if f != "probs"}))
            batch = uint8_to_unit(np.stack([pixels[i] for i in ok]))
            if self._offload:
                got = await asyncio.to_thread(lambda: s.forward(names)(batch))  # {name: (B, D)}
            else:
                got = s.forward(names)(batch)
            for j, i in enumerate(ok):
                out[i] = {"probs": got["probs"][j], "features": {f: got[f][j] for f in features[i]},
                          "name": s.resolved.name, "version": s.resolved.version, "batch_size": len(ok)}
        return out


@serve.deployment(name="ConceptModel", health_check_period_s=HEALTH_S, health_check_timeout_s=30)
class ModelServer:
    """Model replicas of their own: the ingress reaches them through a handle."""

    def __init__(self, model: str, index: Any = None, tracking_uri: str | None = None, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.0, threads: int = 0, batch_size: int = 0) -> None:
        from serving.logs import adopt_serve_logging

        adopt_serve_logging()
        self.served = ServedModel(model, index, tracking_uri, max_batch_size, batch_wait_timeout_s, threads,
                                  batch_size=batch_size)

    async def check_health(self) -> None:
        self.served.ensure_following()

    async def retrieval(self) -> dict[str, Any]:
        return await self.served.retrieval()

    async def info(self) -> dict[str, Any]:
        return await self.served.info()

    async def infer(self, item: tuple[np.ndarray, tuple[str, ...]]) -> dict[str, Any]:
        """One image; concurrent calls are batched by :meth:`ServedModel.infer`."""
        return await self.served.infer(item)
