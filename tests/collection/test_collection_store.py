"""The collection store's contract, on SQLite and on PostgreSQL: adds are idempotent by (id, bytes),
deletes are tombstones with their own seq, and a snapshot at n plus the changes after n is the
collection at any later head."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from deepindex.collection import Change, CollectionStore, DuplicateItem, Item, UnknownItem, list_collections


def _open(catalogue_url: str, tmp_path: Path, name: str = "photos") -> CollectionStore:
    return CollectionStore.open(name, catalogue_url=catalogue_url, blobs_url=str(tmp_path / "blobs"))


def test_add_get_image_and_idempotent_repost(catalogue_url: str, tmp_path: Path) -> None:
    s = _open(catalogue_url, tmp_path)
    assert (s.head(), s.count(), s.tags(), list(s.snapshot())) == (0, 0, [], [])
    item, created = s.add("cat.jpg", b"\x89PNG meow", tags=["cat", "pet", "cat"], source="upload",
                          meta={"width": 4, "split": "train"})
    assert created and item.seq == 1 and item.tags == ["cat", "pet"] and item.deleted_seq is None
    assert item.content_hash == hashlib.sha256(b"\x89PNG meow").hexdigest()
    assert (item.collection, item.source, item.size) == ("photos", "upload", 9)
    assert item.meta == {"width": 4, "split": "train"}
    assert s.get("cat.jpg") == item and s.image("cat.jpg") == b"\x89PNG meow"
    assert s.image_by_hash(item.content_hash) == b"\x89PNG meow"

    again, created = s.add("cat.jpg", b"\x89PNG meow", tags=["other"])  # a re-post: nothing changes
    assert not created and again == item and s.head() == 1
    with pytest.raises(DuplicateItem, match=r"id: 'cat\.jpg' already exists"):
        s.add("cat.jpg", b"other bytes")
    assert s.head() == 1 and s.count() == 1

    # Two ids may share bytes (one blob); another collection of the catalogue is separate.
    twin, created = s.add("cat-copy.jpg", b"\x89PNG meow")
    assert created and twin.seq == 2 and twin.content_hash == item.content_hash
    other = _open(catalogue_url, tmp_path, "other")
    assert other.get("cat.jpg") is None and other.head() == 0
    assert other.add("cat.jpg", b"different")[1]
    assert [c["name"] for c in list_collections(catalogue_url)] == ["other", "photos"]


def test_delete_is_a_tombstone_and_an_id_can_come_back(catalogue_url: str, tmp_path: Path) -> None:
    s = _open(catalogue_url, tmp_path)
    a, _ = s.add("a", b"A1", tags=["x"])
    s.add("b", b"B", tags=["y"])
    gone = s.delete("a")
    assert gone.deleted_seq == 3 and gone.seq == a.seq and s.head() == 3
    assert s.get("a") is None and s.get("a", include_deleted=True) == gone
    assert s.count() == 1 and s.tags() == ["y"]
    with pytest.raises(UnknownItem, match="no item 'a'"):
        s.image("a")
    with pytest.raises(UnknownItem):
        s.delete("a")
    with pytest.raises(UnknownItem):
        s.delete("never")
    back, created = s.add("a", b"A2", tags=["z"])  # other bytes are fine once the old one is deleted
    assert created and back.seq == 4 and s.image("a") == b"A2" and s.tags() == ["y", "z"]
    assert s.get("a", include_deleted=True) == back
    assert [(c.seq, c.op, c.item.id) for c in s.changes(0)] == [(1, "add", "a"), (2, "add", "b"), (3, "delete", "a"),
                                                               (4, "add", "a")]
    assert s.changes(0)[0].item.deleted_seq is None and s.changes(0)[2].item.deleted_seq == 3
    info = s.info()
    assert (info["count"], info["deleted"], info["head"], info["tags"], info["bytes"]) == (2, 1, 4, 2, 3)


def test_snapshot_plus_changes_is_the_later_collection(catalogue_url: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """What an index does: build from snapshot(n), catch up with changes(n, m): the result must be
    snapshot(m), for every n <= m, over a random history of adds, re-adds and deletes."""
    import deepindex.collection.store as store_mod

    monkeypatch.setattr(store_mod, "PAGE", 7)  # several pages per snapshot
    s = _open(catalogue_url, tmp_path)
    rng = random.Random(0)
    live: set[str] = set()
    for step in range(90):
        if live and rng.random() < 0.3:
            victim = rng.choice(sorted(live))
            s.delete(victim)
            live.discard(victim)
        else:
            i = f"i{rng.randrange(60)}"
            try:
                s.add(i, f"{i}-{step}".encode(), tags=[f"t{rng.randrange(5)}"])
                live.add(i)
            except DuplicateItem:
                pass
    head = s.head()
    assert {it.id for it in s.snapshot()} == live and s.count() == len(live)
    states = {n: {it.id: it for it in s.snapshot(n)} for n in range(0, head + 1, 8)}
    for n, at_n in states.items():
        seqs = [it.seq for it in s.snapshot(n)]
        assert seqs == sorted(seqs) and all(it.deleted_seq is None for it in at_n.values())
        for m in (k for k in states if k >= n):
            cur = dict(at_n)
            for ch in s.changes(n, m):
                assert n < ch.seq <= m
                if ch.op == "add":
                    assert ch.item.id not in cur
                    cur[ch.item.id] = ch.item
                else:
                    assert cur.pop(ch.item.id).seq == ch.item.seq
            assert cur == states[m], (n, m)
    # Paging through the changes with a limit gives the same list.
    paged: list[Change] = []
    while page := s.changes(paged[-1].seq if paged else 0, limit=9):
        assert len(page) <= 9
        paged += page
    assert paged == s.changes(0) and [c.seq for c in paged] == list(range(1, head + 1))


def test_snapshot_is_streamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot reads a page at a time: the first item comes before the last page is read, and
    items added after the snapshot began are not in it."""
    import deepindex.collection.store as store_mod

    monkeypatch.setattr(store_mod, "PAGE", 10)
    s = CollectionStore.open("big", blobs_url=str(tmp_path / "blobs"))
    s.add_many(((f"x{i:03d}", f"{i}".encode(), [], {}) for i in range(35)), source="test")
    it = s.snapshot()
    first = next(it)
    s.add("late", b"late")  # after the snapshot's head: not in it
    rest = list(it)
    assert first.id == "x000" and [x.id for x in rest] == [f"x{i:03d}" for i in range(1, 35)]
    # Parallel readers split one snapshot by seq range.
    s.delete("x020")
    head = s.head()
    parts = [list(s.snapshot(head, seq_range=r)) for r in ((0, 12), (12, 30), (30, head + 5))]
    assert [x.id for p in parts for x in p] == [f"x{i:03d}" for i in range(35) if i != 20] + ["late"]
    assert "x020" in {x.id for x in s.snapshot(35, seq_range=(12, 30))}  # live as of seq 35
    assert set(s.get_many(["x001", "x020", "late", "nope", "x001"])) == {"x001", "late"}


