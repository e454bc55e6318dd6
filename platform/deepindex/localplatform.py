"""The local platform: a Ray head and an MLflow tracking server under ``<state dir>/platform``.

``up`` starts both (or keeps the ones already running), ``down`` stops them, ``status``
reports them.  Each service is started in a new session (``start_new_session=True``), so it
and every process it or its helpers spawn (raylet, GCS, dashboard agent, Ray workers and
their children such as Serve's HAProxy; uvicorn workers of MLflow) share one session:
``down`` stops that session's processes by id and then checks ``/proc`` for anything left in
it.  Nothing is ever stopped by name (``ray stop`` would stop every Ray on the machine).

Ray keeps token authentication on: ``up`` writes a token file (mode 0600) in the state
folder and starts the head with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``;
:func:`ray_client_env` gives clients the same two variables (``deepindex.cluster.connect``
uses it).  Session bookkeeping reads ``/proc``: Linux only.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from hashlib import sha1
from pathlib import Path
from typing import Any

from deepindex.cluster import serve_env
from deepindex.paths import state_dir

log = logging.getLogger(__name__)

DEFAULT_RAY_PORT = 6390  # not Ray's 6379, so a developer's own `ray start` keeps its port
DEFAULT_MLFLOW_PORT = 5050
HOST = "127.0.0.1"  # loopback only: neither service is meant to be reachable from the network


class PlatformError(RuntimeError):
    """Something the user can fix: a port in use, a service that died on start."""


@dataclass
class Service:
    name: str
    pid: int
    pgid: int  # also the session id: `_spawn` makes each service a session leader
    port: int
    address: str  # "127.0.0.1:6390" for Ray, "http://127.0.0.1:5050" for MLflow
    log: str
    helpers: list[int]


# ---- files ------------------------------------------------------------------------------
def platform_dir() -> Path:
    d = state_dir() / "platform"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _state_file() -> Path:
    return platform_dir() / "state.json"


def token_path() -> Path:
    return platform_dir() / "ray_auth_token"


def read_state() -> dict[str, Service]:
    """The services ``up`` recorded (alive or not); {} when the platform was never started."""
    f = state_dir() / "platform" / "state.json"  # no mkdir: reading must not create folders
    if not f.is_file():
        return {}
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring an unreadable platform state file %s", f)
        return {}
    return {k: Service(**v) for k, v in raw.items()}


def _write_state(services: dict[str, Service]) -> None:
    f = _state_file()
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: vars(v) for k, v in services.items()}, indent=2))
    os.replace(tmp, f)


# ---- processes --------------------------------------------------------------------------
def session_members(sid: int) -> list[int]:
    """Live pids in the session ``sid`` (zombies excluded), from ``/proc``.

    A session, not a process group: `_spawn` starts each service as the leader of a new session
    (its pid is the session's and the group's id), and Ray moves its workers into process groups
    of their own; a worker's children (Serve's HAProxy) are re-parented to init when the worker
    is killed, but stay in the session.
    """
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


def _alive(svc: Service) -> bool:
    return svc.pid in session_members(svc.pgid)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_gone(sid: int, pid: int | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        members = session_members(sid)
        if not members or (pid is not None and pid not in members):
            return
        time.sleep(0.2)


def _signal_session(sid: int, sig: int) -> None:
    for pid in session_members(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop_session(sid: int, leader: int | None = None, grace: float = 15.0) -> list[int]:
    """Stop a service's session (see `session_members`); returns the pids that were in it.

    The leader gets SIGTERM first: ``ray start --block`` then shuts its helpers down in
    order (a group-wide SIGTERM leaves the GCS waiting for a raylet that is already gone).
    What is left then gets SIGTERM, and after a few seconds SIGKILL.
    """
    members = session_members(sid)
    if not members:
        return []
    if leader is not None and leader in members:
        os.kill(leader, signal.SIGTERM)
        _wait_gone(sid, leader, grace)
        _wait_gone(sid, None, 3.0)  # the helpers exit right after the leader
    if session_members(sid):
        _signal_session(sid, signal.SIGTERM)
        _wait_gone(sid, None, 5.0)
    left = session_members(sid)
    if left:
        log.warning("session %d: %s still running after SIGTERM; sending SIGKILL", sid, left)
        _signal_session(sid, signal.SIGKILL)
        _wait_gone(sid, None, 5.0)
    return members


def _spawn(name: str, cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    logf = platform_dir() / f"{name}.log"
    with open(logf, "ab") as out:
        # A new session: the service and everything it starts form one session we can stop by id.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd=str(platform_dir()))
    return proc, logf


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _bin(name: str) -> str:
    # The console scripts next to this interpreter: the venv's ray/mlflow, never another install's.
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else name


# ---- Ray ---------------------------------------------------------------------------------
def ray_temp_dir() -> str:
    # Ray's unix socket paths must stay under ~107 bytes, so not under a deep state folder;
    # one folder per state dir keeps this head apart from any other Ray on the machine.
    return f"/tmp/deepindex-ray-{os.getuid()}-{sha1(str(state_dir()).encode()).hexdigest()[:10]}"


def ray_client_env() -> dict[str, str]:
    """What a client of the local head needs: token auth mode and the token file."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path())}


