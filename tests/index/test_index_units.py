"""Unit tests of the index package: FAISS wrapper, store, keywords, retrieval metrics."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepindex.index.keywords import Vocabulary, rank, scores
from deepindex.index.metrics import average_precision_at_k, map_at_k, precision_at_k, recall_at_k, relevance
from deepindex.index.store import IndexChange, IndexMismatch, IndexStore, find_index, index_dir_name
from deepindex.index.vectors import VectorConfig, VectorIndex, brute_force

pytestmark = pytest.mark.timeout(120)


def clustered(n: int, d: int = 32, centers: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)).astype(np.float32)
    return (c[rng.integers(centers, size=n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


# ---- vectors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("normalize", [True, False])
def test_flat_is_exact(metric, normalize):
    x, q = clustered(2000), clustered(50, seed=1)
    vi = VectorIndex.build(x, VectorConfig(kind="flat", metric=metric, normalize=normalize))
    s, r = vi.search(q, 10)
    bs, br = brute_force(x, q, 10, metric, normalize)
    assert recall_at_k(r, br, 10) == 1.0
    np.testing.assert_allclose(s, bs, rtol=1e-3, atol=1e-3)
    assert (np.diff(s, axis=1) <= 1e-6).all()  # best first, higher is better for both metrics


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_recall(kind):
    x, q = clustered(5000), clustered(100, seed=2)
    vi = VectorIndex.build(x, VectorConfig(kind=kind, metric="ip", ivf_nlist=64, ivf_nprobe=16))
    assert vi.kind == kind
    _, r = vi.search(q, 10)
    _, br = brute_force(x, q, 10, "ip", True)
    assert recall_at_k(r, br, 10) >= 0.9


def test_auto_kind_and_add_save_load(tmp_path):
    x = clustered(3000)
    assert VectorIndex.build(x, VectorConfig(kind="auto", exact_max=5000)).kind == "flat"
    cfg = VectorConfig(kind="auto", exact_max=1000, ivf_nprobe=8)
    vi = VectorIndex.build(x, cfg)
    assert vi.kind == "ivf"
    new = clustered(5, seed=9) * 5  # far from the rest
    vi.add(new)
    _, r = vi.search(new, 1)
    assert r[:, 0].tolist() == list(range(3000, 3005))
    vi.save(str(tmp_path / "v.faiss"))
    back = VectorIndex.load(str(tmp_path / "v.faiss"), cfg)
    assert back.ntotal == 3005 and back.index.nprobe == 8
    assert (back.search(new, 3)[1] == vi.search(new, 3)[1]).all()


# ---- store ------------------------------------------------------------------------------------
def make_store(n=200, version="v1", name="m", seq=None) -> IndexStore:
    rng = np.random.default_rng(0)
    return IndexStore.create(model={"uri": "x", "name": name, "version": version}, collection="c",
                             seq=n if seq is None else seq, concepts=["a", "b", "c"], ids=[f"i{j}" for j in range(n)],
                             labels=[["a"] for _ in range(n)], probs=rng.random((n, 3), np.float32),
                             features={"penultimate": clustered(n, 8), "last_but_two": clustered(n, 4, seed=3)},
                             vector_cfg=VectorConfig(kind="flat"), default_feature="penultimate", image_size=4,
                             channels=1, multilabel=True)


def add(seq: int, item: str, vec: np.ndarray, labels=("b",)) -> IndexChange:
    return IndexChange(seq, "add", item, list(labels), np.full(3, 0.5, np.float32),
                       {"penultimate": vec.astype(np.float32), "last_but_two": np.zeros(4, np.float32)})


def test_store_roundtrip_and_manifest(tmp_path):
    s = make_store()
    path = s.save(tmp_path / "c" / index_dir_name("m", "v1"))
    m = json.loads((path / "manifest.json").read_text())
    assert m["model"]["version"] == "v1" and m["count"] == 200 and m["seq"] == 200 and m["format"] == 2
    assert set(m["features"]) == {"penultimate", "last_but_two"} and m["default_feature"] == "penultimate"
    assert m["features"]["penultimate"]["kind"] == "flat" and m["features"]["penultimate"]["dim"] == 8
    back = IndexStore.load(path)
    assert back.ids == s.ids and np.array_equal(back.probs, s.probs) and back.labels[3] == ["a"]
    q = back.features["penultimate"][:2]
    assert back.similar(q, 3)[0][0][0] == 0
    assert back.similar(q, 3, exclude=[0, 1])[0][0][0] != 0
    assert back.similar(back.features["last_but_two"][:1], 1, feature="last_but_two")[0][0][0] == 0
    with pytest.raises(ValueError, match="feature: 'nope'"):
        back.similar(q, 3, feature="nope")


def test_overwrite_leaves_no_temp_folders(tmp_path):
    target = tmp_path / "idx"
    make_store(50).save(target)
    make_store(60).save(target)  # overwrite
    assert IndexStore.load(target).manifest.count == 60
    assert sorted(os.listdir(tmp_path)) == ["idx"]  # no temp or old folders left behind


def test_changes_go_to_the_delta_and_survive_a_reload(tmp_path):
    path = make_store(100).save(tmp_path / "i")
    s = IndexStore.load(path)
    far = clustered(2, 8, seed=5) * 10
    assert s.apply([add(101, "new-a", far[0]), add(102, "new-b", far[1]), IndexChange(103, "delete", "i5")]) == 3
    assert s.apply([add(101, "new-a", far[0])]) == 0  # already applied: skipped (a catch-up may repeat)
    assert len(s) == 101 and s.seq == 103 and "i5" not in s.rows
    assert s.similar(far[:1], 1)[0][0][0] == s.rows["new-a"]
    assert all(s.ids[r] != "i5" for r, _ in s.similar(s.features["penultimate"][5][None, :], 100)[0])
    assert (path / "delta.jsonl").is_file() and json.loads((path / "manifest.json").read_text())["seq"] == 100
    back = IndexStore.load(path)  # the base plus the delta: the same answers
    assert back.seq == 103 and len(back) == 101 and back.labels[back.rows["new-b"]] == ["b"]
    assert back.similar(far[1:], 1)[0][0][0] == back.rows["new-b"]
    # A re-added id after a delete is a new row; the old one stays filtered out.
    back.apply([IndexChange(104, "delete", "new-a"), add(105, "new-a", far[0] * -1)])
    assert len(back) == 101 and back.similar(far[:1] * -1, 1)[0][0][0] == back.rows["new-a"]


@pytest.mark.parametrize("bad", [
    {"last_but_two": None},  # a feature missing
    {"last_but_two": np.zeros(5, np.float32)},  # a feature of another size
    {"probs": None}, {"probs": np.full(4, 0.5, np.float32)},
])
def test_a_bad_add_is_refused_before_anything_is_written(tmp_path, bad):
    """Found on review: only the probabilities' shape was checked before the batch went to the delta, so an
    add lacking a feature (or with one of another size) was written and synced, then failed in memory: every
    later load of the index, the writer's and every reader's, failed on it.  The whole batch is refused now,
    before a byte is written, and the index stays as it was."""
    path = make_store(10).save(tmp_path / "i")
    s = IndexStore.load(path)
    good = add(11, "ok", np.ones(8))
    feats = {k: v for k, v in {**good.features, **{k: v for k, v in bad.items() if k != "probs"}}.items()
             if v is not None}
    worse = IndexChange(12, "add", "bad", ["b"], bad.get("probs", good.probs), feats)
    with pytest.raises(ValueError, match=r"^index: item bad has "):
        s.apply([good, worse])
    assert not (path / "delta.jsonl").exists() and s.seq == 10 and len(s) == 10 and "ok" not in s.rows
    assert {len(s.probs), *(len(x) for x in s.features.values()), len(s.ids)} == {10}
    assert s.apply([good]) == 1 and len(IndexStore.load(path)) == 11


def test_an_add_and_its_delete_in_one_batch_stay_deleted_after_a_reload(tmp_path):
    path = make_store(100).save(tmp_path / "i")
    s = IndexStore.load(path)
    far = clustered(2, 8, seed=6) * 10
    # Applied one at a time (as the service does), then replayed from the delta in one batch on load.
    for c in (add(101, "tmp-a", far[0]), add(102, "keep-b", far[1]), IndexChange(103, "delete", "tmp-a")):
        s.apply([c])
    s.apply([add(104, "tmp-c", far[0]), IndexChange(105, "delete", "tmp-c")])  # one batch
    for idx in (s, IndexStore.load(path)):
        assert len(idx) == 101 and "tmp-a" not in idx.rows and "tmp-c" not in idx.rows, idx.rows.keys() - s.rows.keys()
        assert all(idx.ids[r] not in ("tmp-a", "tmp-c") for r, _ in idx.similar(far[:1], 101)[0])
        assert idx.similar(far[1:], 1)[0][0][0] == idx.rows["keep-b"]


def test_a_batch_cut_short_anywhere_is_replayed_whole_or_not_at_all_and_cut_from_the_file(tmp_path):
    """A crash can stop a batch's write at any byte (a SIGKILL ends a write() part way): every cut
    inside the second batch loads the first batch alone; the writer's load cuts the torn bytes off, so
    its next batch is read back (appended after them, every later load would stop at them)."""
    path = make_store(20).save(tmp_path / "i")
    far = clustered(4, 8, seed=7) * 10
    s = IndexStore.load(path)
    s.apply([add(21, "x", far[0])])
    whole = (path / "delta.jsonl").read_bytes()
    s.apply([add(22, "y", far[1]), IndexChange(23, "delete", "i3"), add(24, "z", far[2])])
    full = (path / "delta.jsonl").read_bytes()
    assert full.count(b"\n") == 4 and full.count(b'"more": true') == 2
    cuts = sorted({*range(len(whole), len(full), 23), *(i + 1 for i, b in enumerate(full) if b == ord("\n")),
                   len(full) - 1})
    for cut in cuts:
        (path / "delta.jsonl").write_bytes(full[:cut])
        reader = IndexStore.load(path, recover=False)  # a reader leaves the file as it is
        assert (path / "delta.jsonl").stat().st_size == cut
        back = IndexStore.load(path)
        got = (back.seq, len(back), sorted(r for r in back.rows if not r.startswith("i")), "i3" in back.rows)
        assert got == ((24, 22, ["x", "y", "z"], False) if cut == len(full) else (21, 21, ["x"], True)), (cut, got)
        assert reader.seq == back.seq
        assert (path / "delta.jsonl").read_bytes() == (full if cut == len(full) else whole), cut
        back.apply([add(22, "y2", far[3])])  # the catalogue's catch-up, after the last whole batch
        again = IndexStore.load(path)
        assert again.seq == (24 if cut == len(full) else 22) and ("y2" in again.rows) == (cut < len(full)), cut


def test_a_batch_whose_write_fails_is_cut_from_the_delta_and_not_applied(tmp_path, monkeypatch):
    """A full disk part way through a batch: the error reaches the caller, the file is as before, and
    the next batch is read back.  (os.write is replaced to fail half way: the test is about its caller.)"""
    import errno

    from deepindex.index import store as st

    path = make_store(20).save(tmp_path / "i")
    far = clustered(3, 8, seed=9) * 10
    s = IndexStore.load(path)
    s.apply([add(21, "x", far[0])])
    before = (path / "delta.jsonl").read_bytes()
    real_write, calls = os.write, []

    def half_then_full(fd, data):  # the first write takes half the batch, the second finds the disk full
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st.os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        s.apply([add(22, "y", far[1]), add(23, "z", far[2])])
    monkeypatch.undo()
    assert (path / "delta.jsonl").read_bytes() == before
    assert s.seq == 21 and "y" not in s.rows  # nothing of it applied in memory either
    s.apply([add(22, "y", far[1]), add(23, "z", far[2])])
    back = IndexStore.load(path)
    assert back.seq == 23 and {"x", "y", "z"} <= set(back.rows)


def test_compaction_folds_the_delta_into_a_new_base(tmp_path, monkeypatch):
    from deepindex.index import store as st

    monkeypatch.setattr(st, "COMPACT_MIN", 5)
    path = make_store(10).save(tmp_path / "i")
    s = IndexStore.load(path)
    s.apply([add(11 + j, f"n{j}", clustered(1, 8, seed=20 + j)[0]) for j in range(5)]
            + [IndexChange(16, "delete", "i0")])
    assert s.compact()
    assert not (path / "delta.jsonl").exists()
    m = json.loads((path / "manifest.json").read_text())
    assert m["seq"] == 16 and m["count"] == 14
    back = IndexStore.load(path)
    assert len(back) == 14 and "i0" not in back.rows and back.rows["n4"] == 13
    assert sorted(os.listdir(tmp_path)) == ["i"]


def test_version_lookup_and_refusal(tmp_path):
    coll = tmp_path / "coll"
    make_store(version="v1").save(coll / index_dir_name("m", "v1"))
    make_store(version="v2").save(coll / index_dir_name("m", "v2"))
    assert find_index(coll, "m", "v2").name == "m-v2"
    assert find_index(coll, "m", "v3") is None
    direct = find_index(coll / "m-v1", "m", "v2")  # an index folder given directly is returned as is...
    with pytest.raises(IndexMismatch):
        IndexStore.load(direct).manifest.check_model("m", "v2")  # ...and refused for another version


# ---- keywords ---------------------------------------------------------------------------------
def test_vocabulary_parse(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text('concepts:\n  "3": [three, trois]\n  "7": [seven, "lucky number"]\n  "x": [unknown]\n'
                 "stopwords: [and, with]\n")
    v = Vocabulary.from_file(f, [str(i) for i in range(10)])
    p = v.parse("Three AND lucky  number, 9 with banana three")
    assert p.concepts == ["3", "7", "9"]
    assert p.matched == {"three": "3", "lucky number": "7", "9": "9"}
    assert p.unmatched == ["banana"]
    assert v.parse("unknown").unmatched == ["unknown"]  # a concept the model lacks matches nothing
    assert v.parse("   ").concepts == []


def test_scores_all_any():
    p = np.array([[0.9, 0.8], [0.9, 0.1], [0.2, 0.2]], np.float32)
    np.testing.assert_allclose(scores(p, [0, 1], "all"), [0.72, 0.09, 0.04], rtol=1e-5)
    np.testing.assert_allclose(scores(p, [0, 1], "any"), [0.98, 0.91, 0.36], rtol=1e-5)
    rows, s = rank(p, [0, 1], 2)
    assert rows.tolist() == [0, 1] and s[0] >= s[1]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 5), st.integers(1, 50), st.integers(0, 1000))
def test_rank_properties(n, q, k, seed):
    p = np.random.default_rng(seed).random((n, 6)).astype(np.float32)
    idx = list(range(q))
    rows, s = rank(p, idx, k, "all")
    assert len(rows) == min(n, k) and (np.diff(s) <= 1e-12).all()
    assert (s <= p[rows][:, idx].min(axis=1) + 1e-6).all()  # all present: never above the weakest
    full = scores(p, idx, "all")
    assert s[0] == pytest.approx(full.max())


# ---- metrics ----------------------------------------------------------------------------------
def test_precision_and_map():
    rel = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    assert precision_at_k(rel, 2) == pytest.approx((0.5 + 0 + 1) / 3)
    ap = average_precision_at_k(rel, 4)
    np.testing.assert_allclose(ap, [(1 + 2 / 3) / 2, 0, 1])
    assert map_at_k(rel, 4) == pytest.approx(ap.mean())
    # Normalised by the relevant items in the collection: missing ones cost.
    assert average_precision_at_k(rel[:1], 4, np.array([4]))[0] == pytest.approx((1 + 2 / 3) / 4)
    q = np.array([[1, 0, 0]])
    res = np.array([[[1, 1, 0], [0, 1, 1], [0, 0, 1]]])
    assert relevance(q, res).tolist() == [[True, False, False]]
    with pytest.raises(ValueError):
        precision_at_k(rel, 5)


def test_ndcg_grades_by_the_concepts_shared_where_every_item_is_relevant():
    """Items that all share a concept with the query (a colour and a shape in every photo): precision and
    mAP are 1 in any order, nDCG ranks the item with the query's very concepts first."""
    from deepindex.index.evaluate import jaccard_gains, qbe_chance, qbe_quality
    from deepindex.index.metrics import jaccard, ndcg_at_k

    labels = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1], [1, 0, 0]], bool)  # item 0 queries; 1 is its twin
    g = jaccard(labels[:1], labels[[1, 2, 3]][None])  # shared / either: 2/2, 1/3, 1/2
    np.testing.assert_allclose(g, [[1.0, 1 / 3, 1 / 2]])
    ideal, mean = jaccard_gains(labels, np.array([0]), 3)
    np.testing.assert_allclose(ideal, [[1.0, 1 / 2, 1 / 3]])
    assert mean[0] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert ndcg_at_k(ideal, ideal, 3) == pytest.approx(1.0)
    worst = np.array([[1 / 3, 1 / 2, 1.0]])
    expected = (1 / 3 + 0.5 / np.log2(3) + 1 / np.log2(4)) / (1 + 0.5 / np.log2(3) + (1 / 3) / np.log2(4))
    assert ndcg_at_k(worst, ideal, 3) == pytest.approx(expected)
    # Leave-one-out over the four: a descriptor that is the labels finds each twin first; a reversed one does not.
    good = qbe_quality(labels.astype(np.float32), labels, "l2", k=2)
    bad = qbe_quality(-labels.astype(np.float32) * np.arange(1, 4), labels, "ip", k=2)
    assert good["precision_at_2"] == bad["precision_at_2"] == 1.0  # every item is relevant to every query
    assert good["ndcg_at_2"] > bad["ndcg_at_2"] and good["ndcg_at_2"] == pytest.approx(1.0)
    chance = qbe_chance(labels, k=2)
    assert chance["precision_at_2"] == 1.0 and bad["ndcg_at_2"] < 1.0 and 0 < chance["ndcg_at_2"] < 1.0


