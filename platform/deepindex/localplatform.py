"""The local platform: a Ray head and an MLflow tracking server under ``<state dir>/platform``.

``up`` starts both (or keeps the ones already running), ``down`` stops them, ``status``
reports them and every address a user needs (:func:`platform_urls`: the Ray head for
``RAY_ADDRESS``, the dashboard and Jobs API on a fixed loopback port, Ray Client, MLflow, and the
Serve URL ``deepindex serve`` recorded), ``env`` turns them into ``export`` lines
(:func:`client_env`); :data:`SERVICES` says how each one starts, comes up and stops.  Each service is
started in a new session (``start_new_session=True``) and stopped by that session's id
(:mod:`deepindex.sessions`).  Nothing is ever stopped by name (``ray stop`` would stop every Ray
on the machine).  ``up`` and ``down`` hold an exclusive lock on ``<state dir>/platform/state.lock``
while they run, so two of them on one state folder take turns (neither records services the other
cannot see, nor stops what the other is starting).

Ray keeps token authentication on: ``up`` writes a token file (mode 0600) in the state
folder and starts the head with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``;
:func:`ray_client_env` gives clients the same two variables (``deepindex.cluster.connect``
uses it).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import sha1
from pathlib import Path
from typing import Any

from deepindex.atomic import write_file
from deepindex.cluster import num_cpus_from_env
from deepindex.net import HOST, free_port, port_free, port_open
from deepindex.paths import state_dir
from deepindex.sessions import process_start, session_members, stop_session

log = logging.getLogger(__name__)

DEFAULT_RAY_PORT = 6390  # not Ray's 6379, so a developer's own `ray start` keeps its port
DEFAULT_DASHBOARD_PORT = 8275  # not Ray's 8265, for the same reason; the Jobs API is served there
DEFAULT_MLFLOW_PORT = 5050
MAX_PORT = 65535
READY_TIMEOUT_S = 120.0  # how long `up` waits for each service to answer, started now or running already


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
    urls: dict[str, str] = field(default_factory=dict)  # every address it serves, by name (status, env)
    # The `deepindex up` options besides its port it was started with, by flag ({"--num-cpus": 4}): a later
    # `up` that asks for others says they do not apply to it.  {} in a state file from before they were kept.
    options: dict[str, int] = field(default_factory=dict)
    # Who the leader is (`sessions.process_start`: boot id and start time): after a reboot or once pids wrap
    # around, the recorded pid may be another program's, and `down` must not stop that one's session.
    # "" in a state file from before it was kept (the pid is then trusted, as it was).
    started: str = ""


@dataclass(frozen=True)
class UpOptions:
    """What `deepindex up` passes to each service's start besides its port."""

    num_cpus: int | None = None
    dashboard_port: int = DEFAULT_DASHBOARD_PORT  # 0: any free port


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
        return {k: Service(**v) for k, v in raw.items()}
    except (OSError, json.JSONDecodeError, TypeError):
        log.warning("ignoring an unreadable platform state file %s", f)
        return {}


def _write_state(services: dict[str, Service]) -> None:
    write_file(_state_file(), json.dumps({k: vars(v) for k, v in services.items()}, indent=2))


def _lock_file() -> Path:
    return platform_dir() / "state.lock"


@contextmanager
def _state_lock() -> Iterator[None]:
    """Hold the state folder's platform lock (an exclusive ``flock``), waiting for another ``up`` or
    ``down`` that holds it.  The kernel releases it when this process ends, however it ends; the services
    started meanwhile do not inherit it (Python's files are not inheritable, and Popen closes the rest)."""
    path = _lock_file()
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another `deepindex up` or `deepindex down` is running on %s: waiting for it to end",
                        state_dir())
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- processes --------------------------------------------------------------------------
def _ours(svc: Service) -> bool:
    """False when the recorded leader's pid belongs to another process now (a stale state file).  A leader
    that has exited may have left helpers in its session: those are ours, for the kernel gives no new
    process a pid that is still a session's id."""
    return not svc.started or process_start(svc.pid) in (None, svc.started)


def _alive(svc: Service) -> bool:
    return _ours(svc) and svc.pid in session_members(svc.pgid)


