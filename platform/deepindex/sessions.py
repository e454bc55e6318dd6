"""Process sessions: start a service as the leader of a new session, and stop everything in it by id.

A service started with ``start_new_session=True`` and every process it or its helpers spawn (Ray's
raylet, GCS, agents and workers, which Ray moves into process groups of their own, and their
children such as Serve's HAProxy; MLflow's uvicorn workers) stay in that session, even when they
are re-parented to init.  So the session id finds them all: nothing is ever stopped by name.
Session bookkeeping reads ``/proc``: Linux only.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)


def session_members(sid: int) -> list[int]:
    """Live pids in the session ``sid`` (zombies excluded), from ``/proc``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(entry))
    return sorted(out)


def process_start(pid: int) -> str | None:
    """Who ``pid`` is: this boot's id and the process's start time (clock ticks since boot), or None
    when no such process runs.  A pid recorded in a state file may belong to another process after
    a reboot or once pids wrap around; the pair does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # state is field 3 of proc(5); starttime is field 22
    return f"{boot}:{fields[19]}" if len(fields) > 19 and fields[0] != "Z" else None


def wait_gone(sid: int, pid: int | None, timeout: float) -> bool:
    """Wait until ``pid`` (or, when None, the whole session) has exited; True when it has."""
    deadline = time.monotonic() + timeout
    while True:
        members = session_members(sid)
        if not members or (pid is not None and pid not in members):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def signal_session(sid: int, sig: int) -> None:
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.kill(pid, sig)


def stop_session(sid: int, leader: int | None = None, grace: float = 15.0) -> list[int]:
    """Stop a session; returns the pids that were in it.

    ``leader`` gets SIGTERM first and ``grace`` seconds to exit: ``ray start --block`` then shuts
    its helpers down in order (a session-wide SIGTERM leaves the GCS waiting for a raylet that is
    already gone).  What is left then gets SIGTERM, and after a few seconds SIGKILL.
    """
    members = session_members(sid)
    if not members:
        return []
    if leader is not None and leader in members:
        os.kill(leader, signal.SIGTERM)
        wait_gone(sid, leader, grace)
        wait_gone(sid, None, 3.0)  # the helpers exit right after the leader
    if session_members(sid):
        signal_session(sid, signal.SIGTERM)
        wait_gone(sid, None, 5.0)
    left = session_members(sid)
    if left:
        log.warning("session %d: %s still running after SIGTERM; sending SIGKILL", sid, left)
        signal_session(sid, signal.SIGKILL)
        wait_gone(sid, None, 5.0)
    return members
