"""Fusion rules, concept filters and cursor paging: pure functions, properties over random inputs."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepindex.index.fusion import (
    Scored,
    competition_ranks,
    concept_mask,
    decode_cursor,
    encode_cursor,
    fuse,
    keep,
    normalise,
    page,
    query_key,
)

pytestmark = pytest.mark.timeout(60)


def as_dict(s: Scored) -> dict[int, float]:
    return dict(zip(s.rows.tolist(), s.scores.tolist(), strict=False))


def test_weighted_fusion_normalises_each_signal_then_weights():
    kw = Scored.dense(np.array([0.9, 0.5, 0.1, 0.1]))  # probabilities
    sim = Scored.of([1, 2, 3], [-1.0, -3.0, -2.0], "example")  # minus L2 distances, item 0 not returned
    f = as_dict(fuse({"kw": kw, "sim": sim}, "weighted"))
    # kw normalised: 1, .5, 0, 0; sim normalised: item1 1, item3 .5, item2 0, item0 absent (0).
    assert f == pytest.approx({0: 0.5, 1: 0.75, 2: 0.0, 3: 0.25})
    f = as_dict(fuse({"kw": kw, "sim": sim}, "weighted", {"kw": 3.0}))
    assert f == pytest.approx({0: 0.75, 1: (3 * 0.5 + 1) / 4, 2: 0.0, 3: 0.5 / 4})
    # A signal whose scores are all equal counts fully for every item it scored.
    assert normalise(np.array([2.0, 2.0])).tolist() == [1.0, 1.0]


def test_rrf_uses_ranks_only_and_ties_share_the_best_rank():
    a = Scored.of([0, 1, 2], [10.0, 5.0, 5.0])
    b = Scored.of([2, 3], [0.2, 0.1])
    f = as_dict(fuse({"a": a, "b": b}, "rrf", rrf_k=60))
    assert f == pytest.approx({0: 1 / 61, 1: 1 / 62, 2: 1 / 62 + 1 / 61, 3: 1 / 62})
    assert competition_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [1, 4, 1, 3]
    # Monotone rescaling of a signal changes nothing under RRF.
    b2 = Scored.of([2, 3], [1000.0, -5.0])
    assert as_dict(fuse({"a": a, "b": b2}, "rrf")) == pytest.approx(f)


def test_fusion_refuses_bad_input_naming_it():
    ok = Scored.dense(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="rule"):
        fuse({"a": ok}, "sum")
    with pytest.raises(ValueError, match=r"weights\.b"):
        fuse({"a": ok}, weights={"b": 1.0})
    with pytest.raises(ValueError, match=r"weights\.a"):
        fuse({"a": ok}, weights={"a": -1.0})
    with pytest.raises(ValueError, match=r"parts\.x: scores must be finite"):
        fuse({"x": Scored(np.array([0]), np.array([np.nan]))})
    with pytest.raises(ValueError, match="rows must be distinct"):
        Scored.of([0, 0], [1.0, 2.0], "example")
    with pytest.raises(ValueError, match="example: 2 rows but 1 scores"):
        Scored.of([0, 1], [1.0], "example")


def test_concept_filters():
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.95]], np.float32)
    m = concept_mask(probs, ["cat", "dog"], {"cat": 0.5})
    assert m.tolist() == [True, True, False]
    assert concept_mask(probs, ["cat", "dog"], {"cat": 0.5, "dog": 0.5}).tolist() == [False, True, False]
    assert as_dict(keep(Scored.dense(np.array([3.0, 2.0, 1.0])), m)) == {0: 3.0, 1: 2.0}
    with pytest.raises(ValueError, match=r"min_prob\.cow: unknown concept"):
        concept_mask(probs, ["cat", "dog"], {"cow": 0.5})
    with pytest.raises(ValueError, match=r"min_prob.cat: must be within \[0, 1\]"):
        concept_mask(probs, ["cat", "dog"], {"cat": 1.5})


def test_pages_break_ties_by_id_and_the_cursor_is_bound_to_its_query():
    ids = ["b", "a", "d", "c", "e"]
    s = Scored.dense(np.array([1.0, 1.0, 1.0, 1.0, 0.5]))  # four equal scores across a page boundary
    key = query_key(q="cats", k=2)
    p1 = page(s, ids, 2, key=key)
    assert p1.ids == ["a", "b"] and p1.rows.tolist() == [1, 0]
    p2 = page(s, ids, 2, p1.next_cursor, key)
    assert p2.ids == ["c", "d"]
    p3 = page(s, ids, 2, p2.next_cursor, key)
    assert p3.ids == ["e"] and p3.next_cursor is None
    with pytest.raises(ValueError, match="cursor: it belongs to another query"):
        page(s, ids, 2, p1.next_cursor, query_key(q="dogs", k=2))
    for bad in ("", "not-a-cursor", encode_cursor(1.0, 3, key) + "x"):
        with pytest.raises(ValueError, match="cursor"):
            page(s, ids, 2, bad, key)
    with pytest.raises(ValueError, match="size"):
        page(s, ids, 0)
    # Items added later that rank after the cursor show up; none before it moves the pages.
    grown = Scored.dense(np.array([1.0, 1.0, 1.0, 1.0, 0.5, 2.0, 0.7]))
    assert page(grown, [*ids, "z", "f"], 10, p2.next_cursor, key).ids == ["f", "e"]


def test_cursor_keeps_the_score_exactly():
    x = 0.1 + 0.2  # not representable in a short decimal
    assert decode_cursor(encode_cursor(x, "id", "k"), "k") == (x, "id")
    assert decode_cursor(encode_cursor(-3.5, 7), "") == (-3.5, 7)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=60), st.integers(1, 7), st.booleans(), st.integers(0, 10**6))
def test_paging_visits_every_item_once_in_order(levels, size, int_ids, seed):
    rng = np.random.default_rng(seed)
    n = len(levels)
    ids = rng.permutation(10 * n + 1)[:n] if int_ids else np.array([f"item-{i:04d}" for i in rng.permutation(n)])
    s = Scored.dense(np.array(levels, np.float64) / 3.0)  # many ties
    seen, cursor = [], None
    for _ in range(n + 1):
        p = page(s, ids, size, cursor)
        seen += list(zip((-p.scores).tolist(), p.ids, strict=False))
        cursor = p.next_cursor
        if cursor is None:
            break
    assert cursor is None and len(seen) == n
    assert seen == sorted(seen)  # score descending, then id ascending, across page boundaries
    assert sorted(x[1] for x in seen) == sorted(ids.tolist())


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(0, 10**6), st.sampled_from(["weighted", "rrf"]))
def test_fusion_of_one_signal_keeps_its_order(n, seed, rule):
    s = np.random.default_rng(seed).normal(size=n)
    f = fuse({"only": Scored.dense(s)}, rule)
    # Fusing one signal must not reorder it (ties may merge, never swap).
    order = np.argsort(-s, kind="stable")
    assert (np.diff(f.scores[order]) <= 1e-12).all()
