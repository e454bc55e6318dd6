"""A named run (a training run, a sweep, an audit) is its folder: the same name resumes it as it was started.

A training run named again resumes from its last checkpoint: another model would fail to load it
in every worker, and another schedule or dataset would silently mix two runs in one.
``Tuner.restore`` brings back a sweep's or an audit's saved trials, their search space and
scheduler, and the trials it resumes get the *new* command's base config: the same mix.  So each
run's folder keeps a small JSON state file (a sweep's or audit's MLflow parent run, and the run's
*definition*: the dotted keys that make it what it is), and a resume whose definition differs is
refused before anything starts, naming the keys.  Keys that do not change what is computed (where
it runs, on how many workers, promotion, the audit's filter) may change: the caller leaves them
out of the definition.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepindex.atomic import write_file
from deepindex.config import ConfigError

if TYPE_CHECKING:
    from deepindex.config import Config

log = logging.getLogger(__name__)

SHOWN = 4  # changed keys named in the error; the rest are counted
LOCK = ".deepindex.lock"  # held by the process that runs the run in the folder
# Each kind of run's state file in its folder: a folder holds one kind (a name is not reused across kinds).
SWEEP_STATE, AUDIT_STATE, TRAIN_STATE = "deepindex_sweep.json", "deepindex_audit.json", "deepindex_train.json"
KINDS = {SWEEP_STATE: "sweep", AUDIT_STATE: "audit", TRAIN_STATE: "training run"}
# Config keys a restored run may change: where it and its decoded data are, and what acts after its
# trials (promotion).
FREE = ("ray.name", "ray.storage_path", "data.cache_dir", "tracking.registered_model", "tracking.promote_min_qbe_map",
        "tracking.promote_qbe_gallery")


# A run's name is its folder under the storage path (and its Tune or Train experiment's): one path
# component, like a collection's name.  "../x" wrote an audit outside the storage path, "a/b" nested folders.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def name_problem(name: object) -> str | None:
    """What keeps ``name`` from naming a run (None: nothing): 1-100 of ``A-Z a-z 0-9 . _ -``, starting with a
    letter or digit; so never ``.``, ``..`` or a path."""
    if isinstance(name, str) and RUN_NAME.fullmatch(name):
        return None
    return (f"{str(name)[:80]!r} must be 1-100 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit "
            "(a run's name is its folder under the storage path)")


def check_name(name: str, option: str = "--name") -> str:
    """``name`` if it can name a run (:func:`name_problem`), else a ``ConfigError`` naming ``option``.
    Checked before anything is made."""
    why = name_problem(name)
    if why:
        raise ConfigError(f"{option}: {why}")
    return name


class ChangedOnRestore(ConfigError):
    """A command named an existing sweep or audit with another definition."""


def read_state(folder: Path, file: str) -> dict[str, Any]:
    """The run's state file (``{}`` when there is none yet)."""
    f = folder / file
    if not f.is_file():
        return {}
    state: dict[str, Any] = json.loads(f.read_text())
    return state


def update_state(folder: Path, file: str, **values: Any) -> None:
    """Set ``values`` in the run's state file, keeping the rest."""
    write_file(folder / file, json.dumps({**read_state(folder, file), **values}, default=str))


def config_definition(cfg: Config, free: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dotted keys of ``cfg`` that define a run, less :data:`FREE` and the caller's ``free`` (a key,
    or a section as ``"ray."``)."""
    return {k: v for k, v in cfg.flat().items()
            if k not in FREE and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in free)}


def _normal(definition: dict[str, Any]) -> dict[str, Any]:
    normal: dict[str, Any] = json.loads(json.dumps(definition, default=str))  # tuples as lists, as saved
    return normal


def changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key=old (now new)`` for every key whose value differs, sorted by key."""
    now = _normal(now)
    out = []
    for key in sorted(set(recorded) | set(now)):
        old, new = recorded.get(key, "unset"), now.get(key, "unset")
        if old != new:
            out.append(f"{key}={json.dumps(old)} (now {json.dumps(new)})")
    return out


def check_kind(name: str, folder: Path, file: str) -> None:
    """Refuse a folder that holds another kind of run (a sweep named like an audit, a training run
    named like a sweep): restoring or recording there would read or mix the other's state."""
    for other, what in KINDS.items():
        if other != file and (folder / other).is_file():
            kind = KINDS[file]
            raise ChangedOnRestore(f"{name}: {folder} holds a {what}, not {'an' if kind[0] in 'aeiou' else 'a'} "
                                   f"{kind}: give another --name")


def record_definition(folder: Path, file: str, definition: dict[str, Any]) -> None:
    """A new run: its definition, for the next command that names it."""
    check_kind(folder.name, folder, file)
    update_state(folder, file, definition=_normal(definition))


def check_unchanged(name: str, folder: Path, file: str, definition: dict[str, Any]) -> None:
    """Before restoring the run ``name`` from ``folder`` (its kind's state ``file``): refuse a definition
    that is not the saved one.  A run saved before definitions were recorded is restored as it is."""
    check_kind(name, folder, file)
    kind = KINDS[file]
    recorded = read_state(folder, file).get("definition")
    if recorded is None:
        return
    diff = changes(recorded, definition)
    if not diff:
        return
    more = f" and {len(diff) - SHOWN} more" if len(diff) > SHOWN else ""
    raise ChangedOnRestore(
        f"{kind} {name} exists at {folder} with {', '.join(diff[:SHOWN])}{more}: the same name resumes it as it was "
        f"started. Give another --name for a new {kind}, or leave the changes out to resume this one")


class RunInProgress(ConfigError):
    """A command named a run that another process is running now."""


@contextlib.contextmanager
def running(kind: str, name: str, storage: str) -> Iterator[None]:
    """Hold the lock of the run ``name`` under ``storage`` while this process runs it: the same command
    in another terminal, or a job submitted twice, is refused instead of writing the same checkpoints
    and trials from two drivers.  An advisory ``flock``: it ends with the process however it ends, so a
    killed run leaves no stale lock.  Remote storage (``s3://...``), or a file system without locks,
    runs without one.  A name that is not one folder (:func:`check_name`) is refused first."""
    check_name(name, f"--name (or {'tune' if kind == 'sweep' else 'ray'}.name)")
    if "://" in storage:  # (a Path of it would read as a local folder "s3:")
        yield
        return
    folder = Path(storage) / name
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the processes Ray starts
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunInProgress(f"{kind} {name} is running now ({holder}) at {folder}: wait for it to end, or "
                                f"give another --name") from None
        except OSError as e:  # e.g. ENOLCK on a network file system
            log.debug("no lock on %s: %s", folder / LOCK, e)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)


def fresh_name(prefix: str, storage: str) -> str:
    """A new run's default name, ``PREFIX-YYYYmmdd-HHMMSS``, ``-2``, ``-3``... when runs started in the
    same second: its folder is made here, so two commands never take the same one."""
    base = time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    if "://" in storage:
        return base
    Path(storage).mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}-{n}"
        try:
            (Path(storage) / name).mkdir()
        except FileExistsError:
            continue
        return name
    raise RuntimeError(f"{prefix}: no free name in {storage} after {base}-999")
