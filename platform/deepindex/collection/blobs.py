"""Original image bytes, content-addressed: ``<root>/sha256/<h[:2]>/<h>`` with ``h`` the sha256 hex.

The root is a local folder or any fsspec URL (``s3://bucket/prefix`` on MinIO/S3, ``memory://`` in
tests).  A blob is written once and never changed, so readers need no lock, and two collections (or
two ids) with the same bytes share one file.

Durability (local): a blob is complete under its final name, and on disk, before :meth:`put`
returns.  One blob: ``deepindex.atomic.write_file`` (temp file, fsync, rename), then an fsync of its
folder so the rename itself survives a power cut.  Many blobs (:meth:`put_many`): the temp files are
written, one ``syncfs`` flushes them all, they are renamed, and a second ``syncfs`` flushes the
renames: two flushes per batch instead of two per file (about 3 ms each here).  On S3 a PUT is
atomic and durable when it answers.

A writer killed mid-way leaves at most temp files (``.<h>.*.tmp``) and blobs no catalogue row names;
neither is ever read, and :meth:`sweep` removes them.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from deepindex.atomic import write_file

log = logging.getLogger(__name__)

HASH_HEX = 64
# A remote blob a writer reuses is written again when older than this (a local one is touched), so that
# :meth:`BlobStore.sweep` (unreferenced blobs older than an hour by default) never takes it before the
# row naming it is committed.
REFRESH_AFTER_S = 600.0


class CorruptBlob(OSError):
    """A blob's bytes do not hash to its name (a damaged disk or object store)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_hash(content_hash: str) -> str:
    h = content_hash.lower()
    if len(h) != HASH_HEX or any(c not in "0123456789abcdef" for c in h):
        raise ValueError(f"content_hash: not a sha256 hex digest: {content_hash[:80]!r}")
    return h


def public_blobs_url(url: str) -> str:
    """The URL without credentials or query string (``s3://key:secret@bucket`` shows the bucket only)."""
    parts = urlsplit(url)
    if not parts.scheme or parts.scheme == "file":
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def local_blobs_path(url: str) -> str | None:
    """The folder a local blob store's URL names, as written (a plain path or ``file://`` URL; ``~``
    expanded, not made absolute); None for a remote one (``s3://``, ``memory://``, ...)."""
    parts = urlsplit(str(url))
    if parts.scheme == "file":
        return os.path.expanduser(parts.path)
    if not parts.scheme or (len(parts.scheme) == 1 and os.name == "nt"):
        return os.path.expanduser(str(url))
    return None


def blobs_location(url: str) -> str:
    """Where a blob store's bytes are, for comparing two URLs of one: a local folder as its absolute path
    (symlinks resolved; a relative one against the working directory), a remote URL without
    credentials, query or trailing slash."""
    path = local_blobs_path(url)
    if path is not None:
        return str(Path(path).resolve())
    return public_blobs_url(str(url)).rstrip("/")


def _syncfs(path: Path) -> bool:
    """Flush the filesystem holding ``path`` (Linux ``syncfs``); False where unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({path}): {os.strerror(err)}")
        return True
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# An orphan the sweep has moved out of writers' reach before it removes it (see _take).
ASIDE = ".sweep"


def _touch(path: Path) -> bool:
    """Make a blob young again; False when the sweep took it meanwhile (the caller writes it again)."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


def _take(f: Path, older_than_s: float) -> bool:
    """Remove the orphan blob ``f`` if it is still old once out of writers' reach.

    A writer reusing the blob makes it young (:func:`_touch`) and then commits a row naming it: between
    the sweep's look at its age and its removal, that writer would lose an acknowledged add's bytes.
    So the blob is first moved aside (a writer from then on finds it missing and writes it again), its
    age read again there (a writer that made it young just before keeps it: moved back), and only then
    removed."""
    aside = f.with_name(f".{f.name}.{os.getpid()}-{time.monotonic_ns()}{ASIDE}")
    try:
        os.rename(f, aside)
    except FileNotFoundError:
        return False
    try:
        if time.time() - aside.stat().st_mtime > older_than_s:
            aside.unlink()
            return True
        os.replace(aside, f)  # young after all; a writer may have written f again meanwhile: the same bytes
    except FileNotFoundError:  # another sweep took it
        pass
    return False