def test_add_many_counts_idempotency_and_conflicts(catalogue_url: str, tmp_path: Path) -> None:
    s = _open(catalogue_url, tmp_path)
    entries = [(f"p{i}", f"bytes{i}".encode(), [f"t{i % 3}"], {"i": i}) for i in range(25)]
    items = s.add_many(entries, source="bulk", batch_size=10)
    assert [it.id for it in items] == [f"p{i}" for i in range(25)] and [it.seq for it in items] == list(range(1, 26))
    assert items[4].meta == {"i": 4} and items[4].tags == ["t1"] and items[4].source == "bulk"
    assert s.add_many(entries, source="bulk", batch_size=10) == items and s.head() == 25  # a re-run adds nothing

    res = s.add_bulk([*entries[:3], ("p99", b"new", [], {}), ("p99", b"new", [], {}),  # the same one twice
                      ("p1", b"changed", [], {}), ("bad id", b"x", [], {}), ("empty", b"", [], {})],
                     source="bulk", batch_size=4)
    assert (res.added, res.existing, res.skipped) == (1, 4, 3), res
    assert any("already exists" in r for r in res.skipped_reasons) and any("'bad id'" in r for r in res.skipped_reasons)
    assert s.image("p1") == b"bytes1" and s.get("p99") is not None and s.head() == 26
    with pytest.raises(DuplicateItem):
        s.add_many([("p2", b"changed", [], {})], source="bulk")
    with pytest.raises(DuplicateItem, match="twice in the batch"):
        s.add_many([("q", b"1", [], {}), ("q", b"2", [], {})], source="bulk")
    assert s.get("q") is None


