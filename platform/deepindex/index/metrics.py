"""Retrieval quality: precision@k and mAP@k, an item relevant when it shares a concept with the query;
nDCG@k graded by how much of the query's concepts an item shares (Jaccard)."""
from __future__ import annotations

import numpy as np


def relevance(query_labels: np.ndarray, result_labels: np.ndarray) -> np.ndarray:
    """Multi-hot (Q, K) queries and (Q, k, K) results -> (Q, k) bool: shares at least one concept."""
    return np.einsum("qc,qkc->qk", query_labels.astype(np.float32), result_labels.astype(np.float32)) > 0


def jaccard(query_labels: np.ndarray, result_labels: np.ndarray) -> np.ndarray:
    """Multi-hot (Q, K) queries and (Q, k, K) results -> (Q, k) |shared concepts| / |concepts of either|."""
    q = query_labels.astype(bool)[:, None, :]
    r = result_labels.astype(bool)
    inter, union = (q & r).sum(axis=2), (q | r).sum(axis=2)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def dcg(gains: np.ndarray) -> np.ndarray:
    """(Q, k) gains in rank order -> (Q,) discounted cumulative gain, gain / log2(rank + 1)."""
    return (gains / np.log2(np.arange(2, gains.shape[1] + 2))).sum(axis=1)


def ndcg_at_k(gains: np.ndarray, ideal: np.ndarray, k: int) -> float:
    """Mean over queries of DCG@k / the ideal DCG@k (``ideal``: the k best gains in the collection, best
    first); a query nothing in the collection gains from is left out."""
    best = dcg(ideal[:, :k].astype(np.float64))
    ok = best > 0
    return float((dcg(gains[ok, :k].astype(np.float64)) / best[ok]).mean()) if ok.any() else 0.0


def precision_at_k(rel: np.ndarray, k: int) -> float:
    """Mean over queries of the fraction of relevant items in the first k results; rel (Q, >=k)."""
    if rel.shape[1] < k:
        raise ValueError(f"precision@{k}: only {rel.shape[1]} results per query")
    return float(rel[:, :k].mean())


def average_precision_at_k(rel: np.ndarray, k: int, n_relevant: np.ndarray | None = None) -> np.ndarray:
    """AP@k per query: mean of precision@i over the ranks i <= k holding a relevant item.

    Normalised by min(k, number of relevant items in the collection) when given (so a perfect
    ranking scores 1), else by the relevant items found in the first k.
    """
    r = rel[:, :k].astype(np.float64)  # (Q, k)
    prec = np.cumsum(r, axis=1) / np.arange(1, r.shape[1] + 1)  # precision@i
    denom = r.sum(axis=1) if n_relevant is None else np.minimum(n_relevant, k).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(denom > 0, (prec * r).sum(axis=1) / np.maximum(denom, 1), 0.0)
    return ap


def map_at_k(rel: np.ndarray, k: int, n_relevant: np.ndarray | None = None) -> float:
    return float(average_precision_at_k(rel, k, n_relevant).mean())


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the true k nearest neighbours (Q, k) that a search returned (Q, >=k)."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k)
