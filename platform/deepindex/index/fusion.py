"""One query, several signals: fusion, concept filters and stable cursor paging, as pure functions.

A query may carry keywords (scores over every item: :func:`deepindex.index.keywords.scores`),
an example image or item (similarity scores over the items a vector search returned) and
concept filters (``min_prob``: keep items with ``p(c) >= t`` for every ``(c, t)``).  Each
signal is a :class:`Scored` (item rows and scores, higher is better); :func:`fuse` combines
them by one of two rules, chosen by ``rule``:

- ``weighted`` (default): each signal is min-max normalised to [0, 1] over the items it scored
  (its best item 1, its worst 0; all 1 if they all score the same), an item a signal did not
  score gets 0 from it, and the fused score is ``sum_s w_s * norm_s(i) / sum_s w_s``.
  Normalising first is what lets a probability product (keywords) and minus a Euclidean
  distance (similarity) be added at all; the weights then say how much each counts.
- ``rrf``: reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009):
  ``sum_s w_s / (rrf_k + rank_s(i))`` with ranks from 1 and ``rrf_k = 60`` as in the paper;
  equal scores share the best rank (competition ranking), so the order of ties inside a
  signal does not leak into the result; an item a signal did not score gets nothing from it.
  It needs no normalisation and ignores how far apart the scores are, only their order.

Filters are a mask (:func:`concept_mask`) applied with :func:`keep`, before or after fusing;
a query with filters only can rank by the filtered concepts' keyword scores.

Paging (:func:`page`): results are ordered by (score descending, item id ascending), and the
cursor is the last (score, id) a page returned, so the next page starts strictly after it.
Equal scores are ordered by id, so a page boundary between them neither repeats nor skips an
item.  The cursor is opaque to clients (URL-safe base64 of a small JSON), carries the score
exactly (``float.hex``) and a digest of the query it belongs to, and is refused for another
query.  Over a fixed result set every item appears exactly once across the pages; if items
are added between two requests, those ranked before the cursor are not shown (no page moves).
A fused ranking depends on the other items, not only on each item's own scores: ``weighted``
normalises by the signals' lowest and highest scores, ``rrf`` ranks every item.  So a fused
query's cursor also carries ``state`` (:func:`cursor_state`): ``weighted`` pages normalise by
the first page's bounds (:func:`signal_bounds`), which keeps every item's fused score as it
was; ``rrf`` pages hold only while the collection does not change (the caller binds them to
its state).
"""
from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

RRF_K = 60
Rule = Literal["weighted", "rrf"]
RULES = ("weighted", "rrf")


@dataclass(frozen=True)
class Scored:
    """Some items of a collection (``rows``, distinct) and their scores (higher is better)."""

    rows: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n,) float64

    @classmethod
    def dense(cls, scores: np.ndarray) -> Scored:
        """A score for every item: row i has ``scores[i]`` (keyword scores, exact similarity)."""
        s = np.asarray(scores, dtype=np.float64)
        return cls(np.arange(len(s), dtype=np.int64), s)

    @classmethod
    def of(cls, rows: ArrayLike, scores: ArrayLike, name: str = "scores") -> Scored:
        """Validated: 1-D, same length, finite scores, distinct non-negative rows; errors name ``name``."""
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(r) != len(s):
            raise ValueError(f"{name}: {len(r)} rows but {len(s)} scores")
        if not np.isfinite(s).all():
            raise ValueError(f"{name}: scores must be finite")
        if (r < 0).any() or len(np.unique(r)) != len(r):
            raise ValueError(f"{name}: rows must be distinct and >= 0 (drop FAISS's -1 padding first)")
        return cls(r, s)

    def __len__(self) -> int:
        return len(self.rows)


Bounds = Mapping[str, tuple[float, float]]  # signal -> (lowest, highest) score it was normalised by