def _stop(svc: Service, leader_first: bool) -> list[int]:
    """Stop the service's session (nothing when its pid is another process's now); the pids stopped."""
    if not _ours(svc):
        log.info("%s: pid %d recorded for it belongs to another process now: left alone", svc.name, svc.pid)
        return []
    return stop_session(svc.pgid, svc.pid if leader_first else None)


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
def ray_temp_dir(home: Path | None = None) -> str:
    """The head's Ray temp folder (sockets, session logs) for the state dir ``home`` (default: this
    process's).  Ray's unix socket paths must stay under ~107 bytes, so not under a deep state
    folder; one folder per state dir keeps this head apart from any other Ray on the machine."""
    return f"/tmp/deepindex-ray-{os.getuid()}-{sha1(str(home or state_dir()).encode()).hexdigest()[:10]}"


def ray_client_env() -> dict[str, str]:
    """What a client of the local head needs: token auth mode and the token file."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path())}


def client_process_env() -> dict[str, str]:
    """This process's environment as a client of the local head: :func:`ray_client_env`, without a
    ``RAY_AUTH_TOKEN`` (another cluster's, which Ray would present before the head's token file)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    return {**env, **ray_client_env()}


def use_local_head_auth() -> None:
    """Present the local head's token from this process (its ``ray.init``, its Jobs API calls)."""
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(ray_client_env())


