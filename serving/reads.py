"""Searches answered in the ingress, from a read-only copy of the served index that follows its writer.

The index replica (``serving/index.py``) owns every write: an add or a delete is appended to the
served index's delta and synced before the replica answers.  A search needs no model and no lock:
the ingress replica that receives it answers it from its own copy of that index, loaded from the
same folder, after reading whatever the writer appended to the delta since the last search
(:meth:`deepindex.index.store.IndexStore.follow`: the delta opened and its size read, and a read
when it grew).
So a write acknowledged to anyone is in every later search, with no hop to the index replica and
no queueing behind it: a search costs the ingress's HTTP handling and the query itself.

The copy is used only while all of this holds, else the search goes to the index replica as before:
- the writer confirmed within the last ``ttl_s`` that this folder is the one it writes: its
  ``writer.json`` here holds the nonce it answers with (a node that does not share the writer's
  disk, or a writer restarted elsewhere, fails this; a restart takes longer than ``ttl_s``);
- the model asked for (name and version) is the one the writer serves (``serving.json``): the old
  one during a rollover's switch is answered by the index replica, which keeps it loaded;
- the copy is loaded and its base is the folder's current one (a compaction swaps the folder: the
  copy is reloaded in the background, and searches go to the index replica meanwhile);
- the delta can be followed (an unreadable whole line: only the writer's load mends that; a batch
  being written, or one a crash cut short, is simply not read yet).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepindex.index.query import Query, UnknownExample, run
from deepindex.index.store import DeltaUnreadable, Held, IndexRewritten, IndexStore, base_id, find_index
from serving.rollover import STATE_FILE as SERVING_FILE

log = logging.getLogger(__name__)

WRITER_FILE = "writer.json"  # the index replica's nonce, in the collection's index folder

_Key = tuple[str | None, str]  # (model name, version) of an index
_Ident = tuple[int, int, int]  # (inode, mtime ns, size) of a file: changed when it is rewritten


def error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}, "status": status}


def _code(message: str) -> str:
    """``bad_<parameter>`` from a message that starts with the parameter (``feature: ...``, ``metric=l2: ...``)."""
    m = re.match(r"([a-z_]+)", message)
    return f"bad_{m.group(1)}" if m else "bad_query"


def search(index: IndexStore, spec: dict[str, Any]) -> dict[str, Any]:
    """One search (:class:`deepindex.index.query.Query` fields in ``spec``) on ``index``: a page of hits,
    the next cursor, the descriptor and metric used, and which index answered; or an error."""
    try:
        res = run(index, Query(**spec))
    except UnknownExample as ex:
        return error(404, "unknown_item", f"no item {ex.args[0]!r} in the collection")
    except ValueError as ex:
        return error(422, _code(str(ex)), str(ex))
    return {"results": res.items, "next_cursor": res.next_cursor,
            "feature": res.feature, "metric": res.metric, "signals": res.signals, "index": index_ref(index)}


def index_ref(index: IndexStore) -> dict[str, Any]:
    m = index.manifest
    return {"collection": m.collection, "model_version": m.model.version, "seq": index.seq, "count": len(index)}


def _ident(path: Path) -> _Ident | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class _Cached:
    """A small JSON file, parsed again only when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ident: _Ident | None = None
        self._value: dict[str, Any] | None = None

    def get(self) -> dict[str, Any] | None:
        ident = _ident(self.path)
        if ident != self._ident:
            try:
                self._value = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._value = None
            self._ident = ident
        return self._value


