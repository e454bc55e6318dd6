"""One search over a loaded index: keywords, an example, concept filters, fused and paged.

What the service's search endpoints run (``serving/index.py`` hands a :class:`Query` to
:func:`run`); the pieces are :mod:`deepindex.index.keywords` (keyword scores),
:class:`deepindex.index.store.IndexStore` (similarity) and :mod:`deepindex.index.fusion`
(fusion rules, ``min_prob`` masks, cursor pages), so the rules are written once.

- **keywords only**: every live item scored by the query concepts' presence probabilities;
- **example only** (an uploaded image's descriptor, or an indexed item, itself excluded): the
  nearest items through the index's vector search, fetched deeper (doubling) until the page and
  whether anything follows it are certain.  On an approximate index (HNSW, IVF) only the first page
  comes from its search (which may miss an item near the query: what approximate means); the pages
  after it are an exact scan of the raw descriptors after the cursor, so every item ranked after
  the first page appears exactly once.  (Fetching deeper through the approximate search would take
  its top ``depth`` for the exact one: an item it missed, scoring above one it found, would then be
  passed by the cursor and never shown; a third of a small clustered collection was, on review.);
- **both**: every live item gets an exact similarity score (the raw descriptor matrix), and the
  two signals are fused by ``fusion`` (``weighted`` or ``rrf``, :func:`deepindex.index.fusion.fuse`)
  with ``weights`` per signal (``keywords``, ``example``; 1 each by default; a weight for a signal
  the query does not carry is ignored);
- ``min_prob`` (concept -> t) keeps only items with ``p(c) >= t`` for every concept, before ranking.

Pages are ``(score desc, id asc)``; ``cursor`` is the last (score, id) of the previous page, bound
to the query by ``key`` (:func:`deepindex.index.fusion.query_key`): a cursor of another query is a
ValueError naming ``cursor``.  A fused query's later pages rank as its first did, whatever was added
or deleted in between: ``weighted`` normalises by the first page's bounds (carried in the cursor);
``rrf``, whose ranks count every item, refuses a cursor once the index has changed (ValueError naming
``cursor``: the service's 404 ``unknown_cursor``; found on review, its pages repeated or skipped
items across an add).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepindex.index.fusion import (
    RULES,
    Rule,
    Scored,
    concept_mask,
    cursor_state,
    decode_cursor,
    fuse,
    page,
    signal_bounds,
)
from deepindex.index.store import IndexStore

SIGNALS = ("keywords", "example")


class UnknownExample(LookupError):
    """The example item of a query is not in the index (the service's 404)."""


@dataclass(frozen=True)
class Query:
    k: int  # page size
    key: str = ""  # the query's digest (fusion.query_key): what a cursor is bound to
    cursor: str | None = None
    concepts: Sequence[str] | None = None  # None: no keyword signal; []: keywords that matched no concept
    mode: str = "all"
    vector: np.ndarray | None = None  # an uploaded example's descriptor (D,) for ``feature``
    item: str | None = None  # or an indexed item as the example
    feature: str | None = None  # the example's descriptor (the index's default when None)
    metric: str | None = None
    min_prob: Mapping[str, float] = field(default_factory=dict)
    fusion: Rule = "weighted"
    weights: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    hits: list[tuple[int, float]]  # (row, score), best first: rows of the index as it was during the query
    items: list[dict[str, Any]]  # the same hits as {id, score, labels}, read while the rows still meant them
    next_cursor: str | None
    feature: str  # the descriptor and metric the example was compared by (the defaults when no example)
    metric: str
    signals: list[str]  # which signals the ranking used


def run(index: IndexStore, q: Query) -> Result:
    """The page of ``q`` over ``index`` (see the module doc); ValueError names the bad parameter."""
    if q.k < 1:
        raise ValueError(f"k: must be >= 1, got {q.k}")
    if q.fusion not in RULES:
        raise ValueError(f"fusion: expected one of {', '.join(RULES)}, got {q.fusion!r}")
    # Feature and metric are checked whether or not an example uses them: a bad one is always a 422.
    feature, metric = index.check_query(q.feature, q.metric)
    has_example = q.vector is not None or q.item is not None
    if q.concepts is None and not has_example:
        raise ValueError("query: give keywords, an example, or both")
    if q.vector is not None and q.item is not None:
        raise ValueError("example: an uploaded image or an item id, not both")
    with index.rw.read():  # one consistent view of the rows while scoring (adds wait, queries do not)
        keep_rows = index.alive.copy()
        if q.min_prob:
            keep_rows &= concept_mask(index.probs, index.manifest.concepts, q.min_prob)
        vector, exclude = _example(index, q, feature)
        if exclude is not None:
            keep_rows[exclude] = False
        signals = [s for s, on in zip(SIGNALS, (q.concepts is not None, has_example), strict=True) if on]
        if vector is None:
            hits, nxt = _page(index, _keywords(index, q, keep_rows), q)
        elif q.concepts is None:
            hits, nxt = _example_page(index, q, vector, feature, metric, keep_rows)
        else:
            rows = np.flatnonzero(keep_rows)
            sim = index.similarity(vector, feature, metric)
            parts = {"keywords": _keywords(index, q, keep_rows), "example": Scored(rows, sim[rows])}
            weights = {s: float(w) for s, w in q.weights.items() if s in parts}
            state = _fusion_state(index, q, parts)
            bounds = {n: (float.fromhex(lo), float.fromhex(hi)) for n, (lo, hi) in state.get("b", {}).items()}
            hits, nxt = _page(index, fuse(parts, q.fusion, weights, bounds=bounds), q, state)
        # Ids and labels inside the read lock: a compaction after it renumbers the rows (found on review:
        # read after the lock, a compaction in between named other items with these scores).
        items = [index.hit(r, s) for r, s in hits]
    return Result(hits, items, nxt, feature, metric, signals)


def _cursor(q: Query) -> tuple[float, str] | None:
    if q.cursor is None:
        return None
    score, item_id = decode_cursor(q.cursor, q.key)
    if not isinstance(item_id, str):  # item ids are strings: an integer id was never issued here
        raise ValueError("cursor: not a cursor this service issued")
    return score, item_id


def _after(index: IndexStore, rows: np.ndarray, scores: np.ndarray, after: tuple[float, str] | None) -> np.ndarray:
    """(n,) bool: the items ranked after the cursor's (score, id) in (score desc, id asc) order; ids are
    looked up for the cursor's score's ties only (not an array of every id per query)."""
    if after is None:
        return np.ones(len(scores), dtype=bool)
    s0, id0 = after
    out = scores < s0
    for j in np.flatnonzero(scores == s0):
        out[j] = index.ids[int(rows[j])] > id0
    return out


def _fusion_state(index: IndexStore, q: Query, parts: Mapping[str, Scored]) -> dict[str, Any]:
    """What a fused query's pages carry so that a later page ranks as the first did (the module doc):
    ``weighted``, each signal's (lo, hi) on the first page (as ``float.hex``); ``rrf``, the index's
    ``seq`` then, since its ranks hold only while no item is added or deleted."""
    before = cursor_state(q.cursor, q.key) if q.cursor is not None else None
    if q.fusion == "rrf":
        if before is not None and before.get("seq", index.seq) != index.seq:
            raise ValueError("cursor: the collection changed since the first page; rrf ranks every item, so its "
                             "pages hold only while none is added or deleted: start again from the first page")
        return {"seq": index.seq}
    if before is None:
        return {"b": {n: [lo.hex(), hi.hex()] for n, (lo, hi) in signal_bounds(parts).items()}}
    b = before.get("b", {})
    try:
        if not all(isinstance(n, str) and len(v) == 2 and all(np.isfinite(float.fromhex(x)) for x in v)
                   for n, v in b.items()):
            raise TypeError
    except (TypeError, ValueError, AttributeError, OverflowError):  # OverflowError: a bound past float's range
        raise ValueError("cursor: not a cursor this service issued") from None
    return {"b": b}


def _page(index: IndexStore, scored: Scored, q: Query, state: Mapping[str, Any] | None = None
          ) -> tuple[list[tuple[int, float]], str | None]:
    """:func:`deepindex.index.fusion.page` over the few items that can be on this page: those after the
    cursor scoring at least the (k+1)-th best of them (ties kept), so only their ids are looked up;
    the next cursor carries ``state``."""
    s = scored.scores
    cand = np.flatnonzero(_after(index, scored.rows, s, _cursor(q)))
    if len(cand) > q.k + 1:
        cut = np.partition(s[cand], len(cand) - (q.k + 1))[len(cand) - (q.k + 1)]
        cand = cand[s[cand] >= cut]
    rows = scored.rows[cand]
    ids = np.array([index.ids[int(r)] for r in rows], dtype=str)
    pg = page(Scored(np.arange(len(rows)), s[cand]), ids, q.k, q.cursor, q.key, state)
    return [(int(rows[j]), float(v)) for j, v in zip(pg.rows, pg.scores, strict=True)], pg.next_cursor


def _example(index: IndexStore, q: Query, feature: str) -> tuple[np.ndarray | None, int | None]:
    """The example's descriptor and the row to leave out (the example item itself)."""
    if q.item is not None:
        got = index.item(q.item, feature)
        if got is None:
            raise UnknownExample(q.item)
        return got[2], got[0]
    return (None if q.vector is None else np.asarray(q.vector, dtype=np.float32).reshape(-1)), None


def _keywords(index: IndexStore, q: Query, keep_rows: np.ndarray) -> Scored:
    from deepindex.index.keywords import scores

    rows = np.flatnonzero(keep_rows)
    names = {c: j for j, c in enumerate(index.manifest.concepts)}
    idx = [names[c] for c in (q.concepts or []) if c in names]
    if not idx:  # no concept matched: nothing scores (the response reports the unmatched words)
        return Scored(rows[:0], np.zeros(0))
    m = index.manifest
    return Scored(rows, scores(index.probs[rows], idx, q.mode, exclusive=not m.multilabel, names=m.concepts))


def _example_page(index: IndexStore, q: Query, vector: np.ndarray, feature: str, metric: str,
                  keep_rows: np.ndarray) -> tuple[list[tuple[int, float]], str | None]:
    """Example only: the vector index's nearest items, fetched deeper until the page is certain.

    The fetched set is the top ``depth``; its lowest score may be shared with items it left out, so
    only items scoring strictly above it are certain.  ``k + 1`` of those after the cursor settle the
    page and whether a next one exists; else the depth doubles, up to every item.  The first page
    fetches ``k + 2``, the fewest that can hold ``k + 1`` certain items (``k + 1`` never could: its
    lowest is never certain, so every search fetched twice).
    """
    after = _cursor(q)
    if after is not None and index.approximate(feature, metric):  # see the module doc
        rows = np.flatnonzero(keep_rows)
        return _page(index, Scored(rows, index.similarity(vector, feature, metric)[rows]), q)
    n_keep = int(keep_rows.sum())
    depth = 2 * (q.k + 1) if after is not None else q.k + 2
    while True:
        hits = index.similar(vector[None, :], depth, feature=feature, metric=metric, mask=keep_rows)[0]
        rows = np.array([r for r, _ in hits], dtype=np.int64)
        scores = np.array([s for _, s in hits], dtype=np.float64)
        if len(hits) < min(depth, n_keep):
            # An approximate index (HNSW, IVF) that finds no more: the rest scored exactly, over the raw
            # descriptors (its distances are exact too, so the pages stay in one order).
            rows = np.flatnonzero(keep_rows)
            return _page(index, Scored(rows, index.similarity(vector, feature, metric)[rows]), q)
        if depth >= n_keep:
            return _page(index, Scored(rows, scores), q)
        sure = scores > scores.min()
        if (sure & _after(index, rows, scores, after)).sum() >= q.k + 1:
            return _page(index, Scored(rows[sure], scores[sure]), q)
        depth = min(2 * depth, n_keep)
