"""One search over an index (deepindex.index.query): keywords, examples, filters, fusion, and cursor pages
that cover every item exactly once, over exact and approximate vector indexes."""
from __future__ import annotations

import numpy as np
import pytest

from deepindex.index.fusion import Scored, encode_cursor, fuse, query_key
from deepindex.index.keywords import scores
from deepindex.index.query import Query, UnknownExample, run
from deepindex.index.store import IndexChange, IndexStore
from deepindex.index.vectors import VectorConfig

pytestmark = pytest.mark.timeout(60)

CONCEPTS = ["cat", "dog", "aquarium_fish"]


def store(n: int = 300, kind: str = "flat", seed: int = 0, multilabel: bool = True, metric: str = "l2",
          normalize: bool = False) -> IndexStore:
    rng = np.random.default_rng(seed)
    # Coarse probabilities (two decimals): many equal keyword scores, so ties cross page boundaries.
    probs = np.round(rng.random((n, 3)), 2).astype(np.float32)
    if not multilabel:  # a softmax's: each row sums to 1
        probs = probs / probs.sum(axis=1, keepdims=True)
    centres = rng.normal(size=(6, 8)).astype(np.float32) * 4
    feats = (centres[rng.integers(0, 6, n)] + rng.normal(size=(n, 8))).astype(np.float32)
    return IndexStore.create(model={"uri": "x", "name": "m", "version": "1"}, collection="c", seq=n,
                             concepts=CONCEPTS, ids=[f"i{j:04d}" for j in range(n)], labels=[[] for _ in range(n)],
                             probs=probs, features={"penultimate": feats},
                             vector_cfg=VectorConfig(kind=kind, metric=metric, normalize=normalize, hnsw_ef_search=16),
                             default_feature="penultimate", image_size=4, channels=1, multilabel=multilabel)


def all_pages(index: IndexStore, q: Query) -> list[tuple[str, float]]:
    """Every page of ``q`` in order, following next_cursor."""
    out: list[tuple[str, float]] = []
    cursor = None
    for _ in range(1000):
        res = run(index, Query(**{**q.__dict__, "cursor": cursor}))
        out += [(index.ids[r], s) for r, s in res.hits]
        assert len(res.hits) <= q.k
        cursor = res.next_cursor
        if cursor is None:
            return out
        assert len(res.hits) == q.k  # only the last page is short
    raise AssertionError("no last page")


def expected_order(index: IndexStore, rows: np.ndarray, s: np.ndarray) -> list[str]:
    ids = np.asarray(index.ids)[rows]
    return ids[np.lexsort((ids, -s))].tolist()


def test_keyword_pages_cover_every_item_once_in_score_then_id_order():
    index = store()
    q = Query(k=7, key=query_key(q="cat"), concepts=["cat"])
    got = all_pages(index, q)
    s = scores(index.probs, [0], "all")
    assert [i for i, _ in got] == expected_order(index, np.arange(300), s)
    assert len({i for i, _ in got}) == 300
    # A cursor belongs to its query: the same cursor with other parameters is refused, naming it.
    first = run(index, q)
    with pytest.raises(ValueError, match="cursor: it belongs to another query"):
        run(index, Query(k=7, key=query_key(q="dog"), concepts=["dog"], cursor=first.next_cursor))
    with pytest.raises(ValueError, match="cursor: not a cursor"):
        run(index, Query(k=7, key=q.key, concepts=["cat"], cursor="bm90IGEgY3Vyc29y"))
    with pytest.raises(ValueError, match="cursor: not a cursor"):  # well formed, but an integer id: never issued
        run(index, Query(k=7, key=q.key, concepts=["cat"], cursor=encode_cursor(0.5, 3, q.key)))


