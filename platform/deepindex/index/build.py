"""Build an index: resolve the model, embed a collection on the cluster, write the index directory.

Embedding is Ray Data batch inference: ``ray.data.range(N)`` row numbers flow through
``map_batches`` into a pool of :class:`EmbedActor` s, each holding the model once and the
collection once (object store); results come back tagged with their row, so order does not
depend on scheduling.  ``use_ray=False`` runs the same model pass in-process (tests, tiny sets).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepindex.index.collection import Collection, load_collection
from deepindex.index.source import ResolvedModel, resolve_model
from deepindex.index.store import IndexStore, index_dir_name
from deepindex.index.vectors import VectorConfig

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    path: Path
    model: ResolvedModel
    count: int
    kind: str
    metric: str
    seconds: float


def default_index_root() -> Path:
    from deepindex.paths import state_dir

    return state_dir() / "indexes"


def embed_with_ray(checkpoint: str, collection: Collection, *, workers: int = 2, batch_size: int = 256,
                   threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities (N, K), embeddings (N, D), thumbnails (N, C, S, S) in row order, on the cluster."""
    import ray

    from deepindex.index.embed import EmbedActor

    n = len(collection)
    ref = ray.put(collection)
    ds = ray.data.range(n, override_num_blocks=max(1, min(n // batch_size + 1, 4 * workers)))
    out = ds.map_batches(EmbedActor, fn_constructor_kwargs={"checkpoint": checkpoint, "collection_ref": [ref],
                                                            "threads": threads},
                         batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads,
                         batch_format="numpy")
    rows, probs, embs, thumbs = [], [], [], []
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(b["row"])
        probs.append(b["probs"])
        embs.append(b["embedding"])
        thumbs.append(b["thumb"])
    order = np.argsort(np.concatenate(rows), kind="stable")
    if len(order) != n:
        raise RuntimeError(f"index: embedded {len(order)} of {n} items")
    return np.concatenate(probs)[order], np.concatenate(embs)[order], np.concatenate(thumbs)[order]


def build_index(model_uri: str, *, collection: str = "digit-scenes", out: str | Path | None = None,
                vector_cfg: VectorConfig | None = None, size: int = 5000, root: str | None = None,
                manifest: str | None = None, seed: int = 0, use_ray: bool = True, workers: int = 2,
                batch_size: int = 256, thumbnails: bool = True, tracking_uri: str | None = None) -> BuildResult:
    """Embed ``collection`` with the model ``model_uri`` names and write the index atomically.

    ``out`` defaults to ``<state>/indexes/<collection>/<model name>-<version>``: one folder per
    (model version, collection), which is what the service looks up when the champion changes.
    """
    from deepindex.checkpoint import load_model
    from deepindex.index.embed import embed_collection_local

    start = time.perf_counter()
    cfg = vector_cfg or VectorConfig()
    resolved = resolve_model(model_uri, tracking_uri)
    lm = load_model(resolved.checkpoint_path)
    d = lm.config.data
    coll = load_collection(collection, image_size=d.image_size, channels=d.channels, concepts=lm.concepts, size=size,
                           root=root, manifest=manifest, seed=seed, max_digits=d.max_digits, preset=d.preset)
    log.info("embedding %d items of %s with %s %s", len(coll), coll.name, resolved.name, resolved.version)
    if use_ray:
        probs, embs, thumbs = embed_with_ray(resolved.checkpoint_path, coll, workers=workers, batch_size=batch_size)
    else:
        probs, embs, thumbs = embed_collection_local(lm, coll, batch_size)
    store = IndexStore.create(
        model={"uri": model_uri, "name": resolved.name, "version": resolved.version}, collection=coll.name,
        concepts=lm.concepts, ids=coll.ids, meta=[coll.item_meta(i) for i in range(len(coll))], probs=probs,
        embeddings=embs, thumbs=thumbs if thumbnails else None, cfg=cfg, image_size=d.image_size,
        channels=d.channels, multilabel=lm.multilabel, extra={"source": coll.meta})
    path = Path(out) if out else default_index_root() / coll.name / index_dir_name(resolved.name, resolved.version)
    store.save(path)
    secs = time.perf_counter() - start
    log.info("index of %d items (%s, %s) written to %s in %.1fs", len(store), store.vectors.kind, cfg.metric, path, secs)
    return BuildResult(path.resolve(), resolved, len(store), store.vectors.kind, cfg.metric, secs)
