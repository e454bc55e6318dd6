"""A reader's copy of an index follows its writer through the delta (IndexStore.follow), and the
ingress's local reads (serving/reads.py) answer only while that copy is the writer's own and current."""
from __future__ import annotations

import json

import numpy as np
import pytest

from deepindex.index.store import DELTA, DeltaUnreadable, IndexChange, IndexRewritten, IndexStore, index_dir_name
from index.test_index_units import add, clustered, make_store
from serving.reads import SERVING_FILE, WRITER_FILE, LocalReads, search
from support import wait_until

pytestmark = pytest.mark.timeout(60)


def _same(a: IndexStore, b: IndexStore) -> None:
    assert a.seq == b.seq and len(a) == len(b)
    assert {a.ids[r] for r in a.live_rows()} == {b.ids[r] for r in b.live_rows()}
    for q in (a.features["penultimate"][:3], clustered(3, 8, seed=11) * 10):
        assert [[a.ids[r] for r, _ in hits] for hits in a.similar(q, 10)] == \
            [[b.ids[r] for r, _ in hits] for hits in b.similar(q, 10)]


def test_a_reader_follows_adds_deletes_and_a_line_being_written(tmp_path):
    path = make_store(100).save(tmp_path / "i")
    writer = IndexStore.load(path)
    reader = IndexStore.load(path, recover=False)
    assert reader.follow() == 0
    far = clustered(3, 8, seed=5) * 10
    writer.apply([add(101, "new-a", far[0]), IndexChange(102, "delete", "i5")])
    assert reader.follow() == 2 and "new-a" in reader.rows and "i5" not in reader.rows
    _same(reader, writer)
    # The writer is half-way through its next line: nothing of it is read until it is whole.
    line = add(103, "new-b", far[1]).to_json() + "\n"
    with open(path / DELTA, "a") as fh:
        fh.write(line[:40])
    assert reader.follow() == 0 and "new-b" not in reader.rows
    with open(path / DELTA, "a") as fh:
        fh.write(line[40:])
    assert reader.follow() == 1 and reader.seq == 103
    assert reader.similar(far[1:2], 1)[0][0][0] == reader.rows["new-b"]
    writer.apply([add(104, "new-c", far[2])])  # the writer's own copy is behind its file now: load it again
    reader.follow()
    _same(reader, IndexStore.load(path))


def test_a_batch_is_read_whole_and_a_torn_one_gives_way_to_the_writers_next(tmp_path):
    path = make_store(20).save(tmp_path / "i")
    writer = IndexStore.load(path)
    reader = IndexStore.load(path, recover=False)
    far = clustered(3, 8, seed=7) * 10
    # A writer killed part way through a batch: two of its three lines are whole, the last is torn.
    batch = [add(21, "lost-a", far[0]), add(22, "lost-b", far[1]), IndexChange(23, "delete", "i4")]
    lines = [c.to_json(more=i < 2) + "\n" for i, c in enumerate(batch)]
    with open(path / DELTA, "a") as fh:
        fh.write(lines[0] + lines[1] + lines[2][:20])
    assert reader.follow() == 0 and "lost-a" not in reader.rows  # nothing of a batch until it is whole
    writer = IndexStore.load(path)  # its successor: the torn batch is cut from the file
    assert writer.seq == 20 and "lost-a" not in writer.rows
    writer.apply(batch)  # the catalogue's catch-up
    assert reader.follow() == 3 and reader.seq == 23 and "i4" not in reader.rows
    _same(reader, writer)
    _same(reader, IndexStore.load(path, recover=False))


def test_an_unreadable_whole_line_stops_the_reader(tmp_path):
    path = make_store(20).save(tmp_path / "i")
    reader = IndexStore.load(path, recover=False)
    far = clustered(2, 8, seed=7) * 10
    with open(path / DELTA, "a") as fh:
        fh.write('{"seq": 21, "op"\n' + add(22, "next", far[1]).to_json() + "\n")
    with pytest.raises(DeltaUnreadable):
        reader.follow()
    assert "next" not in reader.rows  # nothing past the bad line was applied halfway


@pytest.mark.parametrize("delta_before", [True, False])
def test_a_reader_knows_when_a_compaction_rewrote_the_folder(tmp_path, delta_before):
    """Whether the reader's copy was read with a delta or without one, and whether the new base has a
    delta yet or not: its next follow() says the folder holds another base (it loads that one)."""
    path = make_store(50).save(tmp_path / "i")
    writer = IndexStore.load(path)
    far = clustered(4, 8, seed=8) * 10
    if delta_before:
        writer.apply([add(51, "a", far[0])])
    reader = IndexStore.load(path, recover=False)
    reader.follow()
    writer.apply([add(52, "b", far[1])])
    writer.save(path)  # what compact() does
    with pytest.raises(IndexRewritten):
        reader.follow()
    writer.apply([add(53, "c", far[2])])  # the new base's own delta
    with pytest.raises(IndexRewritten):
        reader.follow()
    fresh = IndexStore.load(path, recover=False)
    assert fresh.follow() == 0
    _same(fresh, writer)