@pytest.mark.parametrize(("call", "field"), [
    (lambda s: s.add("", b"x"), "id:"),
    (lambda s: s.add("a b", b"x"), "id:"),
    (lambda s: s.add("x" * 201, b"x"), "id:"),
    (lambda s: s.add("a/image", b"x"), "id: 'a/image' ends in /image, which the service's URLs give another "
                                       "item's image"),  # GET /v1/items/a/image is item a's image
    (lambda s: s.add_many([("b/similar", b"x", [], {})], source="bulk"), "id: 'b/similar' ends in /similar"),
    (lambda s: s.add("a/../b", b"x"), "id: 'a/../b' has a '.' or '..' segment"),  # a URL resolves it: b's
    (lambda s: s.add("..", b"x"), "id: '..' has a '.' or '..' segment"),
    (lambda s: s.add("ok", b""), "data:"),
    (lambda s: s.add("ok", "text"), "data:"),
    (lambda s: s.add("ok", b"x", tags="cat"), "tags:"),
    (lambda s: s.add("ok", b"x", tags=[""]), "tags:"),
    (lambda s: s.add("ok", b"x", meta={"v": float("nan")}), "meta:"),
    (lambda s: s.add("ok", b"x", meta={"v": object()}), "meta:"),
    (lambda s: s.changes(0, limit=0), "limit:"),
    (lambda s: s.image_by_hash("abc"), "content_hash:"),
])
def test_bad_input_is_a_one_line_error_naming_the_field(tmp_path: Path, call, field: str) -> None:
    s = CollectionStore.open("photos", blobs_url=str(tmp_path / "blobs"))
    with pytest.raises(ValueError, match=rf"^{field}") as e:
        call(s)
    assert "\n" not in str(e.value)
    assert s.head() == 0


