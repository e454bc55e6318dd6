"""A collection: a named set of items, the durable source of truth an index is derived from.

An item is a row in the catalogue (:mod:`deepindex.collection.catalogue`) plus its original bytes in
the blob store (:mod:`deepindex.collection.blobs`).  The order of a write is what makes it safe to
kill at any point: the bytes are written and synced first, then the row is committed.  So a row
never names a missing blob, an item is visible only once complete, and what was acknowledged (the
commit returned) survives a crash.  A writer killed between the two leaves a blob no row names
(never read; :meth:`CollectionStore.sweep` removes it).

Every change (an add or a delete) takes the collection's next sequence number; ``head()`` is the
last one.  ``snapshot(upto)`` and ``changes(after, upto)`` are what an index is built and caught up
from: a snapshot at ``n`` plus the changes after ``n`` is the collection at the later head.

A collection records the blob store it was created with, and is opened with it unless another is
named (``blobs_url``, ``DEEPINDEX_BLOBS_URL``).  Another store is read from with a warning but never
written to: a writer given the default folder put new items' bytes there, split from the rest, and a
check or index build of the collection's own store then found them missing (found on review).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, Engine, RowMapping, and_, exc, func, insert, or_, select, update

from deepindex.collection import catalogue as cat
from deepindex.collection.blobs import BlobStore, blobs_location, local_blobs_path, public_blobs_url, sha256_hex
from deepindex.paths import state_dir

log = logging.getLogger(__name__)

ITEM_ID = re.compile(r"[A-Za-z0-9._:@/+-]{1,200}")
# The service's /v1/items/<id>/image and /similar name an item's image and neighbours: a new id may
# not end so (serving/contract.py's NEW_ITEM_ID_PATTERN says the same to HTTP clients).
SUBRESOURCE = re.compile(r"/(image|similar)$")
COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_TAG = 200
MAX_META_BYTES = 64 * 1024
BATCH = 500  # items per transaction in bulk adds
PAGE = 2000  # rows per query when streaming a snapshot

Row = Mapping[Any, Any]  # a catalogue row (a RowMapping, or the dict it was inserted from)


@dataclass(frozen=True)
class Item:
    collection: str
    id: str  # stable, user-given; 1-200 chars [A-Za-z0-9._:@/+-]
    content_hash: str  # sha256 hex of the original bytes
    source: str | None  # "upload", "digit-scenes", "folder:<root>", "manifest:<file>", ...
    tags: list[str]  # known labels (concepts), may be empty
    meta: dict[str, Any]  # free-form JSON (split, width/height, original filename, ...)
    added_at: float  # unix time
    seq: int  # the change that added it
    deleted_seq: int | None = None  # the change that deleted it (a tombstone)
    size: int = 0  # bytes of the original image


@dataclass(frozen=True)
class Change:
    seq: int
    op: Literal["add", "delete"]
    item: Item  # as of this change: an add's item has deleted_seq None, a delete's has it set


class DuplicateItem(ValueError):
    """The id is live with other bytes (the service answers 409)."""


class BlobStoreMismatch(ValueError):
    """A write to a collection opened with another blob store than the one its images are in: its
    bytes would be split across two stores, and readers of the recorded one would miss them."""


class UnknownItem(KeyError):
    """No live item with that id (the service answers 404)."""

    def __str__(self) -> str:  # KeyError quotes its argument; the message reads better without
        return str(self.args[0]) if self.args else ""


@dataclass
class AddResult:
    """What a bulk add did: counts, plus the items (added or already there) in input order."""

    added: int = 0
    existing: int = 0
    skipped: int = 0
    seconds: float = 0.0
    items: list[Item] = field(default_factory=list)
    skipped_reasons: list[str] = field(default_factory=list)  # the first few, "id: why"
    deleted_since: int = 0  # ids whose latest change is a delete, not added again (``deleted="skip"``)
    other_tags: int = 0  # of the ``existing``, items already there (same bytes) with other tags, unchanged
    other_split: int = 0  # of the ``existing``, items already there (same bytes) given another split, unchanged
    retagged: int = 0  # items already there (same bytes) whose tags were changed (``retag=True``)
    resplit: int = 0  # items already there (same bytes) whose split was changed (``retag=True``)


# ---- validation ---------------------------------------------------------------------------------
def check_item_id(item_id: str) -> str:
    if not isinstance(item_id, str) or not ITEM_ID.fullmatch(item_id):
        raise ValueError(f"id: {str(item_id)[:80]!r} must be 1-200 characters of A-Z a-z 0-9 . _ : @ / + -")
    return item_id


def check_new_item_id(item_id: str) -> str:
    """An id for an item to add: :func:`check_item_id`'s rule, and not a URL of another item's."""
    check_item_id(item_id)
    if any(seg in (".", "..") for seg in item_id.split("/")):
        raise ValueError(f"id: {item_id[:80]!r} has a '.' or '..' segment, which a URL resolves away: "
                         f"/v1/items/<id> would name another item; give another id")
    tail = SUBRESOURCE.search(item_id)
    if tail:
        raise ValueError(f"id: {item_id[:80]!r} ends in {tail.group(0)}, which the service's URLs give another "
                         f"item's {tail.group(1)} (/v1/items/<id>{tail.group(0)}): give another id")
    return item_id


def check_name(name: str) -> str:
    if not isinstance(name, str) or not COLLECTION_NAME.fullmatch(name):
        raise ValueError(f"collection: {str(name)[:80]!r} must be 1-100 characters of A-Z a-z 0-9 . _ -, "
                         "starting with a letter or digit")
    return name


def check_tags(tags: Sequence[str]) -> list[str]:
    if isinstance(tags, str):
        raise ValueError("tags: a list of strings, not one string")
    out: list[str] = []
    for t in tags:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"tags: {t!r} is not a non-empty string")
        t = t.strip()
        if len(t) > MAX_TAG:
            raise ValueError(f"tags: {t[:40]!r}... is longer than {MAX_TAG} characters")
        if t not in out:
            out.append(t)
    return out


def check_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
        raise ValueError("meta: must be an object with string keys")
    try:
        text = json.dumps(dict(meta), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta: not JSON-serialisable ({e})") from None
    if len(text) > MAX_META_BYTES:
        raise ValueError(f"meta: {len(text)} bytes of JSON, more than {MAX_META_BYTES}")
    out: dict[str, Any] = json.loads(text)  # a plain copy: what a reader will get back
    return out


def check_data(data: bytes) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data: bytes expected, not {type(data).__name__}")
    if not len(data):
        raise ValueError("data: empty")
    return bytes(data)


def default_blobs_url() -> str:
    return os.environ.get("DEEPINDEX_BLOBS_URL") or str(state_dir() / "collections" / "blobs")


def recorded_blobs_url(url: str) -> str:
    """What a new collection records as its blob store: a local folder's absolute path (a relative one
    named another folder from any other working directory, a Ray worker's or a pod's), a remote URL
    without credentials or query."""
    return blobs_location(url) if local_blobs_path(url) is not None else public_blobs_url(url)


def _relative_path(url: str) -> bool:
    path = local_blobs_path(url)
    return path is not None and not os.path.isabs(path)


# ---- the store ----------------------------------------------------------------------------------
class CollectionStore:
    """One collection of a catalogue.  Thread-safe (one engine, a connection per call); any number
    of processes may open the same collection (writes are serialised by the catalogue)."""

    def __init__(self, name: str, engine: Engine, collection_id: int, blobs: BlobStore, catalogue_url: str,
                 created_at: float, blobs_mismatch: tuple[str, str] | None = None) -> None:
        self.name = name
        self._engine = engine
        self._cid = collection_id
        self.blobs = blobs
        self.catalogue_url = catalogue_url
        self.created_at = created_at
        # (why, the way out) when ``blobs`` is not the store the collection's images are in: writes are refused.
        self.blobs_mismatch = blobs_mismatch

    def __repr__(self) -> str:
        return f"CollectionStore({self.name!r}, {cat.public_url(self.catalogue_url)!r}, {self.blobs!r})"

    @classmethod
    def open(cls, name: str, catalogue_url: str | None = None, blobs_url: str | None = None,
             create: bool = True, writes: bool = False) -> CollectionStore:
        """Default catalogue: ``DEEPINDEX_CATALOGUE_URL``, else ``sqlite:///<state>/collections/catalogue.db``.
        Blobs: ``blobs_url``, else ``DEEPINDEX_BLOBS_URL``, else the store the collection recorded when it
        was created (a new one: ``<state>/collections/blobs``).  ``create=False``: an unknown name is a
        ValueError.

        A blob store given that is not the recorded one (another folder, bucket or prefix) is read from
        with a warning (a copy may be checked or read), but every write is refused
        (:class:`BlobStoreMismatch`): the collection's bytes would be split across two stores, and
        whoever reads the recorded one would miss the new items' bytes.  ``writes=True``: refuse at once,
        for a caller that opens to write (no warning first)."""
        check_name(name)
        url = catalogue_url or cat.default_catalogue_url()
        given = blobs_url or os.environ.get("DEEPINDEX_BLOBS_URL") or None
        eng = cat.engine_for(url)
        row = _find(eng, name)
        if row is None:
            if not create:
                known = ", ".join(c["name"] for c in list_collections(url)) or "none yet"
                raise ValueError(f"collection: no collection named {name!r} in {cat.public_url(url)} (known: {known})")
            burl = given or default_blobs_url()
            try:
                with eng.connect() as conn, conn.execution_options(deepindex_write=True).begin():
                    conn.execute(insert(cat.collections).values(
                        name=name, created_at=time.time(), head=0, live_count=0, blobs_url=recorded_blobs_url(burl),
                        schema_version=cat.SCHEMA_VERSION))
                log.info("collection %s created in %s (blobs: %s)", name, cat.public_url(url), public_blobs_url(burl))
            except exc.IntegrityError:
                pass  # another process created it first
            row = _find(eng, name)
            assert row is not None
        blobs, mismatch = _pick_blobs(name, eng, row, given)
        store = cls(name, eng, int(row["id"]), blobs, url, float(row["created_at"]), mismatch)
        if mismatch is not None:
            if writes:
                store._check_writable("adding")
            log.warning("%s: reads look there, adding (and sweeping) is refused %s", *mismatch)
        return store

    def _check_writable(self, what: str) -> None:
        """:class:`BlobStoreMismatch` (one line, naming both stores) when opened with another blob store."""
        if self.blobs_mismatch is not None:
            why, way_out = self.blobs_mismatch
            raise BlobStoreMismatch(f"{why}: {what} refused, as it would split the collection's images across "
                                    f"two stores {way_out}")

    # ---- rows -> items ---------------------------------------------------------------------------
    def _item(self, r: Row, deleted_seq: int | Literal["row"] | None = "row") -> Item:
        return Item(collection=self.name, id=r["item_id"], content_hash=r["content_hash"], source=r["source"],
                    tags=list(r["tags"]), meta=dict(r["meta"]), added_at=float(r["added_at"]), seq=int(r["seq"]),
                    deleted_seq=(r["deleted_seq"] if deleted_seq == "row" else deleted_seq), size=int(r["size"]))

    def _live(self, conn: Connection, ids: Sequence[str]) -> dict[str, Row]:
        t = cat.items
        out: dict[str, Row] = {}
        for i in range(0, len(ids), 500):  # bounded IN lists
            q = select(t).where(t.c.collection_id == self._cid, t.c.item_id.in_(ids[i:i + 500]),
                                t.c.deleted_seq.is_(None))
            out.update({r["item_id"]: r for r in conn.execute(q).mappings()})
        return out

    # ---- writes -------------------------------------------------------------------------------------
    def add(self, item_id: str, data: bytes, *, tags: Sequence[str] = (), source: str | None = None,
            meta: Mapping[str, Any] | None = None) -> tuple[Item, bool]:
        """Add one item, durably before it returns (bytes written and synced, then the row committed).

        The same id with the same bytes: the existing item, ``created=False`` (an idempotent re-post).
        The same id with other bytes: :class:`DuplicateItem`.  A deleted id may be added again (a new seq).
        """
        self._check_writable("adding")
        check_new_item_id(item_id)
        data = check_data(data)
        tags_l, meta_d = check_tags(tags), check_meta(meta)
        h = sha256_hex(data)
        with self._engine.connect() as conn:
            live = self._live(conn, [item_id]).get(item_id)
        if live is not None:
            return self._same_or_conflict(live, h), False
        self.blobs.put(data, h)  # durable before the row that names it
        for _ in range(3):
            try:
                with cat.write_txn(self._engine, self._cid) as (conn, head):
                    live = self._live(conn, [item_id]).get(item_id)
                    if live is not None:  # another writer added it since the first look
                        return self._same_or_conflict(live, h), False
                    row = self._row(head + 1, item_id, h, len(data), source, tags_l, meta_d)
                    self._insert(conn, [row], head + 1)
                return self._item(row), True
            except exc.IntegrityError:
                # The live-id index refused a concurrent add that the lock should have ordered
                # (only if a writer bypassed it): look again.
                log.warning("collection %s: concurrent add of %s; retrying", self.name, item_id)
        raise RuntimeError(f"collection {self.name}: could not add {item_id} after 3 tries")

    def _same_or_conflict(self, live: Row, h: str) -> Item:
        if live["content_hash"] != h:
            raise DuplicateItem(f"id: {live['item_id']!r} already exists in {self.name} with other bytes "
                                f"(sha256 {live['content_hash'][:12]}..., these are {h[:12]}...)")
        return self._item(live)

    def _row(self, seq: int, item_id: str, h: str, size: int, source: str | None, tags: list[str],
             meta: dict[str, Any]) -> dict[str, Any]:
        return {"collection_id": self._cid, "seq": seq, "item_id": item_id, "content_hash": h, "size": size,
                "source": source, "tags": tags, "meta": meta, "added_at": time.time(), "deleted_seq": None}

    def _insert(self, conn: Connection, rows: list[dict[str, Any]], new_head: int) -> None:
        conn.execute(insert(cat.items), rows)
        tag_rows = [{"collection_id": self._cid, "seq": r["seq"], "tag": t} for r in rows for t in r["tags"]]
        if tag_rows:
            conn.execute(insert(cat.item_tags), tag_rows)
        c = cat.collections
        conn.execute(update(c).where(c.c.id == self._cid).values(head=new_head, live_count=c.c.live_count + len(rows)))

    def add_many(self, items: Iterable[tuple[str, bytes, Sequence[str], Mapping[str, Any]]], *,
                 source: str | None, batch_size: int = BATCH,
                 on_conflict: Literal["error", "skip"] = "error") -> list[Item]:
        """Bulk add, one transaction per batch; the same idempotency rules as :meth:`add`.

        Returns the items in input order (those already there included).  ``on_conflict="skip"``
        skips an id that is live with other bytes, or an invalid one, instead of raising.
        """
        return self.add_bulk(items, source=source, batch_size=batch_size, on_conflict=on_conflict).items

    def add_bulk(self, items: Iterable[tuple[str, bytes, Sequence[str], Mapping[str, Any]]], *,
                 source: str | None, batch_size: int = BATCH, on_conflict: Literal["error", "skip"] = "skip",
                 keep_items: bool = True, progress: Callable[[AddResult], None] | None = None,
                 deleted: Literal["readd", "skip"] = "readd", retag: bool = False) -> AddResult:
        """:meth:`add_many` with counts (added / already there / skipped), for importers.

        ``items`` is consumed lazily, ``batch_size`` at a time, so an import of any size holds one
        batch of bytes in memory.  ``progress`` is called after each batch.

        ``deleted="skip"``: an id whose latest change is a delete is not added again (counted in
        ``deleted_since``): a re-run import must not bring back what a user deleted.  An item already
        there with the same bytes and other tags is counted in ``other_tags`` and left as it is; with
        ``retag`` its tags are changed instead (``retagged``): a tombstone and a new row with the same
        bytes, two changes, so :meth:`changes` and an index catching up see the new tags.  The same holds
        for the split in an item's meta (a manifest's split column, what a retrieval evaluation reads):
        another split given (``meta["split"]``) is counted in ``other_split``, or with ``retag`` changed
        (``resplit``); a re-import that gives no split leaves the item's as it is.  A corrected split
        column was neither applied nor reported (found on review).
        """
        self._check_writable("adding")
        if batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        res = AddResult()
        t0 = time.perf_counter()
        batch: list[tuple[str, bytes, Sequence[str], Mapping[str, Any]]] = []
        for it in items:
            batch.append(it)
            if len(batch) >= batch_size:
                self._add_batch(batch, source, on_conflict, res, keep_items, deleted == "skip", retag)
                batch = []
                res.seconds = time.perf_counter() - t0
                if progress:
                    progress(res)
        if batch:
            self._add_batch(batch, source, on_conflict, res, keep_items, deleted == "skip", retag)
        res.seconds = time.perf_counter() - t0
        if progress:
            progress(res)
        return res

    def _skip(self, res: AddResult, on_conflict: str, err: ValueError, item_id: object) -> None:
        if on_conflict != "skip":
            raise err
        res.skipped += 1
        if len(res.skipped_reasons) < 20:
            res.skipped_reasons.append(f"{str(item_id)[:80]}: {err}")
        log.debug("collection %s: skipped %s: %s", self.name, item_id, err)

    def _tombstoned(self, conn: Connection, ids: Sequence[str]) -> set[str]:
        """Those of ``ids`` (none of them live) that were deleted: their latest change is a delete."""
        t = cat.items
        out: set[str] = set()
        for i in range(0, len(ids), 500):
            q = select(t.c.item_id).where(t.c.collection_id == self._cid, t.c.item_id.in_(ids[i:i + 500]),
                                          t.c.deleted_seq.is_not(None)).distinct()
            out.update(r[0] for r in conn.execute(q))
        return out

    def _add_batch(self, batch: list[tuple[str, bytes, Sequence[str], Mapping[str, Any]]], source: str | None,
                   on_conflict: str, res: AddResult, keep_items: bool, skip_deleted: bool = False,
                   retag: bool = False) -> None:
        # 1. Validate; the first occurrence of an id in the batch is the one that counts.
        valid: dict[str, tuple[str, bytes, list[str], dict[str, Any]]] = {}
        order: list[tuple[str, str]] = []  # (id, hash) of each accepted input, in input order
        for entry in batch:
            item_id: Any = entry[0] if len(entry) else None
            try:
                if len(entry) != 4:
                    raise ValueError("item: expected (id, bytes, tags, meta)")
                item_id, data, tags, meta = entry
                check_new_item_id(item_id)
                data = check_data(data)
                h = sha256_hex(data)
                prior = valid.get(item_id)
                if prior is not None and prior[0] != h:
                    raise DuplicateItem(f"id: {item_id!r} appears twice in the batch with other bytes")
                if prior is None:
                    valid[item_id] = (h, data, check_tags(tags), check_meta(meta))
                order.append((item_id, h))
            except ValueError as e:
                self._skip(res, on_conflict, e, item_id)
        if not valid:
            return
        # 2. What is already there; conflicts are refused before anything of this batch is written.
        ids = list(valid)
        with self._engine.connect() as conn:
            live = self._live(conn, ids)
            gone = self._tombstoned(conn, [i for i in ids if i not in live]) if skip_deleted else set()
        for item_id, row in live.items():
            if row["content_hash"] != valid[item_id][0]:
                try:
                    self._same_or_conflict(row, valid[item_id][0])
                except DuplicateItem as e:
                    self._skip(res, on_conflict, e, item_id)
                    del valid[item_id]

        def other_tags(row: Row, item_id: str) -> bool:
            return set(row["tags"]) != set(valid[item_id][2])

        def other_split(row: Row, item_id: str) -> bool:
            given = valid[item_id][3]
            return "split" in given and dict(row["meta"] or {}).get("split") != given["split"]

        def changed(row: Row, item_id: str) -> bool:
            return other_tags(row, item_id) or other_split(row, item_id)

        new = [i for i in valid if i not in live and i not in gone]
        to_retag = [i for i in valid if i in live and retag and changed(live[i], i)]
        added: dict[str, Item] = {}
        retagged: dict[str, Item] = {}  # rewritten with new tags, a new split or both
        tags_changed = split_changed = 0
        if new or to_retag:
            # 3. The bytes, durably, then 4. the rows, in one transaction.  An item retagged keeps its blob,
            # which its rows (the tombstone too) name, so no sweep takes it: not written again.
            if new:
                self.blobs.put_many({valid[i][0]: valid[i][1] for i in new})
            t, c = cat.items, cat.collections
            with cat.write_txn(self._engine, self._cid) as (conn, head):
                again = self._live(conn, new + to_retag)  # what other writers did since step 2
                if skip_deleted:
                    gone |= self._tombstoned(conn, [i for i in new + to_retag if i not in again])
                seq = head
                rows: list[dict[str, Any]] = []
                for i in new:
                    if i in again:
                        live[i] = again[i]
                        continue
                    if i in gone:
                        continue
                    h, data, tags, meta = valid[i]
                    seq += 1
                    rows.append(self._row(seq, i, h, len(data), source, tags, meta))
                replaced: set[str] = set()  # the ids retagged: a tombstone, then a row with the new tags
                for i in to_retag:
                    old = again.get(i)
                    h, data, tags, meta = valid[i]
                    if old is None:  # deleted by another writer meanwhile: as any id deleted
                        del live[i]
                        if i not in gone:  # added again (``deleted="readd"``) with the new tags
                            seq += 1
                            rows.append(self._row(seq, i, h, len(data), source, tags, meta))
                        continue
                    live[i] = old
                    if old["content_hash"] != h or not changed(old, i):
                        continue  # replaced or retagged by another writer meanwhile: the rules below
                    tags_changed += other_tags(old, i)
                    split_changed += other_split(old, i)
                    seq += 1
                    conn.execute(update(t).where(t.c.collection_id == self._cid, t.c.seq == old["seq"])
                                 .values(deleted_seq=seq))
                    seq += 1
                    rows.append(self._row(seq, i, h, len(data), source, tags, {**dict(old["meta"]), **meta}))
                    replaced.add(i)
                if rows:
                    self._insert(conn, rows, seq)
                if replaced:
                    conn.execute(update(c).where(c.c.id == self._cid).values(live_count=c.c.live_count - len(replaced)))
            for r in rows:
                (retagged if r["item_id"] in replaced else added)[r["item_id"]] = self._item(r)
            for i, row in again.items():  # lost a race: same rules as before
                if row["content_hash"] != valid[i][0]:
                    try:
                        self._same_or_conflict(row, valid[i][0])
                    except DuplicateItem as e:
                        self._skip(res, on_conflict, e, i)
                        del valid[i]
        res.added += len(added)
        res.retagged += tags_changed
        res.resplit += split_changed
        counted: set[str] = set()
        for item_id, h in order:
            if item_id not in valid or valid[item_id][0] != h:
                continue
            if item_id in gone:
                if item_id not in counted:
                    counted.add(item_id)
                    res.deleted_since += 1
                continue
            done = added.get(item_id) or retagged.get(item_id)
            if done is not None and item_id not in counted:
                counted.add(item_id)
                if keep_items:
                    res.items.append(done)
                continue
            if done is None and item_id not in live:  # deleted by another writer meanwhile, not added again
                continue
            res.existing += 1
            res.other_tags += done is None and other_tags(live[item_id], item_id)
            res.other_split += done is None and other_split(live[item_id], item_id)
            if keep_items:
                res.items.append(done if done is not None else self._item(live[item_id]))

    def delete(self, item_id: str) -> Item:
        """Tombstone the live item ``item_id`` (its own seq); :class:`UnknownItem` if none is live.
        The bytes stay: the blob may be shared, and an older snapshot still names it."""
        check_item_id(item_id)
        t = cat.items
        with cat.write_txn(self._engine, self._cid) as (conn, head):
            row = self._live(conn, [item_id]).get(item_id)
            if row is None:
                raise UnknownItem(f"id: no item {item_id!r} in {self.name}")
            seq = head + 1
            conn.execute(update(t).where(t.c.collection_id == self._cid, t.c.seq == row["seq"]).values(deleted_seq=seq))
            c = cat.collections
            conn.execute(update(c).where(c.c.id == self._cid).values(head=seq, live_count=c.c.live_count - 1))
        return self._item(row, deleted_seq=seq)

    # ---- reads --------------------------------------------------------------------------------------
    def get(self, item_id: str, include_deleted: bool = False) -> Item | None:
        """The live item ``item_id``; with ``include_deleted``, else its latest tombstone."""
        check_item_id(item_id)
        t = cat.items
        q = select(t).where(t.c.collection_id == self._cid, t.c.item_id == item_id)
        if not include_deleted:
            q = q.where(t.c.deleted_seq.is_(None))
        with self._engine.connect() as conn:
            r = conn.execute(q.order_by(t.c.seq.desc()).limit(1)).mappings().first()
        return self._item(r) if r is not None else None

    def get_many(self, item_ids: Sequence[str]) -> dict[str, Item]:
        """The live items among ``item_ids`` (one query per 500 ids; absent ids are left out)."""
        ids = [check_item_id(i) for i in dict.fromkeys(item_ids)]
        with self._engine.connect() as conn:
            return {i: self._item(r) for i, r in self._live(conn, ids).items()}

    def image(self, item_id: str) -> bytes:
        """The original bytes of the live item ``item_id``; :class:`UnknownItem` if none is live."""
        it = self.get(item_id)
        if it is None:
            raise UnknownItem(f"id: no item {item_id!r} in {self.name}")
        return self.blobs.get(it.content_hash)

    def image_by_hash(self, content_hash: str) -> bytes:
        return self.blobs.get(content_hash)

    def head(self) -> int:
        """Seq of the last change in this collection (0 when none)."""
        with self._engine.connect() as conn:
            q = select(cat.collections.c.head).where(cat.collections.c.id == self._cid)
            return int(conn.execute(q).scalar_one())

    def count(self) -> int:
        """Live items (a counter kept with head, in the same transactions)."""
        with self._engine.connect() as conn:
            q = select(cat.collections.c.live_count).where(cat.collections.c.id == self._cid)
            return int(conn.execute(q).scalar_one())

    def snapshot(self, upto: int | None = None, *, seq_range: tuple[int, int] | None = None) -> Iterator[Item]:
        """Live items as of seq ``upto`` (default: the head now), in seq order, streamed a page at a
        time (rows at or below ``upto`` never change but for a later tombstone, which the filter
        ignores, so the pages form one consistent snapshot without holding a transaction open).

        ``seq_range=(lo, hi)``: only the items added with ``lo < seq <= hi``, so parallel readers can
        split one snapshot (the same ``upto``) into ranges."""
        upto = self.head() if upto is None else int(upto)
        lo, hi = seq_range if seq_range is not None else (0, upto)
        hi = min(int(hi), upto)
        t = cat.items
        last = int(lo)
        while True:
            q = (select(t).where(t.c.collection_id == self._cid, t.c.seq > last, t.c.seq <= hi,
                                 or_(t.c.deleted_seq.is_(None), t.c.deleted_seq > upto))
                 .order_by(t.c.seq).limit(PAGE))
            with self._engine.connect() as conn:
                rows = list(conn.execute(q).mappings())
            for r in rows:
                yield self._item(r, deleted_seq=None)  # as of `upto` it is live
            if len(rows) < PAGE:
                return
            last = int(rows[-1]["seq"])

    def changes(self, after: int, upto: int | None = None, limit: int | None = None) -> list[Change]:
        """Adds and deletes with ``after < seq <= upto`` (default: the head now), in seq order; at most
        ``limit`` of them (page on with ``after = result[-1].seq``)."""
        t = cat.items
        upto_v = self.head() if upto is None else int(upto)
        if limit is not None and limit < 1:
            raise ValueError("limit: must be >= 1")
        adds = (select(t).where(t.c.collection_id == self._cid, t.c.seq > after, t.c.seq <= upto_v)
                .order_by(t.c.seq))
        dels = (select(t).where(t.c.collection_id == self._cid, t.c.deleted_seq > after, t.c.deleted_seq <= upto_v)
                .order_by(t.c.deleted_seq))
        if limit is not None:
            adds, dels = adds.limit(limit), dels.limit(limit)
        with self._engine.connect() as conn:
            out = [Change(int(r["seq"]), "add", self._item(r, deleted_seq=None)) for r in conn.execute(adds).mappings()]
            out += [Change(int(r["deleted_seq"]), "delete", self._item(r)) for r in conn.execute(dels).mappings()]
        out.sort(key=lambda c: c.seq)
        return out[:limit] if limit is not None else out

    def tags(self) -> list[str]:
        """Distinct tags of live items, sorted: the collection's concept vocabulary."""
        t, g = cat.items, cat.item_tags
        # The candidate tags come from the tag index alone; then one indexed probe per tag for a live
        # item holding it (a join over every tag row took 0.5 s at 100k items).
        with self._engine.connect() as conn:
            candidates = [r[0] for r in conn.execute(
                select(g.c.tag).where(g.c.collection_id == self._cid).distinct().order_by(g.c.tag))]
            live = []
            for tag in candidates:
                probe = (select(g.c.seq).join(t, and_(t.c.collection_id == g.c.collection_id, t.c.seq == g.c.seq))
                         .where(g.c.collection_id == self._cid, g.c.tag == tag, t.c.deleted_seq.is_(None)).limit(1))
                if conn.execute(probe).first() is not None:
                    live.append(tag)
        return live

    def info(self) -> dict[str, Any]:
        """Name, counts, head, creation time, where the rows and bytes live (no secrets), and the bytes
        of the live items' images (items sharing bytes share one blob: the disk may hold less)."""
        t = cat.items
        with self._engine.connect() as conn:
            live, deleted = _counts(conn, self._cid)  # a scan, not the counter: info is also a check
            stored = conn.execute(select(func.coalesce(func.sum(t.c.size), 0)).where(
                t.c.collection_id == self._cid, t.c.deleted_seq.is_(None))).scalar_one()
            head = conn.execute(select(cat.collections.c.head).where(cat.collections.c.id == self._cid)).scalar_one()
        return {"name": self.name, "count": live, "deleted": deleted, "head": int(head),
                "created": self.created_at, "catalogue": cat.public_url(self.catalogue_url),
                "blobs": public_blobs_url(self.blobs.url), "bytes": int(stored), "tags": len(self.tags())}

    # ---- checks and housekeeping --------------------------------------------------------------------
    def verify(self, hashes: bool = True) -> dict[str, Any]:
        """Every row's blob is there (and, with ``hashes``, hashes to its name); seqs are unique and
        ``head`` is the largest.  Reads every blob: for tests and ``deepindex collection check``."""
        t = cat.items
        missing: list[str] = []
        corrupt: list[str] = []
        seqs: list[int] = []
        with self._engine.connect() as conn:
            rows = conn.execute(select(t.c.item_id, t.c.seq, t.c.deleted_seq, t.c.content_hash, t.c.size)
                                .where(t.c.collection_id == self._cid).order_by(t.c.seq)).mappings().all()
        for r in rows:
            seqs.append(int(r["seq"]))
            if r["deleted_seq"] is not None:
                seqs.append(int(r["deleted_seq"]))
            if not self.blobs.has(r["content_hash"], int(r["size"])):
                missing.append(r["item_id"])
            elif hashes:
                try:
                    self.blobs.get(r["content_hash"])
                except OSError:
                    corrupt.append(r["item_id"])
        head, count = self.head(), self.count()
        unique, last = len(seqs) == len(set(seqs)), head == (max(seqs) if seqs else 0)
        counted = count == sum(1 for r in rows if r["deleted_seq"] is None)
        return {"rows": len(rows), "missing_blobs": missing, "corrupt_blobs": corrupt, "seqs_unique": unique,
                "head": head, "head_is_last": last, "count_matches": counted,
                "ok": not missing and not corrupt and unique and last and counted}

    def sweep(self, older_than_s: float = 3600.0) -> dict[str, int]:
        """Remove blobs no row of any collection in this catalogue names, and killed writers' temp
        files, older than ``older_than_s``.  (Blob stores shared by several catalogues: don't.)"""
        self._check_writable("sweeping")
        with self._engine.connect() as conn:
            referenced = {r[0] for r in conn.execute(select(cat.items.c.content_hash).distinct())}
        return self.blobs.sweep(referenced, older_than_s)