def normalise(s: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Min-max to [0, 1]: best 1, worst 0; all 1 when every score is the same.  ``bounds``: (lo, hi) to
    normalise by instead of the scores' own (a later page's, ranking as the first did)."""
    s = np.asarray(s, dtype=np.float64)
    if len(s) == 0:
        return s
    lo, hi = bounds if bounds is not None else (s.min(), s.max())
    return np.ones_like(s) if hi - lo <= 0 else (s - lo) / (hi - lo)


def signal_bounds(parts: Mapping[str, Scored]) -> dict[str, tuple[float, float]]:
    """(lowest, highest) score of each signal that scored any item: what ``weighted`` normalises by."""
    return {name: (float(p.scores.min()), float(p.scores.max())) for name, p in parts.items() if len(p)}


def competition_ranks(s: np.ndarray) -> np.ndarray:
    """1 + the number of strictly higher scores: equal scores share the best rank."""
    desc = -np.sort(-np.asarray(s, dtype=np.float64))
    return np.searchsorted(-desc, -np.asarray(s, dtype=np.float64), side="left") + 1


def fuse(parts: Mapping[str, Scored], rule: Rule = "weighted", weights: Mapping[str, float] | None = None,
         rrf_k: int = RRF_K, bounds: Bounds | None = None) -> Scored:
    """Fuse named signals into one :class:`Scored` over the union of their items (see the module doc);
    ``bounds``: ``weighted`` normalises each signal by these (lo, hi) where given, not its own."""
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")
    if not parts:
        raise ValueError("fuse: no signal to fuse")
    weights = dict(weights or {})
    for name in weights:
        if name not in parts:
            raise ValueError(f"weights.{name}: no such signal; signals: {', '.join(parts)}")
        if not (np.isfinite(weights[name]) and weights[name] >= 0):
            raise ValueError(f"weights.{name}: must be a finite number >= 0, got {weights[name]!r}")
    w = {name: float(weights.get(name, 1.0)) for name in parts}
    if sum(w.values()) <= 0:
        raise ValueError("weights: at least one signal needs a weight > 0")
    if rule == "rrf" and rrf_k < 1:
        raise ValueError(f"rrf_k: must be >= 1, got {rrf_k}")
    rows = np.unique(np.concatenate([Scored.of(p.rows, p.scores, f"parts.{n}").rows for n, p in parts.items()]))
    total = np.zeros(len(rows), dtype=np.float64)
    for name, p in parts.items():
        if len(p) == 0 or w[name] == 0:
            continue
        contrib = (w[name] * normalise(p.scores, (bounds or {}).get(name)) if rule == "weighted"
                   else w[name] / (rrf_k + competition_ranks(p.scores)))
        total[np.searchsorted(rows, p.rows)] += contrib
    if rule == "weighted":
        total /= sum(w.values())
    return Scored(rows, total)


def concept_mask(probs: np.ndarray, concepts: Sequence[str], min_prob: Mapping[str, float]) -> np.ndarray:
    """(N, K) probabilities -> (N,) bool: items with ``p(c) >= t`` for every ``c: t`` in ``min_prob``."""
    index = {c: j for j, c in enumerate(concepts)}
    mask = np.ones(probs.shape[0], dtype=bool)
    for c, t in min_prob.items():
        if c not in index:
            raise ValueError(f"min_prob.{c}: unknown concept; the model has {len(concepts)}: "
                             f"{', '.join(concepts[:10])}...")
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"min_prob.{c}: must be within [0, 1], got {t!r}")
        mask &= probs[:, index[c]] >= float(t)
    return mask


def keep(scored: Scored, mask: np.ndarray) -> Scored:
    """The items of ``scored`` whose row is True in the (N,) ``mask``."""
    sel = np.asarray(mask, dtype=bool)[scored.rows]
    return Scored(scored.rows[sel], scored.scores[sel])


@dataclass(frozen=True)
class Page:
    rows: np.ndarray  # (<= size,) best first
    scores: np.ndarray
    ids: list  # the items' ids, in the same order
    next_cursor: str | None  # None: this was the last page


def query_key(**params: Any) -> str:
    """A canonical digest of a query's parameters, for :func:`page`: a cursor is bound to it."""
    blob = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_cursor(score: float, item_id: str | int, key: str = "", state: Mapping[str, Any] | None = None) -> str:
    """``state``: what the query's later pages need besides the position (JSON), e.g. a fusion's bounds."""
    d: dict[str, Any] = {"s": float(score).hex(), "id": item_id, "q": key}
    if state:
        d["x"] = dict(state)
    blob = json.dumps(d, separators=(",", ":"))
    return base64.urlsafe_b64encode(blob.encode()).decode().rstrip("=")


def _decoded(cursor: str, key: str) -> dict[str, Any]:
    try:
        d = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        score, item_id, q = float.fromhex(d["s"]), d["id"], d["q"]
        if (not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or not np.isfinite(score)
                or not isinstance(d.get("x", {}), dict)):
            raise TypeError
    # OverflowError: a score past float's range ("0x1p99999"); RecursionError: JSON nested deeper than the
    # parser goes (a cursor of 2048 '[' fits the pattern).  Both crafted, neither issued: found on review (500s).
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError):
        raise ValueError("cursor: not a cursor this service issued") from None
    if q != key:
        raise ValueError("cursor: it belongs to another query (same parameters are needed to page on)")
    return {"score": score, "id": item_id, "state": d.get("x", {})}


def decode_cursor(cursor: str, key: str = "") -> tuple[float, str | int]:
    """(score, id) of a cursor from :func:`encode_cursor`; ValueError naming ``cursor`` otherwise."""
    d = _decoded(cursor, key)
    return d["score"], d["id"]


def cursor_state(cursor: str, key: str = "") -> dict[str, Any]:
    """The ``state`` a cursor from :func:`encode_cursor` carries ({} if none); ValueError naming ``cursor``."""
    state: dict[str, Any] = _decoded(cursor, key)["state"]
    return state


def page(scored: Scored, ids: Sequence[str] | Sequence[int] | np.ndarray, size: int, cursor: str | None = None,
         key: str = "", state: Mapping[str, Any] | None = None) -> Page:
    """The ``size`` best items after ``cursor`` in (score desc, id asc) order; ``ids[row]`` names a row;
    the next cursor carries ``state``."""
    if size < 1:
        raise ValueError(f"size: must be >= 1, got {size}")
    id_arr = np.asarray(ids)
    if len(id_arr) and id_arr.dtype.kind not in "iuU":
        raise ValueError("ids: item ids must be all strings or all integers")
    s, r, item = scored.scores, scored.rows, id_arr[scored.rows]
    if cursor is not None:
        last_s, last_id = decode_cursor(cursor, key)
        if len(item) and isinstance(last_id, str) != (item.dtype.kind == "U"):
            raise ValueError("cursor: not a cursor this service issued")
        after = (s < last_s) | ((s == last_s) & (item > last_id))
        s, r, item = s[after], r[after], item[after]
    n = len(s)
    if n > size:
        # Only items scoring at least the size-th best can be on the page (ties included).
        cut = np.partition(s, n - size)[n - size]
        cand = np.flatnonzero(s >= cut)
    else:
        cand = np.arange(n)
    order = cand[np.lexsort((item[cand], -s[cand]))][:size]
    ids_out = item[order].tolist()
    nxt = encode_cursor(s[order[-1]], ids_out[-1], key, state) if n > size else None
    return Page(r[order], s[order], ids_out, nxt)