def test_exclusive_classes_are_disjoint_not_independent():
    """A softmax model's classes: `any` is the sum of their probabilities (exactly the chance the image is one
    of them; noisy-or undercounts it), and `all` of two is refused: no image is two classes, and a product of
    softmax probabilities put first the images the model was least sure of (a 3-class image folder's
    "circle square" answered circles at 0.25)."""
    index = store(multilabel=False)
    got = run(index, Query(k=300, concepts=["cat", "dog"], mode="any"))
    want = np.clip(index.probs[:, 0].astype(np.float64) + index.probs[:, 1], 0, 1)
    assert [index.ids[r] for r, _ in got.hits] == expected_order(index, np.arange(300), want)
    assert np.allclose([s for _, s in got.hits], np.sort(want)[::-1])
    with pytest.raises(ValueError, match=r"^mode=all: cat, dog are exclusive classes of this model \(an image is "
                                         r"one of them\), so no image is all of them; mode=any finds images of any "
                                         r"of them$"):
        run(index, Query(k=5, concepts=["cat", "dog", "cat"], mode="all"))
    one = run(index, Query(k=300, concepts=["dog", "dog"], mode="all"))  # one class: its probability
    assert np.allclose([s for _, s in one.hits], np.sort(index.probs[:, 1])[::-1])
    ranked = index.rank_keywords([0, 1], 5, "any")  # the store's own ranking agrees
    assert [r for r, _ in ranked] == [r for r, _ in got.hits[:5]]
    # A multi-label model's concepts stay independent: noisy-or and the product.
    ml = store()
    assert run(ml, Query(k=3, concepts=["cat", "dog"], mode="all")).hits
    assert np.allclose(scores(ml.probs, [0, 1], "any"), 1 - (1 - ml.probs[:, 0]) * (1 - ml.probs[:, 1]))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_example_pages_go_past_the_first_fetch_and_cover_every_item_once(kind):
    index = store(kind=kind)
    vec = index.features["penultimate"][5]
    got = all_pages(index, Query(k=9, key="e", vector=vec))
    assert len({i for i, _ in got}) == len(got)  # never twice
    sc = [s for _, s in got]
    assert sc == sorted(sc, reverse=True)  # best first across the pages
    full = expected_order(index, np.arange(300), index.similarity(vec, "penultimate", "l2"))
    if kind == "flat":  # exact: every item, in the order of a full exact scan
        assert [i for i, _ in got] == full
    else:
        # Approximate: the first page is the index's search, which may miss an item near the query (what
        # approximate means); every page after it is exact: each item ranked after the first page's last,
        # once, in the exact order.
        first = [i for i, _ in got[:9]]
        assert [i for i, _ in got[9:]] == full[full.index(first[-1]) + 1:]
        assert len(got) >= 300 - 9
    # An indexed item as the example: itself left out, the rest all there.
    got = all_pages(index, Query(k=50, key="i", item="i0005"))
    assert "i0005" not in {i for i, _ in got} and len(got) == (299 if kind == "flat" else len({i for i, _ in got}))


@pytest.mark.parametrize(("kind", "metric"), [("flat", "l2"), ("hnsw", "l2"), ("ivf", "l2"), ("hnsw", "ip")])
def test_a_normalised_index_scores_every_page_by_exact_cosine(kind, metric):
    """An index of L2-normalised vectors answers cosine (its manifest says so).  Built with the l2 metric it
    scored the first page by minus the distance, and an approximate index's next pages, rescored by exact
    cosine, compared those with the cursor's distance: page 2 came back empty (found on review).  Every
    hit's score is now the exact cosine, on every page and index kind, and the pages cover every item once."""
    index = store(n=120, kind=kind, metric=metric, normalize=True)
    assert index.manifest.features["penultimate"].default_query_metric == "cosine"
    vec = index.features["penultimate"][5]
    exact = index.similarity(vec, "penultimate", "cosine")
    got = all_pages(index, Query(k=7, key="e", vector=vec))
    ids = [i for i, _ in got]
    assert len(set(ids)) == len(ids) and len(ids) >= 120 - 7, len(ids)
    assert all(s == exact[index.rows[i]] for i, s in got)  # the one exact arithmetic, bit for bit
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    if kind == "flat":
        assert ids == expected_order(index, np.arange(120), exact)