def _ensure_token() -> None:
    p = token_path()
    if p.is_file() and p.read_text().strip():
        return
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate` makes


def _start_ray(port: int, opts: UpOptions) -> Service:
    from deepindex.cluster import default_num_cpus, local_cluster_env

    _ensure_token()
    dashboard, client, agent = opts.dashboard_port or free_port(), free_port(), free_port()
    num_cpus = opts.num_cpus or default_num_cpus()
    cmd = [_bin("ray"), "start", "--head", "--block", f"--port={port}", f"--node-ip-address={HOST}",
           # The dashboard serves the Jobs API (`deepindex submit`, `ray job submit`) and the State
           # API, which Ray Train's placement-group cleaner needs: without it, a trial killed by
           # ASHA leaks its workers' CPUs and later jobs wait forever.  Loopback only.
           "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={dashboard}",
           "--disable-usage-stats", f"--temp-dir={ray_temp_dir()}",
           # Ray Client's fixed default port (10001) would clash with a second head on the machine.
           f"--ray-client-server-port={client}", f"--num-cpus={num_cpus}",
           # ... and so would the dashboard agent's (52365): its HTTP server then stays off, and the Jobs API
           # answers "No available agent".
           f"--dashboard-agent-listen-port={agent}"]
    # In-cluster State API calls (that cleaner's) otherwise guess the cluster and give up when
    # another Ray runs on the machine ("Found multiple active Ray instances").
    # A shell set up for a remote cluster (the README's steps) must not hand the head that cluster's token
    # (Ray reads RAY_AUTH_TOKEN before the token file) nor its API server (whose answers Ray Train's cleaner
    # would act on): this head's own, whatever the shell holds.
    env = {**client_process_env(), **local_cluster_env(), "RAY_ADDRESS": f"{HOST}:{port}",
           "RAY_API_SERVER_ADDRESS": f"http://{HOST}:{dashboard}"}
    # On SIGTERM (`deepindex down`) `ray start --block` first drains its node for up to 30 s, so that
    # Serve can move its replicas to other nodes; a one-node platform has none, so it would wait the
    # whole time and be killed: stop at once (what `ray stop` does).  A value you set wins.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    proc, logf = _spawn("ray", cmd, env)
    urls = {"ray": f"{HOST}:{port}", "dashboard": f"http://{HOST}:{dashboard}", "client": f"ray://{HOST}:{client}"}
    options = {"--dashboard-port": dashboard, "--num-cpus": num_cpus}
    return Service("ray", proc.pid, proc.pid, port, f"{HOST}:{port}", str(logf), [], urls, options,
                   process_start(proc.pid) or "")


def _ray_ready(svc: Service) -> bool:
    if not port_open(svc.port):
        return False
    # The GCS listens first; the head is usable once its raylet runs too ...
    for pid in session_members(svc.pgid):
        try:
            if "raylet" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0")[0]:
                break
        except OSError:
            pass
    else:
        return False
    # ... and `ray status` answers once the autoscaler monitor has published the cluster's first
    # status (every 5 s): until then it prints "No cluster status" to a user who just ran `up`.
    env = {**client_process_env(), "RAY_ADDRESS": svc.address}
    try:
        out = subprocess.run([_bin("ray"), "status"], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and "Active:" in out.stdout


# ---- MLflow ------------------------------------------------------------------------------
def _start_mlflow(port: int, opts: UpOptions) -> Service:
    d = platform_dir() / "mlflow"
    d.mkdir(exist_ok=True)
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
           "--artifacts-destination", str(d / "artifacts"), "--host", HOST, "--port", str(port),
           "--workers", "1"]
    # The server's background job runner (a dozen huey processes) is for GenAI jobs we do not use,
    # and it doubles the start time.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc, logf = _spawn("mlflow", cmd, env)
    address = f"http://{HOST}:{port}"
    return Service("mlflow", proc.pid, proc.pid, port, address, str(logf), [], {"mlflow": address},
                   started=process_start(proc.pid) or "")


def mlflow_healthy(uri: str, timeout: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def _mlflow_ready(svc: Service) -> bool:
    return mlflow_healthy(svc.address, timeout=1.0)


# ---- the services ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ServiceKind:
    """How one service of the platform starts, comes up and stops."""

    default_port: int
    flag: str  # the `deepindex up` option that sets its port
    start: Callable[[int, UpOptions], Service]  # (port, options) -> the started service
    ready: Callable[[Service], bool]
    # SIGTERM the leader first and let it stop its helpers in order (Ray's); else the whole session at once.
    stop_leader_first: bool
    health: Callable[[Service], bool] | None = None  # reported by `status` beyond "alive"
    # Fixed ports it binds besides its own, with their `deepindex up` options: checked before anything starts.
    other_ports: Callable[[UpOptions], dict[str, int]] = lambda opts: {}
    # The options besides its port that a user asked for (None: not asked), by their `deepindex up` flag:
    # compared with those a running service was started with (Service.options).
    asked: Callable[[UpOptions], dict[str, int | None]] = lambda opts: {}


def _given(port: int, default: int) -> int | None:
    """A port a user asked for: not 0 (any), nor the default (which the command line passes when none is given)."""
    return None if port in (0, default) else port


SERVICES: dict[str, ServiceKind] = {
    "ray": ServiceKind(DEFAULT_RAY_PORT, "--ray-port", _start_ray, _ray_ready, stop_leader_first=True,
                       other_ports=lambda opts: {"--dashboard-port": opts.dashboard_port},
                       asked=lambda opts: {"--dashboard-port": _given(opts.dashboard_port, DEFAULT_DASHBOARD_PORT),
                                           "--num-cpus": opts.num_cpus}),
    "mlflow": ServiceKind(DEFAULT_MLFLOW_PORT, "--mlflow-port", _start_mlflow, _mlflow_ready,
                          stop_leader_first=False, health=lambda svc: mlflow_healthy(svc.address)),
}


# ---- the commands -------------------------------------------------------------------------
def _check_numbers(ports: dict[str, int], num_cpus: int | None) -> None:
    """Ports and CPUs a caller gave, named by their `deepindex up` option: checked before anything starts."""
    for flag, p in ports.items():
        if not 0 <= p <= MAX_PORT:
            raise ValueError(f"{flag}: a port must be 0-{MAX_PORT} (0: any free port), not {p}")
    if num_cpus is not None and num_cpus < 1:
        raise ValueError(f"--num-cpus: must be >= 1, not {num_cpus}")


def _check_distinct(ports: dict[str, int]) -> None:
    """Two services asked to take one port: one of them would die on start, the other run on."""
    seen: dict[int, str] = {}
    for flag, p in ports.items():
        if p and p in seen:
            raise ValueError(f"{flag}: port {p} is asked for {seen[p]} too; give each service its own")
        seen.setdefault(p, flag)


def up(ray_port: int = DEFAULT_RAY_PORT, mlflow_port: int = DEFAULT_MLFLOW_PORT, num_cpus: int | None = None,
       timeout: float | None = None, services: tuple[str, ...] = ("ray", "mlflow"),
       dashboard_port: int = DEFAULT_DASHBOARD_PORT) -> dict[str, Service]:
    """Start what is not running; keep what is, once it answers too.  Port 0 picks a free port.  ``num_cpus``
    None: ``DEEPINDEX_NUM_CPUS``, else the default.  A bad number is a ValueError naming it, before anything
    starts.  Options that differ from those a running service was started with are a warning: they apply
    when it starts.  ``timeout`` (default :data:`READY_TIMEOUT_S`): how long each service may take to answer."""
    _check_numbers({"--ray-port": ray_port, "--mlflow-port": mlflow_port, "--dashboard-port": dashboard_port},
                   num_cpus)
    _check_distinct({"--ray-port": ray_port, "--mlflow-port": mlflow_port, "--dashboard-port": dashboard_port})
    if num_cpus is None:
        num_cpus = num_cpus_from_env()
    ports = {"ray": ray_port, "mlflow": mlflow_port}
    opts = UpOptions(num_cpus=num_cpus, dashboard_port=dashboard_port)
    with _state_lock():  # another `up` or `down` on this state folder waits until this one has recorded its work
        return _up(ports, opts, READY_TIMEOUT_S if timeout is None else timeout, services)


def _up(ports: dict[str, int], opts: UpOptions, timeout: float, services: tuple[str, ...]) -> dict[str, Service]:
    state = read_state()
    wanted: dict[str, int] = {}
    running: dict[str, Service] = {}
    for name in services:
        old = state.get(name)
        if old is not None and _alive(old):
            log.info("%s already running (pid %d, %s)", name, old.pid, old.address)
            running[name] = old
            continue
        if old is not None:
            log.warning("%s (pid %d) recorded as running has died; see %s. Starting it again.", name, old.pid, old.log)
            _stop(old, leader_first=False)  # its helpers may have outlived it
            state.pop(name)
        port = ports[name] or free_port()
        for flag, p in {SERVICES[name].flag: port, **SERVICES[name].other_ports(opts)}.items():
            if p and not port_free(p):
                raise PlatformError(f"{name}: port {HOST}:{p} is in use by another process; choose another with {flag}")
        wanted[name] = port
    kept = [f"{name} {d}" for name, svc in running.items() for d in _other_options(name, svc, ports[name], opts)]
    if kept:
        log.warning("the platform runs already with other options than asked for, kept as they are: %s (options "
                    "apply when a service starts: `deepindex down` first to change them)", "; ".join(kept))
    # Every port is checked before anything starts: a refused `up` leaves nothing running.
    starting = {name: SERVICES[name].start(port, opts) for name, port in wanted.items()}
    # Record before waiting: an interrupted `up` still leaves ids that `down` can stop.
    _write_state({**state, **starting})

    # A service running already must answer too: a live process is not a working one (an MLflow server
    # stuck on its database, a head whose raylet died).
    deadline = time.monotonic() + timeout
    pending = {**running, **starting}
    while pending:
        for name, svc in list(pending.items()):
            if SERVICES[name].ready(svc):
                if name in starting:
                    svc.helpers = [p for p in session_members(svc.pgid) if p != svc.pid]
                    log.info("%s up at %s (pid %d, %d helper processes)", name, svc.address, svc.pid,
                             len(svc.helpers))
                pending.pop(name)
            elif not _alive(svc):
                _stop(svc, leader_first=False)
                state.pop(name, None)
                state.update({k: v for k, v in starting.items() if k != name})
                _write_state(state)
                what = "exited while starting" if name in starting else f"exited (pid {svc.pid}, running before)"
                raise PlatformError(f"{name}: {what}; last lines of {svc.log}:\n{_tail(Path(svc.log))}")
        if pending and time.monotonic() > deadline:
            names = [name if name in starting else f"{name} (running already, pid {pending[name].pid})"
                     for name in pending]
            hint = ("`deepindex down` stops what was started" if not set(pending) & set(running) else
                    "`deepindex down` stops the platform, `deepindex up` then starts it afresh")
            raise PlatformError(f"{', '.join(names)}: not ready after {timeout:.0f}s; see {platform_dir()}/*.log "
                                f"({hint})")
        if pending:
            time.sleep(0.3)
    state.update(starting)
    _write_state(state)
    return state


def _other_options(name: str, svc: Service, port: int, opts: UpOptions) -> list[str]:
    """The options asked for that the running service ``svc`` was not started with: ``--num-cpus 4 (asked
    for 8)``.  Its port is compared when one other than 0 and the default was asked for."""
    kind = SERVICES[name]
    asked = {kind.flag: _given(port, kind.default_port), **kind.asked(opts)}
    has = {kind.flag: svc.port, **svc.options}
    return [f"{flag} {has[flag]} (asked for {value})" for flag, value in asked.items()
            if value is not None and flag in has and has[flag] != value]


def down() -> dict[str, list[int]]:
    """Stop every recorded service's session; returns the pids stopped per service."""
    if not (state_dir() / "platform").is_dir():
        return {}  # never started here (and no folder is made for that)
    with _state_lock():  # an `up` running meanwhile records what it starts first: this stops it too
        state = read_state()
        f = state_dir() / "platform" / "state.json"
        if not state and f.is_file() and f.read_text(errors="replace").strip() not in ("", "{}"):
            # Removed, it would leave the services it names running with no record of them (found on review).
            raise PlatformError(f"{f} does not read (damaged, or another version's): nothing stopped and the file "
                                "left in place; the services it names may still run (their pids are in it)")
        stopped: dict[str, list[int]] = {}
        for name, svc in state.items():
            kind = SERVICES.get(name)
            stopped[name] = _stop(svc, leader_first=kind is not None and kind.stop_leader_first)
            if stopped[name]:
                log.debug("%s: stopped %d processes", name, len(stopped[name]))
            else:
                log.info("%s: was not running", name)
        for f in (state_dir() / "platform" / "state.json", _serve_file()):
            if f.exists():
                f.unlink()
        return stopped


def status() -> dict[str, dict[str, Any]]:
    """Each recorded service: running or dead, address, every URL it serves, pids; and the Serve
    application ``deepindex serve`` recorded on this platform, with whether it answers."""
    out: dict[str, dict[str, Any]] = {}
    for name, svc in read_state().items():
        members = session_members(svc.pgid) if _ours(svc) else []
        alive = svc.pid in members
        info: dict[str, Any] = {"state": "running" if alive else "dead", "address": svc.address,
                                "urls": svc.urls or {name: svc.address}, "pid": svc.pid,
                                "processes": members, "log": svc.log}
        kind = SERVICES.get(name)
        if alive and kind is not None and kind.health is not None:
            info["healthy"] = kind.health(svc)
        if not alive:
            info["hint"] = "the process died; `deepindex up` starts it again (see its log)"
        out[name] = info
    served = read_serve()
    if served is not None:
        out["serve"] = {"state": "answering" if serve_answers(served) else "not answering", "address": served["url"],
                        "urls": {"serve": served["url"], "docs": served["url"] + "/docs"}, "app": served["app"],
                        "since": served["since"]}
    return out


def platform_urls() -> dict[str, str]:
    """Every address of the running platform by name: ray, dashboard, client, mlflow (and serve)."""
    urls: dict[str, str] = {}
    for name in SERVICES:
        svc = running_service(name)
        if svc is not None:
            urls.update(svc.urls or {name: svc.address})
    served = read_serve()
    if served is not None:
        urls["serve"] = served["url"]
    return urls


def client_env() -> dict[str, str]:
    """What `ray status`, `ray job submit`, `mlflow` and deepindex's own commands need to use the
    running platform from another shell (``deepindex env`` prints it as ``export`` lines)."""
    urls = platform_urls()
    env: dict[str, str] = {}
    if "ray" in urls:
        env.update({"RAY_ADDRESS": urls["ray"], **ray_client_env()})
        if "dashboard" in urls:
            # `ray job ...` reads the first, Ray Serve's CLI (`serve status`, `serve delete APP`) the second;
            # both default to port 8265, not this head's dashboard.
            env["RAY_API_SERVER_ADDRESS"] = env["RAY_DASHBOARD_ADDRESS"] = urls["dashboard"]
    if "mlflow" in urls:
        env["MLFLOW_TRACKING_URI"] = urls["mlflow"]
    return env


# ---- the Serve application on the platform ------------------------------------------------------
def _serve_file() -> Path:
    return state_dir() / "platform" / "serve.json"


def record_serve(url: str, app: str, health_path: str = "/healthz") -> None:
    """``deepindex serve`` on this platform's head records where its application answers."""
    head = running_service("ray")
    write_file(_serve_file(), json.dumps({"url": url.rstrip("/"), "app": app, "health": health_path,
                                          "ray_pid": head.pid if head else None, "since": time.time()}))


def forget_serve() -> None:
    _serve_file().unlink(missing_ok=True)


def read_serve() -> dict[str, Any] | None:
    """The recorded Serve application while the head it was started on still runs; else None."""
    f = _serve_file()
    head = running_service("ray")
    if not f.is_file() or head is None:
        return None
    try:
        served: dict[str, Any] = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return served if served.get("ray_pid") == head.pid else None


def serve_answers(served: dict[str, Any], timeout: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(served["url"] + served.get("health", "/healthz"), timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def running_service(name: str) -> Service | None:
    """The recorded service if its main process is alive, else None (cheap: no network)."""
    svc = read_state().get(name)
    return svc if svc is not None and _alive(svc) else None
