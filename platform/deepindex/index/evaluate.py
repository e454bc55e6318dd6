"""Retrieval quality of a model on a gallery with known labels (``deepindex evaluate-retrieval``).

Three measurements, all on the same gallery (by default 5,000 digit-scenes drawn from the test
glyphs: handwriting the model never saw):

- **keyword**: for every concept, the query is the concept's own name, parsed by the
  vocabulary (names, plus a synonyms file when given); items are ranked by the keyword score
  (:func:`deepindex.index.keywords.scores`, ``all``); AP over the whole ranking, an item
  relevant when it carries the concept; mAP is their mean.  A name the vocabulary cannot parse
  scores AP 0.
- **query by example**: every item queries all the others (leave-one-out) with one descriptor
  (a feature point: ``probs``, ``penultimate``, ``last_but_two``) and one metric (``l2``,
  ``ip``, ``cosine``), exact search; precision@k and mAP@k, an item relevant when it shares a
  concept with the query (:mod:`deepindex.index.metrics`), AP normalised by min(k, relevant
  items in the gallery); and nDCG@k, each result's gain the share of concepts it has in common
  with the query (Jaccard): where nearly every pair of items shares a concept (a few colours and
  shapes in every photo), precision and mAP are near 1 for any ranking, and only the graded
  measure tells the descriptors apart.
- **fusion**: "items with concept c, like this one": for each concept, ``queries_per_concept``
  gallery items carrying it are the examples; relevant = carries c.  Scored by the keyword
  alone, the example alone (the best QBE descriptor and metric above), the two fused
  (``weighted`` and ``rrf``, :mod:`deepindex.index.fusion`), and the example filtered by
  ``min_prob`` c >= 0.5.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from deepindex.index.metrics import (
    average_precision_at_k,
    dcg,
    jaccard,
    map_at_k,
    ndcg_at_k,
    precision_at_k,
    relevance,
)
from deepindex.index.vectors import QUERY_METRICS, feature_name, query_metric

if TYPE_CHECKING:
    from deepindex.checkpoint import LoadedModel
    from deepindex.console import Progress
    from deepindex.index.collection import Collection
    from deepindex.index.keywords import Vocabulary

log = logging.getLogger(__name__)

DESCRIPTORS = ("probs", "penultimate", "last_but_two")
FILTER_MIN_PROB = 0.5


def label_matrix(labels: Sequence[Sequence[str]], concepts: Sequence[str]) -> np.ndarray:
    """Tags per item -> (N, K) bool over the model's concepts (tags the model lacks are ignored)."""
    index = {c: j for j, c in enumerate(concepts)}
    out = np.zeros((len(labels), len(concepts)), dtype=bool)
    for i, tags in enumerate(labels):
        for t in tags:
            if t in index:
                out[i, index[t]] = True
    return out


def keyword_quality(probs: np.ndarray, labels: np.ndarray, concepts: Sequence[str], vocabulary: Vocabulary,
                    k: int = 10) -> dict[str, Any]:
    """Per-concept AP (query = the concept's name) and mAP over the whole ranking; precision@k."""
    from deepindex.index.keywords import scores

    ap, p_at_k, parsed_as = {}, {}, {}
    n = len(probs)
    for j, c in enumerate(concepts):
        if not labels[:, j].any():
            continue  # no item carries it: AP undefined, left out of the mean
        q = vocabulary.parse(c.replace("_", " "))
        parsed_as[c] = q.concepts
        if not q.concepts:
            ap[c], p_at_k[c] = 0.0, 0.0
            continue
        s = scores(probs, [concepts.index(x) for x in q.concepts], "all")
        order = np.lexsort((np.arange(n), -s))  # best first, ties by row
        rel = labels[order, j][None, :]  # (1, N)
        ap[c] = float(average_precision_at_k(rel, n, np.array([labels[:, j].sum()]))[0])
        p_at_k[c] = precision_at_k(rel, min(k, n))
    # A random ranking's expected AP (train.metrics.random_ap; its prevalence stood for it, lower) is the
    # floor to beat; its expected precision@k is the prevalence.
    from deepindex.train.metrics import random_ap

    chance = float(np.mean([random_ap(n, int(labels[:, concepts.index(c)].sum())) for c in ap])) if ap else 0.0
    return {"map": float(np.mean(list(ap.values()))) if ap else 0.0,
            f"precision_at_{k}": float(np.mean(list(p_at_k.values()))) if p_at_k else 0.0,
            "chance": chance, "ap": ap, "parsed_as": parsed_as}


