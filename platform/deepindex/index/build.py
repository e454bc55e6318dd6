"""Build an index: a collection's snapshot embedded with one model version, written as an index folder.

The collection (``deepindex.collection``) is the source of truth; the index is derived from a snapshot
of it up to a sequence number, then caught up with later changes by whoever serves it
(:mod:`deepindex.index.catchup`).  Embedding is Ray Data batch inference: the snapshot's (row, content
hash) pairs flow through ``map_batches`` into a pool of :class:`~deepindex.index.embed.ItemEmbedActor`
s, each holding the model once and reading its items' bytes from the blob store; results come back
tagged with their row, so order does not depend on scheduling.  The pool is sized to the CPUs the
cluster has free, so a build never waits forever behind a running service on a small head (and says
so, with a clear error, when nothing is free).  ``use_ray=False`` runs the same pass in-process.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepindex.collection import CollectionStore, Item
from deepindex.console import Progress
from deepindex.index.store import IndexStore, check_index_target, index_dir_name
from deepindex.index.vectors import VectorConfig, feature_name
from deepindex.tracking.registry import ResolvedModel, resolve_model

log = logging.getLogger(__name__)

DEFAULT_FEATURES = ("penultimate",)


@dataclass
class BuildResult:
    path: Path
    model: ResolvedModel
    count: int
    seq: int
    features: list[str]
    kind: str
    metric: str
    seconds: float
    skipped: int = 0


def default_index_root() -> Path:
    from deepindex.paths import state_dir

    return state_dir() / "indexes"


def collection_dir(collection: str, index_root: str | Path | None = None) -> Path:
    """The folder holding one index per model version of ``collection``."""
    return Path(index_root) if index_root else default_index_root() / collection


@dataclass(frozen=True)
class Pool:
    """How many embedding actors, with how many CPUs each."""

    actors: int
    cpus: float


def size_pool(workers: int | None, wait_s: float = 120.0) -> Pool:
    """An actor pool that fits the CPUs the cluster has free now (a service on the same head holds some).

    Waits up to ``wait_s`` for at least a quarter of a CPU, then fails with a clear message rather
    than queueing forever.
    """
    import ray

    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        free = float(ray.available_resources().get("CPU", 0.0))
        if free >= 0.25:
            break
        if time.monotonic() > deadline:
            total = float(ray.cluster_resources().get("CPU", 0.0))
            raise RuntimeError(f"index build: no free CPU on the cluster after {wait_s:.0f}s ({total:g} CPUs, all "
                               "held by other work, e.g. a running service or training); free some or add a node")
        if not warned:
            log.warning("index build: waiting for a free CPU (the cluster's are all in use)")
            warned = True
        time.sleep(1.0)
    actors = max(1, min(workers or 2, int(free // 0.5) or 1))
    # Leave a little for Ray Data's own bookkeeping tasks; fractional CPUs are fine for actors.
    return Pool(actors, round(max(0.25, min(1.0, (free - 0.1) / actors)), 2))


def embed_snapshot_ray(checkpoint: str, blobs_url: str, items: Sequence[Item], features: Sequence[str], *,
                       workers: int | None = None, batch_size: int = 256,
                       progress: Progress | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({"probs", feature...: (N, D)}, ok (N,))`` in item order, embedded on the cluster."""
    import ray

    from deepindex.index.embed import ItemEmbedActor

    n = len(items)
    pool = size_pool(workers)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress line instead (see the CLI)
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        cpu=pool.actors * pool.cpus + 0.1)
    log.info("embedding %d items with %d actors x %.2f CPU", n, pool.actors, pool.cpus)
    ds = ray.data.from_items([{"row": i, "hash": it.content_hash} for i, it in enumerate(items)],
                             override_num_blocks=max(1, min(n // batch_size + 1, 4 * pool.actors)))
    out = ds.map_batches(ItemEmbedActor, fn_constructor_kwargs={"checkpoint": checkpoint, "blobs_url": blobs_url,
                                                                "features": list(features), "threads": 1},
                         batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=pool.actors),
                         num_cpus=pool.cpus, batch_format="numpy")
    parts: dict[str, list[np.ndarray]] = {}
    done = 0
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
        done += len(b["row"])
        if progress is not None:
            progress(done, n)
    if done != n:
        raise RuntimeError(f"index: embedded {done} of {n} items")
    order = np.argsort(np.concatenate(parts.pop("row")), kind="stable")
    ok = np.concatenate(parts.pop("ok"))[order]
    return {k: np.concatenate(v)[order] for k, v in parts.items()}, ok


def embed_snapshot_local(checkpoint: str, store: CollectionStore, items: Sequence[Item], features: Sequence[str],
                         batch_size: int = 256, progress: Progress | None = None
                         ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The same pass in this process (tests, small collections, machines without a cluster)."""
    from deepindex.index.embed import ItemEmbedActor

    actor = ItemEmbedActor(checkpoint, store.blobs.url, features)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        b = actor({"row": np.arange(start, start + len(chunk)), "hash": np.array([i.content_hash for i in chunk])})
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
        if progress is not None:
            progress(start + len(chunk), len(items))
    if not items:
        return {}, np.zeros(0, dtype=bool)
    parts.pop("row")
    ok = np.concatenate(parts.pop("ok"))
    return {k: np.concatenate(v) for k, v in parts.items()}, ok


def index_features(features: Sequence[str] | None, known: Sequence[str]) -> list[str]:
    """The descriptors an index keeps beside the concept probabilities for ``features`` (None or empty:
    :data:`DEFAULT_FEATURES`; aliases read as their names), checked against ``known``, a model's feature
    points: else a one-line ValueError naming the first at fault and what the model has."""
    descriptors = ", ".join(f for f in known if f not in ("probs", "logits"))
    # probs (output) is in every index (the concept-probability matrix keyword search and feature=probs read):
    # listed, as the README's `--features penultimate,probs` and a service's `features: [output]` do, it is not
    # stored twice (it was refused, and a service listing it retried its build forever; found on review).
    names = [f for f in dict.fromkeys(feature_name(f) for f in features or DEFAULT_FEATURES) if f != "probs"]
    if not names:
        raise ValueError(f"features: probs (output) is in every index; list the descriptors to keep beside it "
                         f"({descriptors})")
    bad = [f for f in names if f not in known or f == "logits"]
    if bad:
        raise ValueError(f"features: {bad[0]!r} is not a descriptor of this model; choose from "
                         f"{descriptors} (or probs via keywords)")
    return names


def check_features(features: Sequence[str] | None, model_uri: str, tracking_uri: str | None = None) -> list[str]:
    """:func:`index_features` for the model ``model_uri`` names, for a command to call before it deploys or
    embeds anything: ``deepindex serve --arg features=[bogus]`` printed "service ready" and replaced a
    working service with one whose every index build failed, retried forever, every search a 503 (found
    on review; ``index build`` refused it in one line).  The model is loaded only for a descriptor that
    not every model has (the default, penultimate, needs no download)."""
    from deepindex.models.base import HEAD_POINTS

    wanted = {feature_name(f) for f in features or DEFAULT_FEATURES} - {"probs"}
    if wanted and wanted <= set(HEAD_POINTS) - {"probs", "logits"}:
        return index_features(features, HEAD_POINTS)
    from deepindex.checkpoint import load_model

    return index_features(features, load_model(resolve_model(model_uri, tracking_uri).checkpoint_path)
                          .model.feature_points())


def build_index(model_uri: str, *, collection: str = "digit-scenes", out: str | Path | None = None,
                index_dir: str | Path | None = None, vector_cfg: VectorConfig | None = None,
                features: Sequence[str] | None = None, use_ray: bool = True, workers: int | None = None,
                batch_size: int = 256, tracking_uri: str | None = None, catalogue_url: str | None = None,
                blobs_url: str | None = None, upto: int | None = None,
                progress: Progress | None = None) -> BuildResult:
    """Embed the collection's snapshot (up to ``upto``, default its head) with the model ``model_uri``
    names and write the index atomically.

    ``out`` defaults to ``<index root>/<collection>/<model name>-<version>``: one folder per (model
    version, collection), which is what the service looks up when the champion changes.
    """
    from deepindex.checkpoint import load_model

    start = time.perf_counter()
    if out is not None:
        check_index_target(out)  # before the embedding: refused at once, not after minutes of work
    cfg = vector_cfg or VectorConfig()
    resolved = resolve_model(model_uri, tracking_uri)
    lm = load_model(resolved.checkpoint_path)
    names = index_features(features, lm.model.feature_points())
    store = CollectionStore.open(collection, catalogue_url, blobs_url, create=False)
    seq = store.head() if upto is None else upto
    items = list(store.snapshot(seq))  # ids, hashes and tags only: cheap even at 100k items
    log.info("indexing %d items of %s (up to change %d) with %s %s", len(items), collection, seq, resolved.name,
             resolved.version)
    if items and progress is not None:
        progress(0, len(items))  # the total, before the (on a cluster, slow to start) embedding workers run
    if not items:
        out_arrays: dict[str, np.ndarray] = {}
        ok = np.zeros(0, dtype=bool)
    elif use_ray:
        out_arrays, ok = embed_snapshot_ray(resolved.checkpoint_path, store.blobs.url, items, names, workers=workers,
                                            batch_size=batch_size, progress=progress)
    else:
        out_arrays, ok = embed_snapshot_local(resolved.checkpoint_path, store, items, names, batch_size, progress)
    if items:
        dims = {f: out_arrays[f].shape[1] for f in names}
    else:  # an empty collection: the widths from one blank image of the model's input shape
        import torch

        probe = torch.zeros(1, lm.channels, lm.image_size, lm.image_size)
        dims = {f: int(v.shape[1]) for f, v in lm.model.features(probe, names, multilabel=lm.multilabel).items()}
    keep = np.flatnonzero(ok) if len(items) else np.zeros(0, dtype=np.int64)
    index = IndexStore.create(
        model={"uri": model_uri, "name": resolved.name, "version": resolved.version}, collection=collection, seq=seq,
        concepts=lm.concepts, ids=[items[i].id for i in keep], labels=[items[i].tags for i in keep],
        probs=out_arrays["probs"][keep] if len(items) else np.zeros((0, len(lm.concepts)), np.float32),
        features={f: out_arrays[f][keep] if len(items) else np.zeros((0, dims[f]), np.float32) for f in names},
        vector_cfg=cfg, default_feature=names[0], image_size=lm.image_size, channels=lm.channels,
        multilabel=lm.multilabel, source={"collection": collection, "catalogue_seq": seq,
                                          "collection_created_at": store.created_at}, preset=lm.preset)
    path = Path(out) if out else collection_dir(collection, index_dir) / index_dir_name(resolved.name,
                                                                                          resolved.version)
    index.save(path)
    secs = time.perf_counter() - start
    skipped = len(items) - len(keep)
    if skipped:
        log.warning("index %s: %d item(s) of %s could not be decoded and are not indexed", path, skipped, collection)
    spec = index.manifest.features[names[0]]
    log.info("index of %d items (%s, %s) written to %s in %.1fs", len(index), spec.kind, spec.metric, path, secs)
    return BuildResult(path.resolve(), resolved, len(index), seq, names, spec.kind, spec.metric, secs, skipped)