def _pick_blobs(name: str, eng: Engine, row: RowMapping, given: str | None) -> tuple[BlobStore, tuple[str, str] | None]:
    """The blob store to open the collection ``row`` with, and (why, the way out) when it is not the one
    its images are in.  ``given``: a URL the caller named (argument or environment), else None: the
    recorded store."""
    recorded: str | None = row["blobs_url"]
    if not recorded:  # recorded by no one: nothing to compare with
        return BlobStore(given or default_blobs_url()), None
    if not _relative_path(recorded):
        blobs = BlobStore(given or recorded)
        if given is None or blobs_location(given) == blobs_location(recorded):
            return blobs, None
        return blobs, (f"collection {name}: its images are in {recorded}, but it was opened with blobs at "
                       f"{recorded_blobs_url(given)}",
                       f"(give --blobs {recorded}, or set neither --blobs nor DEEPINDEX_BLOBS_URL)")
    # A relative folder, recorded as given before paths were made absolute: which folder it named depends on
    # the working directory of whoever created it.  The store given (else that path from here) is the one
    # when it holds the collection's last-added bytes, or the collection has none yet.
    burl = given or str(Path(local_blobs_path(recorded) or recorded).absolute())
    blobs = BlobStore(burl)
    t = cat.items
    with eng.connect() as conn:
        last = conn.execute(select(t.c.content_hash, t.c.size).where(t.c.collection_id == row["id"])
                            .order_by(t.c.seq.desc()).limit(1)).first()
    if last is None or blobs.has(last[0], int(last[1])):
        return blobs, None
    return blobs, (f"collection {name}: its images are in {recorded!r} (a relative folder, as given when the "
                   f"collection was created), and {recorded_blobs_url(burl)} does not hold them",
                   f"(give --blobs the absolute path of the folder {recorded!r} named there)")


