"""The FAISS wrapper: exact search for small collections, HNSW or IVF for large ones.

Scores are "higher is more similar" whatever the metric: the inner product (the cosine when
``normalize``), or minus the Euclidean distance for ``l2``.  Rows are positions in the index
(0..N-1, in insertion order); the store maps them to item ids.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import faiss


class VectorConfig(BaseModel):
    """How the similar-item index is built (``deepindex index build --kind/--metric``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    metric: Literal["l2", "ip"] = "ip"
    normalize: bool = True  # L2-normalise embeddings: ip is then the cosine, l2 a monotone twin of it
    exact_max: int = Field(100_000, ge=1)  # auto: exact (flat) up to this many items, IVF above
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_construction: int = Field(80, ge=8)
    hnsw_ef_search: int = Field(64, ge=1)
    ivf_nlist: int = Field(0, ge=0)  # 0: 4 * sqrt(N), a common rule of thumb
    ivf_nprobe: int = Field(32, ge=1)
    train_sample: int = Field(100_000, ge=1000)  # IVF k-means trains on at most this many vectors


def _faiss() -> ModuleType:
    import faiss

    return faiss


class VectorIndex:
    """A FAISS index plus the knowledge of how to prepare vectors and turn distances into scores."""

    def __init__(self, index: faiss.Index, cfg: VectorConfig) -> None:
        self.index, self.cfg = index, cfg

    @property
    def kind(self) -> str:
        name = type(self.index).__name__
        return "hnsw" if "HNSW" in name else "ivf" if "IVF" in name else "flat"

    def memory_bytes(self) -> int:
        """What the FAISS index holds: its vectors (and, for HNSW, its graph links, roughly)."""
        n = self.ntotal * self.index.d * 4
        if self.kind == "hnsw":
            n += self.ntotal * 2 * self.cfg.hnsw_m * 4
        return n

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.cfg.normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(x, dtype=np.float32)

    @classmethod
    def build(cls, vectors: np.ndarray, cfg: VectorConfig, seed: int = 0) -> VectorIndex:
        """An index over (N, D) vectors; IVF trains its coarse quantiser on a sample first."""
        faiss = _faiss()
        n, d = vectors.shape
        metric = faiss.METRIC_INNER_PRODUCT if cfg.metric == "ip" else faiss.METRIC_L2
        kind = cfg.kind if cfg.kind != "auto" else ("flat" if n <= cfg.exact_max else "ivf")
        if kind == "flat":
            index = faiss.IndexFlat(d, metric)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, metric)
            index.hnsw.efConstruction = cfg.hnsw_ef_construction
            index.hnsw.efSearch = cfg.hnsw_ef_search
        else:
            nlist = cfg.ivf_nlist or max(1, int(4 * math.sqrt(max(n, 1))))
            nlist = min(nlist, max(1, n // 39))  # k-means wants ~39+ points per centroid
            index = faiss.IndexIVFFlat(faiss.IndexFlat(d, metric), d, nlist, metric)
            index.nprobe = min(cfg.ivf_nprobe, nlist)
        out = cls(index, cfg)
        x = out.prepare(vectors)
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            sample = x[rng.choice(n, size=min(n, cfg.train_sample), replace=False)]
            index.train(sample)
        index.add(x)
        return out

    @classmethod
    def empty(cls, dim: int, cfg: VectorConfig) -> VectorIndex:
        """An index of no vectors yet (an empty collection): exact, or HNSW when asked for (an IVF
        index needs vectors to train its clusters, so an empty one starts exact)."""
        faiss = _faiss()
        metric = faiss.METRIC_INNER_PRODUCT if cfg.metric == "ip" else faiss.METRIC_L2
        if cfg.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, metric)
            index.hnsw.efConstruction = cfg.hnsw_ef_construction
            index.hnsw.efSearch = cfg.hnsw_ef_search
        else:
            index = faiss.IndexFlat(dim, metric)
        return cls(index, cfg)

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors (rows ntotal..): no rebuild; an IVF index keeps its trained centroids."""
        self.index.add(self.prepare(vectors))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) -> scores (Q, k) higher-is-better and rows (Q, k); -1 rows where fewer than k exist."""
        dist, rows = self.index.search(self.prepare(queries), k)
        scores = dist if self.cfg.metric == "ip" else -np.sqrt(np.maximum(dist, 0))
        return scores.astype(np.float32), rows

    def save(self, path: str) -> None:
        _faiss().write_index(self.index, path)

    @classmethod
    def load(cls, path: str, cfg: VectorConfig) -> VectorIndex:
        index = _faiss().read_index(path)
        # Search-time knobs are not all serialised: set them from the config again.
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = cfg.hnsw_ef_search
        if hasattr(index, "nprobe"):
            index.nprobe = min(cfg.ivf_nprobe, index.nlist)
        return cls(index, cfg)


def brute_force(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "ip", normalize: bool = True,
                chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with numpy only (the benchmark's reference): scores (Q, k), rows (Q, k)."""
    def prep(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) if normalize else x

    b, q = prep(base), prep(queries)
    chunk = max(1, min(chunk, (1 << 26) // max(len(b), 1)))  # bound the (chunk, N) score matrix to ~256 MB
    bn = (b * b).sum(axis=1) if metric == "l2" else None
    all_s, all_r = [], []
    for s in range(0, len(q), chunk):
        qq = q[s : s + chunk]
        sim = qq @ b.T  # (q, N)
        if bn is not None:  # l2
            sim = -(bn[None, :] - 2 * sim + (qq * qq).sum(axis=1, keepdims=True))  # -squared distance
        kk = min(k, sim.shape[1])
        part = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        ps = np.take_along_axis(sim, part, axis=1)
        order = np.argsort(-ps, axis=1)
        rows = np.take_along_axis(part, order, axis=1)
        sc = np.take_along_axis(ps, order, axis=1)
        if metric == "l2":
            sc = -np.sqrt(np.maximum(-sc, 0))
        all_s.append(sc)
        all_r.append(rows)
    return np.concatenate(all_s).astype(np.float32), np.concatenate(all_r)


# ---- query metrics over named feature matrices ---------------------------------------------
# A query chooses its metric: ``l2`` (minus the Euclidean distance), ``ip`` (the dot product) or
# ``cosine`` (the dot product of L2-normalised vectors).  Which an index answers depends on its kind:
# - flat (exact): any of the three, when the raw vectors are at hand (the index's feature matrix):
#   an exact search costs the same whatever the metric;
# - hnsw, ivf (approximate): only the geometry they were built in, since their graph or clusters
#   are: built ``ip`` on raw vectors -> ``ip``; ``l2`` on raw vectors -> ``l2``; either on
#   L2-normalised vectors -> ``cosine`` (l2 between unit vectors is sqrt(2 - 2 cos): same order).
QUERY_METRICS = ("l2", "ip", "cosine")
# The names a user may know them by (the mission's "Euclidean or dot product").
ALIAS_OF = {"l2": "euclidean", "ip": "dot"}


# The descriptors by the names of the mission ("output, last but one, last but two"): ``output``
# is the concept probabilities (the network's output), ``last_but_one`` the embedding.
FEATURE_ALIAS_OF = {"probs": "output", "penultimate": "last_but_one"}


def feature_name(name: str) -> str:
    """A descriptor's name as the models and indexes know it (an alias maps to it; others pass as given)."""
    return next((f for f, a in FEATURE_ALIAS_OF.items() if a == name), name)


def feature_names(features: Sequence[str]) -> str:
    """``features`` for a message, each with its alias: ``penultimate (last_but_one), probs (output)``."""
    return ", ".join(f"{f} ({FEATURE_ALIAS_OF[f]})" if f in FEATURE_ALIAS_OF else f for f in features)


def query_metric(name: str) -> str:
    """``name`` as one of :data:`QUERY_METRICS` (an alias maps to its metric), else a ValueError naming it."""
    metric = next((m for m, a in ALIAS_OF.items() if a == name), name)
    if metric not in QUERY_METRICS:
        known = ", ".join(f"{m} ({ALIAS_OF[m]})" if m in ALIAS_OF else m for m in QUERY_METRICS)
        raise ValueError(f"metric: expected one of {known}, got {name!r}")
    return metric


def metric_names(metrics: Sequence[str]) -> list[str]:
    """``metrics`` and their aliases: every name a query may give for one of them."""
    return [*metrics, *(ALIAS_OF[m] for m in metrics if m in ALIAS_OF)]


def allowed_metrics(kind: str, built_metric: str, normalized: bool, raw_available: bool = True) -> tuple[str, ...]:
    """The query metrics an index of ``kind`` built with (``built_metric``, ``normalized``) answers."""
    if kind == "flat" and raw_available:
        return QUERY_METRICS
    if normalized:
        return ("cosine",)
    return (built_metric,)


def check_metric(metric: str, kind: str, built_metric: str, normalized: bool, raw_available: bool = True) -> None:
    """ValueError naming ``metric`` when the index cannot answer it (the service's 422)."""
    metric = query_metric(metric)
    ok = allowed_metrics(kind, built_metric, normalized, raw_available)
    if metric not in ok:
        norm = "L2-normalised" if normalized else "raw"
        raise ValueError(f"metric={metric}: this {kind} index was built with {built_metric} on {norm} vectors "
                         f"and answers {', '.join(ok)} only")


def prepare_for(metric: str, x: np.ndarray, normalize: bool = False) -> np.ndarray:
    """Vectors as ``metric`` compares them: L2-normalised for cosine (or when asked), float32 contiguous."""
    metric = query_metric(metric)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors: expected a 2-D (N, D) matrix, got shape {x.shape}")
    if metric == "cosine" or normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def exact_knn(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "cosine", normalize: bool = False,
              exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over an in-memory (N, D) matrix with a FAISS flat index: scores (Q, k), rows (Q, k).

    Scores are higher-is-better (minus the distance for l2).  ``exclude`` (Q,) drops one row
    per query (its own row, for leave-one-out evaluation); -1 rows pad where fewer than k exist.
    """
    faiss = _faiss()
    metric = query_metric(metric)
    b, q = prepare_for(metric, base, normalize), prepare_for(metric, queries, normalize)
    if b.shape[1] != q.shape[1]:
        raise ValueError(f"queries: dimension {q.shape[1]} but the base has {b.shape[1]}")
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    index = faiss.IndexFlatL2(b.shape[1]) if metric == "l2" else faiss.IndexFlatIP(b.shape[1])
    index.add(b)
    extra = 0 if exclude is None else 1
    dist, rows = index.search(q, min(k + extra, len(b)))
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64).reshape(-1, 1)
        drop = rows == ex
        drop[~drop.any(axis=1), -1] = True  # the row was not among them: drop the last instead
        keep = ~drop
        dist = dist[keep].reshape(len(q), -1)
        rows = rows[keep].reshape(len(q), -1)
    if rows.shape[1] < k:  # fewer items than k
        pad = k - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.nan)
    scores = -np.sqrt(np.maximum(dist, 0)) if metric == "l2" else dist
    return scores.astype(np.float32), rows