def test_pages_after_the_first_on_an_approximate_index_miss_nothing_on_clustered_data():
    """Found on review: 150 items in 6 well-separated clusters, where HNSW's search at a small ef misses
    many near items.  Fetching deeper through it took its top items for the exact ones, and the cursor
    passed the items it had missed: 102 of 150 items were ever shown at k=9.  Only the first page is the
    approximate search now."""
    for n, k in ((150, 9), (150, 6), (300, 6)):
        index = store(n=n, kind="hnsw")
        assert index.approximate("penultimate", "l2") and not index.approximate("penultimate", "ip")
        vec = index.features["penultimate"][5]
        got = [i for i, _ in all_pages(index, Query(k=k, key="e", vector=vec))]
        full = expected_order(index, np.arange(n), index.similarity(vec, "penultimate", "l2"))
        assert len(set(got)) == len(got) >= n - k and got[k:] == full[full.index(got[k - 1]) + 1:], (n, k)
    assert not store(kind="flat").approximate("penultimate", "l2")


def test_a_first_page_by_example_is_one_vector_search(monkeypatch):
    """The first page of a similar-items query fetches k + 2 (k + 1 of them surely above the rest: the page
    and whether another follows), so the vector index is searched once, not once at k + 1 and again."""
    index = store()
    vi = index.vectors["penultimate"]
    asked: list[int] = []
    real = vi.search

    def counted(queries: np.ndarray, k: int):
        asked.append(k)
        return real(queries, k)

    monkeypatch.setattr(vi, "search", counted)
    res = run(index, Query(k=10, key="i", item="i0005"))
    assert asked == [10 + 2 + 1]  # the example item itself is fetched and left out
    assert len(res.hits) == 10 and res.next_cursor is not None
    full = index.similarity(index.features["penultimate"][5], "penultimate", "l2")
    full[5] = -np.inf
    assert [index.ids[r] for r, _ in res.hits] == expected_order(index, np.arange(300), full)[:10]


def test_probs_are_a_descriptor_with_every_metric_and_bad_parameters_are_named():
    index = store(kind="hnsw")
    assert set(index.query_features()) == {"penultimate", "probs"}
    assert index.query_features()["penultimate"] == ("l2",)  # an approximate index answers its geometry
    assert index.query_features()["probs"] == ("cosine", "l2", "ip")
    vec = index.probs[3]
    for metric in ("l2", "ip", "cosine"):
        res = run(index, Query(k=5, vector=vec, feature="probs", metric=metric))
        assert res.feature == "probs" and res.metric == metric and len(res.hits) == 5
    assert run(index, Query(k=1, vector=vec, feature="probs", metric="l2")).hits[0][0] == 3  # itself, distance 0
    with pytest.raises(ValueError, match=r"^feature: 'stage9' is not indexed; this index answers penultimate, probs"):
        run(index, Query(k=5, vector=vec, feature="stage9"))
    with pytest.raises(ValueError, match=r"^metric=cosine: this hnsw index"):
        run(index, Query(k=5, vector=index.features["penultimate"][0], metric="cosine"))
    with pytest.raises(ValueError, match=r"^min_prob\.bird: unknown concept"):
        run(index, Query(k=5, concepts=["cat"], min_prob={"bird": 0.5}))
    with pytest.raises(ValueError, match=r"^fusion: expected one of weighted, rrf"):
        run(index, Query(k=5, concepts=["cat"], fusion="max"))  # type: ignore[arg-type]
    with pytest.raises(UnknownExample):
        run(index, Query(k=5, item="nobody"))


def test_min_prob_filters_before_ranking_and_deleted_items_never_show():
    index = store()
    index.apply([IndexChange(seq=301, op="delete", id="i0000")])
    q = Query(k=20, key="f", concepts=["cat"], min_prob={"dog": 0.5, "aquarium_fish": 0.25})
    got = all_pages(index, q)
    ok = (index.probs[:, 1] >= 0.5) & (index.probs[:, 2] >= 0.25) & index.alive
    assert {i for i, _ in got} == {index.ids[r] for r in np.flatnonzero(ok)}
    ex = all_pages(index, Query(k=20, key="g", vector=index.features["penultimate"][1], min_prob={"dog": 0.5}))
    assert {i for i, _ in ex} == {index.ids[r] for r in np.flatnonzero((index.probs[:, 1] >= 0.5) & index.alive)}