def _find(eng: Engine, name: str) -> RowMapping | None:
    with eng.connect() as conn:
        return conn.execute(select(cat.collections).where(cat.collections.c.name == name)).mappings().first()


def _counts(conn: Connection, cid: int) -> tuple[int, int]:
    t = cat.items
    live = conn.execute(select(func.count()).select_from(t).where(
        t.c.collection_id == cid, t.c.deleted_seq.is_(None))).scalar_one()
    deleted = conn.execute(select(func.count()).select_from(t).where(
        t.c.collection_id == cid, t.c.deleted_seq.is_not(None))).scalar_one()
    return int(live), int(deleted)


def list_collections(catalogue_url: str | None = None) -> list[dict[str, Any]]:
    """Every collection of the catalogue: name, count (live), deleted, head, created; by name."""
    url = catalogue_url or cat.default_catalogue_url()
    eng = cat.engine_for(url)
    c, t = cat.collections, cat.items

    def per_collection(conn: Connection, deleted: bool) -> dict[int, int]:
        cond = t.c.deleted_seq.is_not(None) if deleted else t.c.deleted_seq.is_(None)
        q = select(t.c.collection_id, func.count()).where(cond).group_by(t.c.collection_id)
        return {int(cid): int(n) for cid, n in conn.execute(q)}

    with eng.connect() as conn:
        rows = conn.execute(select(c).order_by(c.c.name)).mappings().all()
        live, deleted = per_collection(conn, False), per_collection(conn, True)
    return [{"name": r["name"], "count": live.get(int(r["id"]), 0), "deleted": deleted.get(int(r["id"]), 0),
             "head": int(r["head"]), "created": float(r["created_at"]), "blobs": r["blobs_url"]} for r in rows]