class BlobStore:
    """Content-addressed bytes under ``url`` (a local folder, ``file://`` URL, or fsspec URL)."""

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        parts = urlsplit(self.url)
        self.local = parts.scheme in ("", "file") or (len(parts.scheme) == 1 and os.name == "nt")
        self._fs: Any = None
        if self.local:
            self.root = Path(parts.path if parts.scheme == "file" else self.url).expanduser().resolve() / "sha256"
            self._known_dirs: set[Path] = set()
        else:
            import fsspec

            self._fs, root = fsspec.core.url_to_fs(self.url)
            self._remote_root = f"{root.rstrip('/')}/sha256"

    def __repr__(self) -> str:
        return f"BlobStore({public_blobs_url(self.url)!r})"

    # ---- paths ---------------------------------------------------------------------------------
    def _local_path(self, h: str) -> Path:
        return self.root / h[:2] / h

    def _remote_path(self, h: str) -> str:
        return f"{self._remote_root}/{h[:2]}/{h}"

    def _ensure_dir(self, d: Path) -> None:
        """Create a shard folder, and make its entry in the root durable (once per process)."""
        if d in self._known_dirs:
            return
        if not d.is_dir():
            new_root = not self.root.is_dir()
            d.mkdir(parents=True, exist_ok=True)
            _fsync_path(self.root)
            if new_root:
                _fsync_path(self.root.parent)
        self._known_dirs.add(d)

    # ---- reads ---------------------------------------------------------------------------------
    def has(self, content_hash: str, size: int | None = None) -> bool:
        """A complete blob is there (same size, when ``size`` is given)."""
        h = check_hash(content_hash)
        if self.local:
            try:
                st = self._local_path(h).stat()
            except FileNotFoundError:
                return False
            return size is None or st.st_size == size
        p = self._remote_path(h)
        if not self._fs.exists(p):
            return False
        return size is None or int(self._fs.size(p)) == size

    def get(self, content_hash: str, verify: bool = True) -> bytes:
        """The bytes named ``content_hash``; FileNotFoundError if absent, CorruptBlob if damaged."""
        h = check_hash(content_hash)
        try:
            data = self._local_path(h).read_bytes() if self.local else bytes(self._fs.cat_file(self._remote_path(h)))
        except FileNotFoundError:
            raise FileNotFoundError(f"content_hash: no blob {h} in {public_blobs_url(self.url)}") from None
        if verify and sha256_hex(data) != h:
            raise CorruptBlob(f"blob {h} in {public_blobs_url(self.url)}: its bytes hash to another value")
        return data

    # ---- writes --------------------------------------------------------------------------------
    def put(self, data: bytes, content_hash: str | None = None) -> str:
        """Store ``data`` durably; returns its sha256.  Already there: nothing is rewritten."""
        h = check_hash(content_hash) if content_hash else sha256_hex(data)
        if not self.local:
            p = self._remote_path(h)
            if not self.has(h, len(data)) or self._remote_age(p) > REFRESH_AFTER_S:
                self._fs.pipe_file(p, data)  # a reused old blob is written again: young, :meth:`sweep` keeps it
            return h
        path = self._local_path(h)
        self._ensure_dir(path.parent)
        if self.has(h, len(data)) and _touch(path):
            # An orphan a killed writer left is old: made young again, so :meth:`sweep` does not take it
            # between now and the commit of the row that names it.  Another writer may have renamed it in
            # and not yet synced its folder: sync it here before a catalogue row is committed that names it.
            _fsync_path(path)
        else:
            write_file(path, data)  # temp file, fsync, rename
        _fsync_path(path.parent)  # the rename is durable too
        return h

    def put_many(self, blobs: Mapping[str, bytes]) -> None:
        """Store many blobs (``{sha256: bytes}``) durably with two filesystem flushes in all."""
        todo = {check_hash(h): d for h, d in blobs.items()}
        if not self.local:
            for h, d in todo.items():
                self.put(d, h)
            return
        tmps: list[tuple[Path, Path]] = []
        try:
            for h, d in todo.items():
                path = self._local_path(h)
                self._ensure_dir(path.parent)
                if self.has(h, len(d)) and _touch(path):  # young again (see put)
                    continue
                tmp = path.with_name(f".{h}.{os.getpid()}-{time.monotonic_ns()}.tmp")
                with open(tmp, "wb") as fh:
                    fh.write(d)
                tmps.append((tmp, path))
            synced = _syncfs(self.root)  # the temp files' bytes (and blobs others renamed in) on disk
            if not synced:
                for tmp, _ in tmps:
                    _fsync_path(tmp)
            for tmp, path in tmps:
                os.replace(tmp, path)
            if not _syncfs(self.root):  # the renames on disk
                for folder in {p.parent for _, p in tmps} | {self._local_path(h).parent for h in todo}:
                    _fsync_path(folder)
            tmps = []
        finally:
            for tmp, _ in tmps:  # an error before the renames: leave no temp file behind
                tmp.unlink(missing_ok=True)

    def _remote_age(self, p: str) -> float:
        """Seconds since the remote blob ``p`` was written."""
        info = self._fs.info(p)
        mtime = info.get("LastModified") or info.get("mtime") or info.get("created")
        ts = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime or 0)
        return time.time() - ts

    # ---- housekeeping ------------------------------------------------------------------------------
    def hashes(self) -> Iterator[str]:
        """Every blob's hash (a full listing: for :meth:`sweep` and checks, not for requests)."""
        if self.local:
            if not self.root.is_dir():
                return
            for d in sorted(self.root.iterdir()):
                if d.is_dir():
                    for f in sorted(d.iterdir()):
                        if len(f.name) == HASH_HEX and not f.name.startswith("."):
                            yield f.name
            return
        for p in self._fs.find(self._remote_root):
            name = str(p).rsplit("/", 1)[-1]
            if len(name) == HASH_HEX:
                yield name

    def sweep(self, referenced: Iterable[str], older_than_s: float = 3600.0) -> dict[str, int]:
        """Remove temp files and unreferenced blobs older than ``older_than_s`` (a writer that is
        between writing a blob and committing its row is younger than that)."""
        keep = set(referenced)
        now = time.time()
        removed = {"temp_files": 0, "orphans": 0}
        if self.local:
            if not self.root.is_dir():
                return removed
            for d in self.root.iterdir():
                if not d.is_dir():
                    continue
                for f in d.iterdir():
                    try:
                        old = now - f.stat().st_mtime > older_than_s
                    except FileNotFoundError:
                        continue
                    if not old:
                        continue
                    if f.name.startswith(".") and f.name.endswith((".tmp", ASIDE)):
                        f.unlink(missing_ok=True)
                        removed["temp_files"] += 1
                    elif len(f.name) == HASH_HEX and f.name not in keep and _take(f, older_than_s):
                        removed["orphans"] += 1
            return removed
        for h in list(self.hashes()):
            if h in keep:
                continue
            p = self._remote_path(h)
            if self._remote_age(p) > older_than_s:
                self._fs.rm_file(p)
                removed["orphans"] += 1
        return removed