def test_an_item_whose_tags_no_other_item_carries_is_not_a_query():
    """Found on review: such an item counted as a query whose AP and precision were 0 whatever the ranking, so
    a perfect descriptor scored mAP 0.8 beside nDCG 1.0.  It is no query (nothing to find), in the chance
    figures too."""
    from deepindex.index.evaluate import qbe_chance, qbe_quality, qbe_queries

    labels = np.zeros((5, 3), bool)
    labels[[0, 1], 0] = labels[[2, 3], 1] = labels[4, 2] = True  # item 4's concept is its own
    assert qbe_queries(labels).tolist() == [0, 1, 2, 3]
    perfect = qbe_quality(labels.astype(np.float32), labels, "l2", k=1)
    assert perfect == {"precision_at_1": 1.0, "map_at_1": 1.0, "ndcg_at_1": 1.0}
    assert qbe_chance(labels, k=1)["precision_at_1"] == pytest.approx(1 / 4)


def test_a_search_names_its_items_before_a_compaction_can_renumber_the_rows(tmp_path, monkeypatch):
    """Found on review: the service turned a search's rows into ids after the query let go of the read lock;
    a compaction in between (another request's add) renumbers the rows, and the answer named other items
    with these scores.  The query reads the ids and labels while the rows still mean them."""
    import serving.reads as reads
    from deepindex.index import store as st

    monkeypatch.setattr(st, "COMPACT_MIN", 1)
    monkeypatch.setattr(st, "COMPACT_FRACTION", 0)
    s = IndexStore.load(make_store(20).save(tmp_path / "i"))
    s.apply([IndexChange(21, "delete", "i0"), IndexChange(22, "delete", "i1")])
    spec = {"k": 3, "key": "k", "cursor": None, "concepts": None, "mode": "all", "vector": None, "item": "i15",
            "feature": None, "metric": None, "min_prob": {}, "fusion": "weighted", "weights": {}}
    alone = [h["id"] for h in reads.search(s, spec)["results"]]
    real = reads.run

    def then_compact(index, q):  # another thread's add -> catch-up -> compaction, right after the query
        res = real(index, q)
        assert index.compact()
        assert [index.ids[r] for r, _ in res.hits] != alone  # the rows now mean other items
        return res

    monkeypatch.setattr(reads, "run", then_compact)
    assert [h["id"] for h in reads.search(s, spec)["results"]] == alone