def _collection(tmp_path, nonce="n1", version="v1"):
    """A collection's index folder as the index replica leaves it: its nonce, the served version and
    that version's index."""
    folder = tmp_path / "coll"
    path = make_store(100, version=version).save(folder / index_dir_name("m", version))
    (folder / WRITER_FILE).write_text(json.dumps({"nonce": nonce}))
    (folder / SERVING_FILE).write_text(json.dumps({"name": "m", "version": version, "ref": "x"}))
    return folder, path


def _spec(item: str) -> dict:
    return {"k": 5, "key": "k", "cursor": None, "concepts": None, "mode": "all", "vector": None, "item": item,
            "feature": None, "metric": None, "min_prob": {}, "fusion": "weighted", "weights": {}}


def _answered(reads: LocalReads, version: str, spec: dict) -> dict:
    """The local answer, once the copy the first call starts loading in the background is loaded."""
    return wait_until(lambda: reads.search(version, spec), 20, every=0.02, what="the local copy of the index")


def test_local_reads_see_every_acknowledged_write_at_once(tmp_path):
    folder, path = _collection(tmp_path)
    writer = IndexStore.load(path)
    reads = LocalReads(ttl_s=30)
    assert reads.search("v1", _spec("i3")) is None  # the writer has not confirmed the folder yet
    reads.confirm({"nonce": "n1", "dir": str(folder)})
    res = _answered(reads, "v1", _spec("i3"))
    assert res == search(writer, _spec("i3"))  # the same answer the index replica gives
    far = clustered(1, 8, seed=3) * 10
    q = {**_spec("i3"), "item": None, "vector": far[0]}
    writer.apply([add(101, "fresh", far[0]), IndexChange(102, "delete", "i3")])  # acknowledged
    assert reads.search("v1", q)["results"][0]["id"] == "fresh"  # the very next search sees it
    assert reads.search("v1", _spec("i3"))["error"]["code"] == "unknown_item"
    assert reads.search("v1", q)["index"] == {"collection": "c", "model_version": "v1", "seq": 102, "count": 100}


def test_local_reads_step_aside_for_another_writer_version_or_base(tmp_path):
    folder, path = _collection(tmp_path)
    writer = IndexStore.load(path)
    reads = LocalReads(ttl_s=30)
    reads.confirm({"nonce": "n1", "dir": str(folder)})
    _answered(reads, "v1", _spec("i1"))
    assert reads.search("v2", _spec("i1")) is None  # not the served version: the index replica answers
    # A writer this folder is not the writer's (another node's disk, or a writer restarted elsewhere).
    reads.confirm({"nonce": "other", "dir": str(folder)})
    assert reads.search("v1", _spec("i1")) is None
    reads.confirm(None)  # the writer could not be asked
    assert reads.search("v1", _spec("i1")) is None
    reads.confirm({"nonce": "n1", "dir": str(folder)})
    assert reads.search("v1", _spec("i1")) is not None
    # A compaction swaps the folder: the old copy is dropped, a new one loads with the same answers.
    far = clustered(1, 8, seed=4) * 10
    writer.apply([add(101, "after", far[0]), IndexChange(102, "delete", "i1")])
    writer.save(path)
    q = {**_spec("i2"), "item": None, "vector": far[0]}
    res = _answered(reads, "v1", q)
    assert res["results"][0]["id"] == "after" and res["index"]["seq"] == 102
    assert res == search(writer, q)
    # The writer serves another version now (serving.json): the old copy answers nothing.
    (folder / SERVING_FILE).write_text(json.dumps({"name": "m", "version": "v2", "ref": "x"}))
    assert reads.search("v1", q) is None


def test_confirmation_lapses_without_the_writer(tmp_path):
    folder, _ = _collection(tmp_path)
    now = [0.0]
    reads = LocalReads(ttl_s=0.2, clock=lambda: now[0])  # time moves only when the test says
    assert reads.due() and not reads.confirmed()  # the first search waits for the writer's word
    reads.confirm({"nonce": "n1", "dir": str(folder)})
    _answered(reads, "v1", _spec("i1"))
    assert not reads.due() and reads.confirmed()  # confirmed just now
    now[0] += 0.15
    assert reads.due() and reads.confirmed()  # asked again half-way (in the background): searches go on here
    _answered(reads, "v1", _spec("i1"))
    now[0] += 0.1
    assert reads.search("v1", _spec("i1")) is None  # not confirmed within ttl_s: the index replica answers
    assert not reads.confirmed()
    reads.confirm({"nonce": "n1", "dir": str(folder)})
    now[0] += 0.25
    assert reads.due() and not reads.due()  # one caller asks the writer, the others do not wait for it
    reads.confirm({"nonce": "n1", "dir": str(folder)})
    assert reads.search("v1", _spec("i1")) is not None
    assert np.isfinite(reads.search("v1", _spec("i1"))["results"][0]["score"])
