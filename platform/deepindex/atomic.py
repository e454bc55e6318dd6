"""Atomic writes: a reader, and a writer killed at any point, see the old version or the new one.

- :func:`write_file` writes a temp file next to the target, syncs it, then ``os.replace`` s it in
  (checkpoints, the platform's state file, worker status files, the collection's blobs).
- :func:`swap_dir` fills a temp folder next to the target, syncs it, then swaps it in with one
  ``renameat2(RENAME_EXCHANGE)`` where the kernel and filesystem allow it, else with two renames
  that :func:`recover_dir` can finish after a crash (index folders).

A writer's temp folders are ``flock`` ed for the writer's lifetime: the kernel drops the lock when
the process dies, however it dies, so a folder whose lock can be taken belongs to no live writer
and the next load or write removes it (:func:`recover_dir`).  Folder names:
``.<target>.tmp-*`` (being written), ``.<target>.old-*/x`` (the previous version, moved aside by
the two-rename swap), ``.<target>.new-*`` (a lock being taken: never swept).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def write_file(path: str | Path, content: bytes | str | Callable[[Path], None], *, durable: bool = True) -> Path:
    """Write ``path`` atomically: ``content`` is bytes, text, or a function that writes the temp path.

    ``durable=False`` skips the syncs: still never half a file, but a power cut may bring back the old
    version (a status file rewritten every epoch, whose next write says the same)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content.encode() if isinstance(content, str) else content)
        if durable:
            with open(tmp, "rb") as fh:  # durable before the rename makes it visible
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)  # the rename durable too: after a power cut, the new version, not the old
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a filesystem that does not sync folders
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, f"renameat2({a}, {b}): {os.strerror(err)}")


def _hold(folder: Path) -> int | None:
    """Lock a writer's temp folder for the writer's lifetime (``flock`` on the folder itself).

    None where the filesystem has no ``flock`` (the folder is then never swept).
    """
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


def abandoned(folder: Path) -> bool:
    """No live writer holds ``folder`` (see :func:`_hold`)."""
    try:
        fd = _hold(folder)
    except OSError:  # gone meanwhile, or not ours to open
        return False
    if fd is None:
        return False
    os.close(fd)
    return True


def recover_dir(target: str | Path, complete: str) -> None:
    """Put back a folder that a writer moved aside and died before replacing (the two-rename swap),
    then remove what killed writers left next to it (temp and moved-aside folders).

    ``complete`` names the file whose presence marks a complete folder (written last).
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    if not (target / complete).is_file():
        olds = sorted(target.parent.glob(f".{target.name}.old-*/x"), key=lambda q: q.stat().st_mtime, reverse=True)
        for old in olds:
            if (old / complete).is_file() and not target.exists() and abandoned(old.parent):
                os.rename(old, target)
                log.warning("%s: restored the previous version left by an interrupted write", target)
                break
    if not (target / complete).is_file():
        return  # nothing complete to keep: leave every copy for a person to look at
    for left in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
        if left.is_dir() and abandoned(left):
            try:
                shutil.rmtree(left)
                log.info("%s: removed %s, left by an interrupted write", target, left.name)
            except OSError as e:  # read-only mount, or another process removing it too
                log.debug("%s: could not remove %s: %s", target, left, e)


def recover_all(parent: str | Path, complete: str) -> None:
    """:func:`recover_dir` for every folder of ``parent`` that a killed writer left moved aside."""
    p = Path(parent)
    if not p.is_dir():
        return
    for old in p.glob(".*.old-*/x"):
        recover_dir(p / old.parent.name[1:].split(".old-")[0], complete)


def swap_dir(target: str | Path, write: Callable[[Path], None], complete: str) -> Path:
    """Call ``write(tmp_dir)`` then swap ``tmp_dir`` in for ``target``: readers, and a writer killed at
    any point, see the old complete folder or the new one, never none.  ``write`` must create the
    file named ``complete`` last."""
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target, complete)
    held: list[int] = []

    def make(kind: str) -> Path:
        # Locked under a name the sweep ignores, then renamed: a sweep never sees it unlocked.
        # (A kill inside these two calls leaves an empty ``.new-`` folder, which stays.)
        folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new-"))
        fd = _hold(folder)
        if fd is not None:
            held.append(fd)
        named = folder.with_name(folder.name.replace(".new-", f".{kind}-", 1))
        os.rename(folder, named)
        return named

    tmp = make("tmp")
    try:
        write(tmp)
        for f in tmp.rglob("*"):  # durable before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            elif f.is_dir():
                fsync_dir(f)
        fsync_dir(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif not _exchange(tmp, target):  # when swapped, tmp holds the old version: removed below
            # Two renames: a crash between them leaves the old version under .old-*/x, where
            # recover_dir (run by every load and write) finds it and puts it back.
            old = make("old")
            os.rename(target, old / "x")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(target.parent)  # the swap durable: after a power cut, the new folder, not the old
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for fd in held:
            os.close(fd)
    return target