def test_a_reader_sees_every_compaction_even_when_the_new_files_take_the_old_inode_numbers(tmp_path):
    """Found on review: a reader told "same base, same delta" by comparing inode numbers, and on ext4 a
    compaction's new files took the numbers of the old folder's just-deleted ones, nearly every time: the
    reader then applied the new delta from the old one's offset (a deleted item stayed, adds were missed).
    A reader holds the files it read open, so their numbers cannot be reused while it compares them."""
    from deepindex.index.store import IndexRewritten

    path = make_store(50).save(tmp_path / "i")
    far = clustered(400, 8, seed=8) * 10
    w = IndexStore.load(path)
    seq = 50
    for rnd in range(8):
        # A reader of a base with a one-line delta; the writer deletes, compacts, adds three.
        w.save(path)
        seq += 1
        w.apply([add(seq, f"a{seq}", far[seq % 400])])
        r = IndexStore.load(path, recover=False)
        seq += 1
        w.apply([IndexChange(seq, "delete", f"a{seq - 1}")])
        w.save(path)
        for _ in range(3):
            seq += 1
            w.apply([add(seq, f"a{seq}", far[seq % 400])])
        with pytest.raises(IndexRewritten):
            r.follow()
        # A reader of a base with no delta; two compactions, then an add.
        w.save(path)
        r = IndexStore.load(path, recover=False)
        seq += 1
        w.apply([IndexChange(seq, "delete", f"i{rnd}")])
        w.save(path)
        seq += 1
        w.apply([add(seq, f"a{seq}", far[seq % 400])])
        w.save(path)
        seq += 1
        w.apply([add(seq, f"a{seq}", far[seq % 400])])
        with pytest.raises(IndexRewritten):
            r.follow()
        assert IndexStore.load(path, recover=False).rows.keys() == w.rows.keys()