class LocalReads:
    """The ingress's copies of the served index (see the module's docstring for when they answer)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self.dir: Path | None = None  # the folder the writer named
        self._nonce: str | None = None  # what the writer last answered
        self._confirmed_at = -math.inf
        self._checking = False
        # (model name, version) -> the copy: registry versions restart at 1 for every model name
        self._copies: dict[_Key, IndexStore] = {}
        self._loading: set[_Key] = set()
        # version -> the base (its manifest, held open: see store.Held) whose delta cannot be followed
        self._refused: dict[_Key, Held | None] = {}

    def _open(self, folder: Path) -> None:
        self.dir = folder
        self._writer = _Cached(folder / WRITER_FILE)
        self._serving = _Cached(folder / SERVING_FILE)
        self._copies, self._refused = {}, {}

    # ---- the writer's word --------------------------------------------------------------------
    def due(self) -> bool:
        """Time to ask the writer again: half-way through the confirmation's life, so that under load
        it never lapses (one caller at a time)."""
        if self._checking or self._clock() - self._confirmed_at < self.ttl_s / 2:
            return False
        self._checking = True
        return True

    def confirmed(self) -> bool:
        """The writer's last confirmation is still valid (a search can be answered here meanwhile)."""
        return self._nonce is not None and self._clock() - self._confirmed_at < self.ttl_s

    def confirm(self, answer: dict[str, Any] | None) -> None:
        """The writer's answer to ``reader()`` (None: it could not be asked)."""
        self._checking = False
        nonce, folder = (answer or {}).get("nonce"), (answer or {}).get("dir")
        if not isinstance(nonce, str) or not isinstance(folder, str):
            self._nonce = None
            return
        if self.dir != Path(folder):
            self._open(Path(folder))
        self._nonce, self._confirmed_at = nonce, self._clock()

    def _writer_here(self) -> bool:
        if self._nonce is None or self.dir is None or self._clock() - self._confirmed_at >= self.ttl_s:
            return False
        mine = self._writer.get()
        return mine is not None and mine.get("nonce") == self._nonce

    def loaded(self, version: str, name: str | None = None) -> bool:
        """Whether this process holds a copy of model ``name`` ``version``'s index (no name: any name's)."""
        return any(v == version and name in (None, n) for n, v in list(self._copies))

    # ---- searches -----------------------------------------------------------------------------
    def search(self, version: str, spec: dict[str, Any], name: str | None = None) -> dict[str, Any] | None:
        """The answer from this process's copy of model ``name`` ``version``'s index, or None: ask the index
        replica.  ``name`` None: whichever model's ``version`` the writer serves."""
        if not self._writer_here():
            return None
        serving = self._serving.get()
        if serving is None or serving.get("version") != version or name not in (None, serving.get("name")):
            return None
        copy = self._copy((serving.get("name"), version))
        if copy is None:
            return None
        return search(copy, spec)

    def _copy(self, key: _Key) -> IndexStore | None:
        copy = self._copies.get(key)
        if copy is not None:
            try:
                copy.follow()
                return copy
            except IndexRewritten:
                pass  # compacted: a copy of the new base loads below
            except (OSError, DeltaUnreadable) as e:
                log.warning("local reads of version %s stop until its index is rewritten: %s", key[1], e)
                self._refused[key] = copy.base
            self._copies.pop(key, None)
        self._load_soon(key)
        return None

    def _load_soon(self, key: _Key) -> None:
        if key in self._loading:
            return
        self._loading.add(key)
        threading.Thread(target=self._load, args=(key,), name=f"index-copy-{key[1]}", daemon=True).start()

    def _load(self, key: _Key) -> None:
        """Load a copy in the background (a big index takes a while; searches go to the index replica)."""
        name, version = key
        try:
            assert self.dir is not None
            path = find_index(self.dir, name, version=version, recover=False)
            if path is None:
                return
            for _ in range(3):  # a compaction may swap the folder while the copy is read: read again
                refused = self._refused.get(key)
                if refused is not None and base_id(path) == refused.ino:
                    return  # the base whose delta cannot be followed: the writer's alone
                try:
                    copy = IndexStore.load(path, recover=False)
                except IndexRewritten:
                    continue
                self._copies = {key: copy}  # one version's copy at a time: the served one
                log.info("local reads: version %s, %d items at change %d", version, len(copy), copy.seq)
                return
        except (OSError, ValueError) as e:
            log.warning("local reads: no copy of version %s's index (%s); the index replica answers", version, e)
        finally:
            self._loading.discard(key)