def _ensure_token() -> None:
    p = token_path()
    if p.is_file() and p.read_text().strip():
        return
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate` makes


def _start_ray(port: int, num_cpus: int | None) -> Service:
    _ensure_token()
    cmd = [_bin("ray"), "start", "--head", "--block", f"--port={port}", f"--node-ip-address={HOST}",
           # The dashboard serves the Jobs API (`deepindex submit`) and the State API, which Ray
           # Train's placement-group cleaner needs: without it, a trial killed by ASHA leaks its
           # workers' CPUs and later jobs wait forever.  Loopback only.
           "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={free_port()}",
           "--disable-usage-stats", f"--temp-dir={ray_temp_dir()}",
           # Ray Client's fixed default port (10001) would clash with a second head on the machine.
           f"--ray-client-server-port={free_port()}"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    # In-cluster State API calls (that cleaner's) otherwise guess the cluster and give up when
    # another Ray runs on the machine ("Found multiple active Ray instances").
    env = {**os.environ, **ray_client_env(), **serve_env(), "RAY_ADDRESS": f"{HOST}:{port}"}
    proc, logf = _spawn("ray", cmd, env)
    return Service("ray", proc.pid, proc.pid, port, f"{HOST}:{port}", str(logf), [])


def _ray_ready(svc: Service) -> bool:
    if not _port_open(svc.port):
        return False
    # The GCS listens first; the head is usable once its raylet runs too.
    for pid in session_members(svc.pgid):
        try:
            if "raylet" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0")[0]:
                return True
        except OSError:
            pass
    return False


# ---- MLflow ------------------------------------------------------------------------------
def _start_mlflow(port: int) -> Service:
    d = platform_dir() / "mlflow"
    d.mkdir(exist_ok=True)
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
           "--artifacts-destination", str(d / "artifacts"), "--host", HOST, "--port", str(port),
           "--workers", "1"]
    # The server's background job runner (a dozen huey processes) is for GenAI jobs we do not use,
    # and it doubles the start time.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc, logf = _spawn("mlflow", cmd, env)
    return Service("mlflow", proc.pid, proc.pid, port, f"http://{HOST}:{port}", str(logf), [])


def mlflow_healthy(uri: str, timeout: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


# ---- the commands -------------------------------------------------------------------------
def up(ray_port: int = DEFAULT_RAY_PORT, mlflow_port: int = DEFAULT_MLFLOW_PORT, num_cpus: int | None = None,
       timeout: float = 120.0, services: tuple[str, ...] = ("ray", "mlflow")) -> dict[str, Service]:
    """Start what is not running; keep what is.  Port 0 picks a free port."""
    state = read_state()
    wanted: dict[str, int] = {}
    for name in services:
        old = state.get(name)
        if old is not None and _alive(old):
            log.info("%s already running (pid %d, %s)", name, old.pid, old.address)
            continue
        if old is not None:
            log.warning("%s (pid %d) recorded as running has died; see %s. Starting it again.", name, old.pid, old.log)
            _stop_session(old.pgid, old.pid)  # its helpers may have outlived it
            state.pop(name)
        port = (ray_port if name == "ray" else mlflow_port) or free_port()
        if not _port_free(port):
            flag = "--ray-port" if name == "ray" else "--mlflow-port"
            raise PlatformError(f"{name}: port {HOST}:{port} is in use by another process; choose another with {flag}")
        wanted[name] = port
    # Every port is checked before anything starts: a refused `up` leaves nothing running.
    starting = {name: _start_ray(port, num_cpus) if name == "ray" else _start_mlflow(port)
                for name, port in wanted.items()}
    # Record before waiting: an interrupted `up` still leaves ids that `down` can stop.
    _write_state({**state, **starting})

    deadline = time.monotonic() + timeout
    pending = dict(starting)
    while pending:
        for name, svc in list(pending.items()):
            ready = _ray_ready(svc) if name == "ray" else mlflow_healthy(svc.address, timeout=1.0)
            if ready:
                svc.helpers = [p for p in session_members(svc.pgid) if p != svc.pid]
                log.info("%s up at %s (pid %d, %d helper processes)", name, svc.address, svc.pid, len(svc.helpers))
                pending.pop(name)
            elif not _alive(svc):
                _stop_session(svc.pgid, svc.pid)
                state.update({k: v for k, v in starting.items() if k != name})
                _write_state(state)
                raise PlatformError(f"{name}: exited while starting; last lines of {svc.log}:\n{_tail(Path(svc.log))}")
        if pending and time.monotonic() > deadline:
            raise PlatformError(f"{', '.join(pending)}: not ready after {timeout:.0f}s; see {platform_dir()}/*.log "
                                "(`deepindex down` stops what was started)")
        if pending:
            time.sleep(0.3)
    state.update(starting)
    _write_state(state)
    return state


def down() -> dict[str, list[int]]:
    """Stop every recorded service's session; returns the pids stopped per service."""
    state = read_state()
    stopped: dict[str, list[int]] = {}
    for name, svc in state.items():
        # Ray's leader shuts its helpers down in order; MLflow's leader only waits for uvicorn.
        stopped[name] = _stop_session(svc.pgid, svc.pid if name == "ray" else None)
        if stopped[name]:
            log.info("%s: stopped %d processes", name, len(stopped[name]))
        else:
            log.info("%s: was not running", name)
    f = state_dir() / "platform" / "state.json"
    if f.exists():
        f.unlink()
    return stopped


def status() -> dict[str, dict[str, Any]]:
    """Each recorded service: running or dead, address, pids."""
    out: dict[str, dict[str, Any]] = {}
    for name, svc in read_state().items():
        members = session_members(svc.pgid)
        alive = svc.pid in members
        info: dict[str, Any] = {"state": "running" if alive else "dead", "address": svc.address, "pid": svc.pid,
                                "processes": members, "log": svc.log}
        if name == "mlflow" and alive:
            info["healthy"] = mlflow_healthy(svc.address)
        if not alive:
            info["hint"] = "the process died; `deepindex up` starts it again (see its log)"
        out[name] = info
    return out


def running_service(name: str) -> Service | None:
    """The recorded service if its main process is alive, else None (cheap: no network)."""
    svc = read_state().get(name)
    return svc if svc is not None and _alive(svc) else None