def test_queries_go_on_while_a_compaction_builds_the_new_base(tmp_path, monkeypatch):
    """A compaction built the new base's vector indexes and wrote its folder under the queries' lock: every
    search of a 20k-item index waited ~3 s (found on review).  Now only the swap of references is under it:
    a search runs while the build is held, deterministically, on an event."""
    import threading

    from deepindex.index import store as store_module
    from deepindex.index.vectors import VectorIndex

    path = make_store(100).save(tmp_path / "ix")
    index = IndexStore.load(path)
    index.apply([IndexChange(101, "delete", "i3")])
    monkeypatch.setattr(store_module, "COMPACT_MIN", 1)
    monkeypatch.setattr(store_module, "COMPACT_FRACTION", 0.0)
    building, release = threading.Event(), threading.Event()
    real_build = VectorIndex.build

    def held_build(x, cfg):
        building.set()
        release.wait(30)
        return real_build(x, cfg)

    monkeypatch.setattr(VectorIndex, "build", staticmethod(held_build))
    compaction = threading.Thread(target=index.compact)
    compaction.start()
    try:
        assert building.wait(30)  # the compaction is inside its build now
        answered: list[object] = []
        query = threading.Thread(target=lambda: answered.append(index.similar(index.features["penultimate"][:1], 3)))
        query.start()
        query.join(10)
        assert answered, "a search waited for the compaction's build"
    finally:
        release.set()
        compaction.join(30)
    assert index.delta_count == 0 and "i3" not in index.rows and len(index) == 99