@pytest.mark.parametrize("rule", ["weighted", "rrf"])
def test_keywords_and_example_fused_by_the_documented_rule(rule):
    index = store()
    vec = index.features["penultimate"][7]
    weights = {"keywords": 2.0, "example": 0.5, "unused": 3.0}  # a weight for a signal not in the query is ignored
    got = all_pages(index, Query(k=25, key="h", concepts=["dog"], vector=vec, fusion=rule, weights=weights))
    rows = np.arange(300)
    parts = {"keywords": Scored(rows, scores(index.probs, [1], "all")),
             "example": Scored(rows, index.similarity(vec, "penultimate", "l2"))}
    fused = fuse(parts, rule, {"keywords": 2.0, "example": 0.5})
    assert [i for i, _ in got] == expected_order(index, fused.rows, fused.scores)
    np.testing.assert_allclose(sorted((s for _, s in got), reverse=True), -np.sort(-fused.scores))
    res = run(index, Query(k=3, concepts=["dog"], vector=vec))
    assert res.signals == ["keywords", "example"]
    # Keywords that matched no concept: the example alone ranks.
    alone = run(index, Query(k=5, concepts=[], vector=vec))
    assert [r for r, _ in alone.hits] == [r for r, _ in run(index, Query(k=5, vector=vec)).hits]


def _add(index: IndexStore, seq: int, item: str, probs: list[float], vec: np.ndarray) -> None:
    index.apply([IndexChange(seq=seq, op="add", id=item, probs=np.array(probs, np.float32),
                             features={"penultimate": vec.astype(np.float32)}, labels=[])])


def test_fused_pages_rank_as_the_first_did_when_items_come_and_go():
    """Found on review: a fused score depends on the other items (``weighted`` normalises by the signals'
    lowest and highest scores), so one item added far from the example after the first page rescaled every
    score, and the pages after it skipped 85 of 200 items.  Later pages now normalise by the first page's
    bounds: every item there from the start is shown once (a deleted one never), in the first page's order."""
    index = store(n=200)
    vec = index.features["penultimate"][7]
    q = Query(k=10, key="h", concepts=["dog"], vector=vec, fusion="weighted")
    first = run(index, q)
    rows = np.arange(200)
    parts = {"keywords": Scored(rows, scores(index.probs, [1], "all")),
             "example": Scored(rows, index.similarity(vec, "penultimate", "l2"))}
    order = expected_order(index, rows, fuse(parts, "weighted").scores)
    assert [index.ids[r] for r, _ in first.hits] == order[:10]
    _add(index, 201, "far", [0.0, 1.0, 0.0], vec + 1000)  # a dog above every other, far from the example
    index.apply([IndexChange(seq=202, op="delete", id=order[20])])
    seen, cursor = [], first.next_cursor
    while cursor is not None:
        res = run(index, Query(**{**q.__dict__, "cursor": cursor}))
        seen += [index.ids[r] for r, _ in res.hits]
        cursor = res.next_cursor
    assert [i for i in seen if i != "far"] == [i for i in order[10:] if i != order[20]]
    assert seen.count("far") <= 1
    # A cursor whose bounds are not numbers is not one this service issued.
    bad = encode_cursor(1.0, "i0001", "h", {"b": {"keywords": ["x", "y"]}})
    with pytest.raises(ValueError, match=r"^cursor: not a cursor this service issued"):
        run(index, Query(**{**q.__dict__, "cursor": bad}))


def test_rrf_pages_hold_while_the_collection_does_not_change_and_say_so_when_it_does():
    """``rrf`` ranks every item: an add above an item moves its rank, so pages across a change repeated or
    skipped items (found on review).  Its cursor is bound to the index's state: refused, naming the cursor,
    once an item is added or deleted; the first page again starts over."""
    index = store(n=200)
    vec = index.features["penultimate"][7]
    q = Query(k=10, key="h", concepts=["dog"], vector=vec, fusion="rrf")
    assert len(all_pages(index, q)) == 200  # unchanged: every item once (the rule's own test checks the order)
    first = run(index, q)
    _add(index, 201, "new", [0.5, 0.5, 0.5], vec)
    with pytest.raises(ValueError, match=r"^cursor: the collection changed since the first page"):
        run(index, Query(**{**q.__dict__, "cursor": first.next_cursor}))
    assert len(all_pages(index, q)) == 201