def n_relevant(labels: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """For each query row: items of the gallery sharing a concept with it, itself excluded."""
    rows = np.arange(len(labels)) if rows is None else rows
    lf = labels.astype(np.float32)
    out = np.empty(len(rows), dtype=np.int64)
    for s in range(0, len(rows), 1024):  # (chunk, N) at a time
        r = rows[s : s + 1024]
        out[s : s + 1024] = ((lf[r] @ lf.T) > 0).sum(axis=1) - 1
    return out


def qbe_queries(labels: np.ndarray) -> np.ndarray:
    """The items a leave-one-out query by example asks with: those sharing a concept with another item.
    An unlabelled item, or one whose tags no other item carries, has nothing to find: counted, its AP
    and precision were 0 whatever the ranking, so a perfect one scored below 1, and nDCG (which left it
    out) disagreed with mAP (found on review)."""
    labelled = np.flatnonzero(labels.any(axis=1))
    return labelled[n_relevant(labels, labelled) > 0]


def jaccard_gains(labels: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query row: the k best Jaccard gains in the gallery, best first (the ideal ranking's),
    and the mean gain over the gallery (a random ranking's expected gain), itself excluded."""
    lf = labels.astype(np.float32)
    sizes = lf.sum(axis=1)
    ideal = np.empty((len(rows), k))
    mean = np.empty(len(rows))
    for s in range(0, len(rows), 512):  # (chunk, N) at a time
        r = rows[s : s + 512]
        inter = lf[r] @ lf.T
        union = sizes[r][:, None] + sizes[None, :] - inter
        j = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        j[np.arange(len(r)), r] = 0.0  # not itself
        mean[s : s + 512] = j.sum(axis=1) / max(len(labels) - 1, 1)
        ideal[s : s + 512] = -np.sort(-np.partition(j, -k, axis=1)[:, -k:], axis=1)
    return ideal, mean


def qbe_quality(feature: np.ndarray, labels: np.ndarray, metric: str, k: int = 10, normalize: bool = False,
                ideal: np.ndarray | None = None) -> dict[str, float]:
    """Leave-one-out query by example over the gallery: precision@k, mAP@k and nDCG@k (``ideal``: the
    queries' ideal gains, :func:`jaccard_gains`, computed once for every descriptor and metric)."""
    from deepindex.index.vectors import exact_knn

    queries = qbe_queries(labels)
    _, rows = exact_knn(feature, feature[queries], k, metric, normalize=normalize, exclude=queries)
    found = labels[np.maximum(rows, 0)]
    rel = relevance(labels[queries], found) & (rows >= 0)  # (Q, k)
    gains = np.where(rows >= 0, jaccard(labels[queries], found), 0.0)
    nrel = n_relevant(labels, queries)
    ideal = jaccard_gains(labels, queries, k)[0] if ideal is None else ideal
    return {f"precision_at_{k}": precision_at_k(rel, k), f"map_at_{k}": map_at_k(rel, k, nrel),
            f"ndcg_at_{k}": ndcg_at_k(gains, ideal, k)}


def qbe_chance(labels: np.ndarray, k: int = 10, gains: tuple[np.ndarray, np.ndarray] | None = None
               ) -> dict[str, float]:
    """A random ranking's expected precision@k (the mean share of the gallery relevant to a query) and
    nDCG@k (the mean gain in every rank, over the ideal DCG; ``gains``: :func:`jaccard_gains` of the
    labelled items, when the caller has them)."""
    queries = qbe_queries(labels)
    ideal, mean = jaccard_gains(labels, queries, k) if gains is None else gains
    best = dcg(ideal)
    ok = best > 0
    random_dcg = mean * (1 / np.log2(np.arange(2, k + 2))).sum()
    return {f"precision_at_{k}": float((n_relevant(labels, queries) / max(len(labels) - 1, 1)).mean()),
            f"ndcg_at_{k}": float((random_dcg[ok] / best[ok]).mean()) if ok.any() else 0.0}


def fusion_quality(probs: np.ndarray, feature: np.ndarray, labels: np.ndarray, concepts: Sequence[str], metric: str,
                   k: int = 10, queries_per_concept: int = 20, seed: int = 0, normalize: bool = False
                   ) -> dict[str, Any]:
    """Keyword, example, their fusions and the filtered example on "items with c like this one"."""
    from deepindex.index.fusion import Scored, concept_mask, fuse, keep
    from deepindex.index.keywords import scores
    from deepindex.index.vectors import exact_knn

    rng = np.random.default_rng(seed)
    n = len(probs)
    runs: dict[str, list[np.ndarray]] = {m: [] for m in ("keyword", "example", "weighted", "rrf", "example+min_prob")}
    nrel: list[int] = []
    for j, c in enumerate(concepts):
        having = np.flatnonzero(labels[:, j])
        if len(having) < 2:
            continue
        examples = rng.choice(having, size=min(queries_per_concept, len(having)), replace=False)
        kw = scores(probs, [j], "all")
        sim_s, sim_r = exact_knn(feature, feature[examples], n - 1, metric, normalize=normalize, exclude=examples)
        mask = concept_mask(probs, concepts, {c: FILTER_MIN_PROB})
        for e, ss, rr in zip(examples, sim_s, sim_r, strict=False):
            others = np.ones(n, dtype=bool)
            others[e] = False
            keyword = keep(Scored.dense(kw), others)
            example = Scored.of(rr[rr >= 0], ss[rr >= 0], "example")
            signals = {"keyword": keyword, "example": example,
                       "weighted": fuse({"keyword": keyword, "example": example}, "weighted"),
                       "rrf": fuse({"keyword": keyword, "example": example}, "rrf"),
                       "example+min_prob": keep(example, mask)}
            for name, sc in signals.items():
                top = sc.rows[np.lexsort((sc.rows, -sc.scores))][:k]  # best first, ties by row
                rel = np.zeros(k, dtype=bool)
                rel[: len(top)] = labels[top, j]
                runs[name].append(rel)
            nrel.append(len(having) - 1)
    nr = np.array(nrel)
    out: dict[str, Any] = {"queries": len(nrel)}
    for name, rels in runs.items():
        table = np.array(rels).reshape(len(nrel), k)
        out[name] = {f"precision_at_{k}": precision_at_k(table, k), f"map_at_{k}": map_at_k(table, k, nr)}
    return out


def evaluate_retrieval(lm: LoadedModel, collection: Collection, *, descriptors: Sequence[str] = DESCRIPTORS,
                       metrics: Sequence[str] = QUERY_METRICS, k: int = 10, vocabulary: Vocabulary | None = None,
                       queries_per_concept: int = 20, normalize: bool = False,
                       seed: int = 0, batch_size: int = 256,
                       progress: Progress | None = None) -> dict[str, Any]:
    """The whole report for a loaded model (:class:`deepindex.checkpoint.LoadedModel`) on a labelled
    collection; ``progress(done, total)`` as its items are embedded."""
    from deepindex.index.embed import embed_features_local
    from deepindex.index.keywords import Vocabulary

    if collection.labels is None:
        raise ValueError(f"collection: {collection.name} has no labels; retrieval quality needs them")
    if k < 1 or k >= len(collection):
        raise ValueError(f"k: must be within [1, {len(collection) - 1}], got {k}")
    metrics = [query_metric(m) for m in metrics]
    have = lm.model.feature_points()
    descriptors = [feature_name(d) for d in descriptors]
    for d in descriptors:
        if d not in have:
            raise ValueError(f"features: unknown feature point {d!r}; this model has {', '.join(have)}")
    t0 = time.perf_counter()
    vocabulary = vocabulary or Vocabulary(lm.concepts)
    wanted = list(dict.fromkeys(["probs", *descriptors]))
    feats = embed_features_local(lm, collection, wanted, batch_size, progress)
    labels = label_matrix(collection.labels, lm.concepts)
    t_embed = time.perf_counter() - t0
    report: dict[str, Any] = {
        "collection": {"name": collection.name, "size": len(collection), **collection.meta},
        "k": k, "normalize": normalize, "dims": {d: int(feats[d].shape[1]) for d in descriptors},
        "keyword": keyword_quality(feats["probs"], labels, lm.concepts, vocabulary, k),
        "qbe": {},
    }
    if not len(qbe_queries(labels)):
        raise ValueError(f"collection: no item of {collection.name} shares a concept with another, so query by "
                         "example has nothing to find; evaluate on a labelled gallery with repeated concepts")
    gains = jaccard_gains(labels, qbe_queries(labels), k)  # the same for every descriptor
    for d in descriptors:
        report["qbe"][d] = {m: qbe_quality(feats[d], labels, m, k, normalize, gains[0]) for m in metrics}
        log.debug("qbe %s: %s", d, report["qbe"][d])  # the command prints the table
    best = max(((d, m) for d in descriptors for m in metrics),
               key=lambda dm: (report["qbe"][dm[0]][dm[1]][f"map_at_{k}"],  # nDCG breaks a tie (all 1.0 where
                               report["qbe"][dm[0]][dm[1]][f"ndcg_at_{k}"]))  # every item shares a concept)
    report["qbe_best"] = {"descriptor": best[0], "metric": best[1], **report["qbe"][best[0]][best[1]]}
    chance = qbe_chance(labels, k, gains)
    report["qbe_chance"] = chance[f"precision_at_{k}"]  # what /v1/about and the page show
    report["qbe_chance_ndcg"] = chance[f"ndcg_at_{k}"]
    report["fusion"] = {"descriptor": best[0], "metric": best[1], "min_prob": FILTER_MIN_PROB,
                        **fusion_quality(feats["probs"], feats[best[0]], labels, lm.concepts, best[1], k,
                                         queries_per_concept, seed, normalize)}
    report["seconds"] = {"embed": round(t_embed, 2), "total": round(time.perf_counter() - t0, 2)}
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as Markdown tables: QBE per descriptor x metric, keyword, fusion."""
    k = report["k"]
    metrics = list(next(iter(report["qbe"].values())))
    lines = [f"QBE mAP@{k} / precision@{k} / nDCG@{k} ({report['collection']['name']}, {report['collection']['size']} "
             f"items; a random ranking's precision@{k}: {report['qbe_chance']:.3f}, nDCG@{k}: "
             f"{report['qbe_chance_ndcg']:.3f}; nDCG's gain: concepts shared / concepts of either)", "",
             "| descriptor (dim) | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for d, row in report["qbe"].items():
        cells = [f"{row[m][f'map_at_{k}']:.4f} / {row[m][f'precision_at_{k}']:.4f} / {row[m][f'ndcg_at_{k}']:.4f}"
                 for m in metrics]
        lines.append(f"| {d} ({report['dims'][d]}) | " + " | ".join(cells) + " |")
    kw = report["keyword"]
    lines += ["", f"Keyword (query = concept name): mAP {kw['map']:.4f}, precision@{k} {kw[f'precision_at_{k}']:.4f} "
              f"(random ranking: {kw['chance']:.3f})",
              "AP per concept: " + ", ".join(f"{c} {v:.3f}" for c, v in kw["ap"].items())]
    f = report["fusion"]
    lines += ["", f"Fusion, 'items with c like this one' ({f['queries']} queries; "
                  f"example = {f['descriptor']}/{f['metric']}):",
              "", f"| signal | mAP@{k} | precision@{k} |", "|---|---|---|"]
    for name in ("keyword", "example", "weighted", "rrf", "example+min_prob"):
        lines.append(f"| {name} | {f[name][f'map_at_{k}']:.4f} | {f[name][f'precision_at_{k}']:.4f} |")
    return "\n".join(lines)