def test_open_defaults_names_and_create_false(tmp_path: Path, _state_home: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    s = CollectionStore.open("photos")
    s.add("a", b"A")
    assert (_state_home / "collections" / "catalogue.db").is_file()
    assert any((_state_home / "collections" / "blobs" / "sha256").rglob(s.get("a").content_hash))  # type: ignore[union-attr]
    assert CollectionStore.open("photos", create=False).count() == 1
    with pytest.raises(ValueError, match=r"^collection: no collection named 'nope'.*known: photos"):
        CollectionStore.open("nope", create=False)
    for bad in ("", "a/b", "-x", "x" * 101):
        with pytest.raises(ValueError, match=r"^collection:"):
            CollectionStore.open(bad)
    # The environment moves both, as on Kubernetes.
    monkeypatch.setenv("DEEPINDEX_CATALOGUE_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    monkeypatch.setenv("DEEPINDEX_BLOBS_URL", str(tmp_path / "elsewhere-blobs"))
    e = CollectionStore.open("photos")
    assert e.count() == 0 and e.info()["catalogue"].endswith("elsewhere.db")
    assert e.info()["blobs"] == str(tmp_path / "elsewhere-blobs")


def test_info_hides_secrets_and_blobs_on_an_fsspec_url(tmp_path: Path) -> None:
    from deepindex.collection.blobs import public_blobs_url
    from deepindex.collection.catalogue import public_url

    assert public_url("postgresql+psycopg://deepindex:s3cret@db:5432/catalogue") == \
        "postgresql+psycopg://deepindex:***@db:5432/catalogue"
    assert public_blobs_url("s3://KEY:SECRET@bucket/prefix?endpoint=x") == "s3://bucket/prefix"
    s = CollectionStore.open("mem", catalogue_url=f"sqlite:///{tmp_path / 'c.db'}", blobs_url="memory://deepindex-test")
    item, _ = s.add("a", b"in memory")
    assert s.image("a") == b"in memory" and s.verify()["ok"]
    assert not (tmp_path / "blobs").exists() and s.info()["blobs"] == "memory://deepindex-test"
    assert isinstance(item, Item)


def test_damaged_or_missing_blob_is_reported_not_served(tmp_path: Path) -> None:
    from deepindex.collection.blobs import CorruptBlob

    s = CollectionStore.open("photos", blobs_url=str(tmp_path / "blobs"))
    a, _ = s.add("a", b"original")
    b, _ = s.add("b", b"second")
    path = next((tmp_path / "blobs").rglob(a.content_hash))
    path.write_bytes(b"ORIGINAL")  # same size, other bytes
    with pytest.raises(CorruptBlob):
        s.image("a")
    next((tmp_path / "blobs").rglob(b.content_hash)).unlink()
    with pytest.raises(FileNotFoundError, match=r"^content_hash: no blob"):
        s.image("b")
    r = s.verify()
    assert not r["ok"] and r["corrupt_blobs"] == ["a"] and r["missing_blobs"] == ["b"]


def test_sweep_removes_only_old_orphans_and_temp_files(tmp_path: Path) -> None:
    import os
    import time

    s = CollectionStore.open("photos", blobs_url=str(tmp_path / "blobs"))
    kept, _ = s.add("a", b"kept")
    orphan = s.blobs.put(b"a killed writer's blob, no row")
    young = s.blobs.put(b"a writer about to commit")
    shard = next((tmp_path / "blobs").rglob(kept.content_hash)).parent
    tmp = shard / f".{kept.content_hash}.123-4.tmp"
    tmp.write_bytes(b"half")
    aside = shard / f".{kept.content_hash}.123-5.sweep"  # what a sweep killed mid-removal left
    aside.write_bytes(b"kept")
    old = time.time() - 7200
    for p in (tmp, aside, *(tmp_path / "blobs").rglob(orphan), *(tmp_path / "blobs").rglob(kept.content_hash)):
        os.utime(p, (old, old))
    assert s.sweep(older_than_s=3600) == {"temp_files": 2, "orphans": 1}
    assert s.image("a") == b"kept" and s.blobs.has(young) and not s.blobs.has(orphan)
    assert not tmp.exists() and not aside.exists()


@pytest.mark.parametrize("many", [False, True])
def test_a_sweep_between_a_reused_blob_and_its_row_keeps_the_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  many: bool) -> None:
    """Found on review: a killed writer's orphan blob is old; a later add of the same bytes found it there and
    left it old, so a sweep (another process's) between that add's blob and its row removed it: the add was
    acknowledged, its bytes gone.  A reused blob is made young again."""
    import os
    import time

    from deepindex.collection import catalogue as cat
    from deepindex.collection import store as cs

    s = CollectionStore.open("photos", blobs_url=str(tmp_path / "blobs"))
    data = b"the same image, sent again"
    orphan = s.blobs.put(data)  # a writer killed after its blob, before its row
    old = time.time() - 7200
    os.utime(next((tmp_path / "blobs").rglob(orphan)), (old, old))
    swept: list[dict[str, int]] = []
    real = cat.write_txn

    def sweep_first(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        swept.append(s.sweep(older_than_s=3600))
        return real(*args, **kwargs)

    monkeypatch.setattr(cs.cat, "write_txn", sweep_first)
    if many:
        s.add_many([("x", data, ["t"], {})], source=None)
    else:
        s.add("x", data)
    monkeypatch.setattr(cs.cat, "write_txn", real)
    assert swept == [{"temp_files": 0, "orphans": 0}]
    assert s.image("x") == data and s.verify()["ok"]


def test_a_blob_reused_between_the_sweeps_look_and_its_removal_is_kept(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Found on review: the sweep read an orphan's age, then removed it.  A writer that reused the blob in
    between (made it young, committed its row) lost an acknowledged add's bytes.  The sweep now moves the
    orphan aside and reads its age again there before removing it."""
    import os
    import time

    s = CollectionStore.open("photos", blobs_url=str(tmp_path / "blobs"))
    data = b"the same image, sent again"
    orphan = s.blobs.put(data)  # a writer killed after its blob, before its row
    old = time.time() - 7200
    os.utime(next((tmp_path / "blobs").rglob(orphan)), (old, old))
    real = Path.stat
    added: list[str] = []

    def stat(self: Path, *args: object, **kwargs: object) -> os.stat_result:
        result = real(self, *args, **kwargs)  # type: ignore[arg-type]
        if self.name == orphan and not added:  # the sweep has seen it old: a writer reuses it now
            added.append("x")
            s.add("x", data)
        return result

    monkeypatch.setattr(Path, "stat", stat)
    swept = s.sweep(older_than_s=3600)
    monkeypatch.setattr(Path, "stat", real)
    assert added == ["x"] and swept == {"temp_files": 0, "orphans": 0}
    assert s.image("x") == data and s.verify()["ok"]
    assert [f.name for f in (tmp_path / "blobs").rglob("*") if f.is_file()] == [orphan]  # nothing left aside


def test_schema_is_portable_to_postgresql() -> None:
    """Everything the store emits compiles for PostgreSQL (runs there too when a server is at hand)."""
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    from deepindex.collection import catalogue as cat

    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    ddl = [str(CreateTable(t).compile(dialect=dialect)) for t in cat.metadata.sorted_tables]
    ddl += [str(CreateIndex(i).compile(dialect=dialect)) for t in cat.metadata.sorted_tables for i in t.indexes]
    text = "\n".join(ddl)
    assert "JSON" in text and "BIGINT" in text and "DOUBLE PRECISION" in text
    assert "CREATE UNIQUE INDEX uq_collection_items_live" in text and "WHERE deleted_seq IS NULL" in text
