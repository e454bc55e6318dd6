"""Helpers shared by the tests (``pythonpath = ["tests"]`` in pyproject.toml); the fixtures are in conftest.py.

- ``TINY``: the one tiny training config (dotted overrides) the tests start from, plus the worker
  layouts they add to it;
- :func:`wait_until`: the one polling loop (no fixed sleeps: a test waits for the state it needs);
- :func:`start_mlflow_server`: a real MLflow tracking server on a free loopback port, stopped by its
  process group;
- process helpers for tests that kill real processes;
- :func:`require_tool`: a system tool a test drives (Chromium, kubectl), or a clear failure.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from deepindex.collection.imports import png_bytes  # noqa: F401 - re-exported: the tests encode images with it
from deepindex.net import free_port
from deepindex.sessions import session_members, signal_session

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # this venv's console scripts: ray, mlflow, deepindex

# Small enough for a 2-core machine: 8x8 single-label digits, a 2-block ConvNet, 2 epochs.
TINY = ["data.dataset=digits", "data.train_size=600", "data.val_size=200", "data.test_size=200",
        "model.channels=[8,16]", "model.embed_dim=32", "train.batch_size=64", "train.epochs=2"]
# Worker layouts: one half-CPU worker that fails fast (tracking, sweeps), or two DDP workers.
ONE_WORKER = ["ray.num_workers=1", "ray.cpus_per_worker=0.5", "ray.max_failures=0"]
TWO_WORKERS = ["ray.num_workers=2", "ray.cpus_per_worker=1", "train.threads=1"]

T = TypeVar("T")

# Tools `make test` could not install on this machine (.ci/tools), comma-separated.
MISSING_TOOLS_ENV = "DEEPINDEX_MISSING_TOOLS"
TOOL_SKIP = "not installed on this machine"  # in the reason of every skip for a missing tool


def collection_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """``deepindex collection ARGV...`` in this process: (exit code, stdout, stderr) as ``capsys`` caught them."""
    from deepindex.cli import main

    rc = main(["collection", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def require_tool(name: str, binaries: tuple[str, ...], how: str) -> str:
    """The path of a system tool a test drives.  Missing, the test fails saying how to get it,
    unless `make test` found that the tool cannot be had here: then it is skipped, and the end of
    the run lists it with that reason (tests/conftest.py)."""
    import pytest

    for b in binaries:
        path = shutil.which(b)
        if path:
            return path
    declared = {t.strip() for t in os.environ.get(MISSING_TOOLS_ENV, "").split(",") if t.strip()}
    if name in declared:
        pytest.skip(f"{name} {TOOL_SKIP} (`make test` could not install it): {how}")
    pytest.fail(f"{name} is not installed: {how}. `make test` installs it where it can (.ci/tools)", pytrace=False)


def wait_until(predicate: Callable[[], T], timeout: float, every: float = 0.1,
               alive: Callable[[], bool] | None = None, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    Fails the test after ``timeout`` seconds (naming ``what``), or as soon as ``alive()`` turns
    False (the process the test waits on died first).
    """
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if alive is not None and not alive():
            raise AssertionError(f"gave up waiting{' for ' + what if what else ''}: the process it needs exited")
        if time.monotonic() >= deadline:
            raise AssertionError(f"not reached within {timeout:.0f}s{': ' + what if what else ''}")
        time.sleep(every)


# ---- the session's Ray cluster -------------------------------------------------------------------
ray_started_here = False


class ConsoleEvents(logging.Handler):
    """The console's event lines (the ``deepindex.events`` logger) while in the ``with`` block;
    ``then`` (settable) runs once, on the first line."""

    def __init__(self, then: Callable[[], object] | None = None) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.then = then
        self.logger = logging.getLogger("deepindex.events")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if self.then is not None and len(self.lines) == 1:
            self.then()

    def __enter__(self) -> ConsoleEvents:
        self.level = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


@contextlib.contextmanager
def cpus_held(leave: float) -> Iterator[Any]:
    """An actor holding all but ``leave`` of the cluster's free CPUs (a running service, as far as Ray
    can tell); yields its handle and kills it on exit.  The driver's view of free resources follows
    the raylets' reports, so both ways this waits for the view to show the change (not a fixed time)."""
    import ray

    @ray.remote
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.options(num_cpus=ray.available_resources().get("CPU", 0.0) - leave).remote()
    ray.get(holder.ping.remote())
    wait_until(lambda: ray.available_resources().get("CPU", 0.0) <= leave + 1e-6, timeout=60,
               what="the cluster's resource view to show the held CPUs")
    try:
        yield holder
    finally:
        ray.kill(holder)
        wait_until(lambda: ray.available_resources().get("CPU", 0.0) > leave + 1e-6, timeout=60,
                   what="the held CPUs free again")


def ensure_ray() -> None:
    """The session's local Ray cluster: 4 logical CPUs on 2 cores (Train + Tune need more logical CPUs
    than cores), started with the Serve data plane's environment so the serving tests run on it as
    `deepindex up` would.  Started on first use, or again after a test closed it."""
    import ray

    global ray_started_here
    if ray.is_initialized():
        return
    from deepindex.cluster import start_local_cluster

    saved = dict(os.environ)
    try:
        start_local_cluster(4, log_to_driver=False)  # the cluster's processes inherit its environment
    finally:
        os.environ.clear()
        os.environ.update(saved)  # later tests start from a clean environment
    ray_started_here = True


@contextlib.contextmanager
def two_node_cluster(cpus_per_node: int = 2) -> Iterator[Any]:
    """A head and one worker node on this machine (``ray.cluster_utils.Cluster``), this process
    connected to it; any Ray this process had is shut down first, and both nodes after."""
    import ray
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray.cluster_utils import Cluster

    from deepindex.cluster import reload_ray_auth

    if ray.is_initialized():
        ray.shutdown()
    # Token auth on for both nodes and this driver, explicitly: a driver that started a local
    # cluster before (ensure_ray) keeps token mode cached, and nodes started without it would have
    # their calls to it refused (a Train controller then dies before it starts).
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    reload_ray_auth()
    # ... and a token: ray.init of a new local cluster makes ~/.ray/auth_token when it is missing,
    # Cluster() does not, and on a machine where no Ray ran yet its GCS would abort at start.
    ensure_token_if_auth_enabled()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


# ---- processes ------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Running (a zombie has exited; it only waits for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def processes_of(root: Path) -> list[int]:
    """Live processes other than this one that were started for a test under ``root``: their
    ``DEEPINDEX_HOME`` lies there (every test's state folder, which Ray's processes inherit from the
    driver that started their cluster)."""
    prefix = str(root).rstrip("/").encode() + b"/"
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        home = next((e.removeprefix(b"DEEPINDEX_HOME=") for e in env if e.startswith(b"DEEPINDEX_HOME=")), None)
        if home is not None and (home + b"/").startswith(prefix) and pid_alive(int(d.name)):
            out.append(int(d.name))
    return sorted(out)


def stop_leftovers(root: Path, grace: float = 10.0) -> list[str]:
    """Kill, by pid, what :func:`processes_of` still finds after ``grace`` seconds (a process on its
    way out gets them); returns a line for each: its pid, name and the test it was started in."""
    deadline = time.monotonic() + grace
    while (left := processes_of(root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = []
    for pid in left:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            test = next((e.removeprefix(b"PYTEST_CURRENT_TEST=").decode(errors="replace") for e in env
                         if e.startswith(b"PYTEST_CURRENT_TEST=")), "?")
            os.kill(pid, signal.SIGKILL)
        except OSError:  # ProcessLookupError too: gone meanwhile
            continue
        lines.append(f"pid {pid} {name} (started in {test})")
    return lines


def kill_session(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
    """Signal a process started with ``start_new_session=True`` (its process group) and wait until its
    session is empty (a test's processes never outlive it).  With ``SIGKILL``, a crash, every member
    of the session is killed too: Ray's workers sit in process groups of their own and would
    otherwise live on until they notice that their raylet is gone (tens of seconds on a busy box)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout)

    def gone() -> bool:
        if sig == signal.SIGKILL:
            signal_session(proc.pid, signal.SIGKILL)
        return not session_members(proc.pid)

    wait_until(gone, timeout, what=f"session {proc.pid} to end")


# ---- MLflow ---------------------------------------------------------------------------------------
@dataclass
class MlflowServer:
    uri: str
    pid: int
    root: Path
    proc: subprocess.Popen

    @property
    def port(self) -> int:
        return int(self.uri.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the server's session (``SIGKILL`` to simulate a crash)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while session_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if session_members(self.pid):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_mlflow_server(root: Path, port: int | None = None, timeout: float = 90.0) -> MlflowServer:
    """A real MLflow server (SQLite + local artifacts under ``root``) in a session of its own, so it and
    its uvicorn worker are stopped by one id.  ``port`` restarts a server at a known address."""
    import requests

    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)
    server = MlflowServer(f"http://127.0.0.1:{port}", proc.pid, root, proc)

    def healthy() -> bool:
        try:
            return requests.get(server.uri + "/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(healthy, timeout, every=0.3, alive=lambda: proc.poll() is None,
                   what=f"mlflow server healthy (see {root / 'server.log'})")
    except AssertionError:
        server.stop(signal.SIGKILL)
        raise
    return server


# ---- images ---------------------------------------------------------------------------------------


# ---- a tracking server that fails at a known point -------------------------------------------------
HEALTH_HOLD_S = 120  # the longest MlflowOutage holds a /health probe for the server's restart


class MlflowOutage:
    """An HTTP proxy in front of a real MLflow server that crashes it at a known point of a run.

    Clients use ``proxy.uri``.  When a run logs the metrics of epoch ``at_step`` (the first
    ``log-batch`` holding a metric with that step), the server is SIGKILLed before the request
    reaches it, and from then on every request fails (connection refused behind the proxy: 502)
    until :meth:`restart` brings the server back on the same port and store.  With
    ``health_waits_for_restart`` the ``/health`` probe a client makes before its final logging
    waits for the restart instead of failing, so "the server was back before the run ended" is
    exercised deterministically whatever the speed of the training and of the restart: the client
    must wait that long too (its probe waits ``MLFLOW_HTTP_REQUEST_TIMEOUT``; set it above
    :data:`HEALTH_HOLD_S`).  Not a fake: every request
    that is answered, is answered by the real server; the proxy only decides when it dies.
    """

    def __init__(self, server: MlflowServer, at_step: int, health_waits_for_restart: bool = False) -> None:
        import threading
        from http.server import ThreadingHTTPServer

        self.server: MlflowServer | None = server
        self.root, self.port_behind = server.root, server.port
        self.at_step, self.health_waits = at_step, health_waits_for_restart
        self.killed = threading.Event()
        self.back = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def _crash_if_due(self, path: str, body: bytes) -> None:
        import json as _json

        if self.killed.is_set() or not path.endswith("/runs/log-batch"):
            return
        try:
            steps = {m.get("step") for m in _json.loads(body or b"{}").get("metrics", [])}
        except ValueError:
            return
        if self.at_step in steps:
            with self._lock:
                if not self.killed.is_set() and self.server is not None:
                    self.server.stop(signal.SIGKILL)  # a crash, not a clean shutdown
                    self.killed.set()

    def restart(self) -> MlflowServer:
        self.server = start_mlflow_server(self.root, port=self.port_behind)
        self.back.set()
        return self.server

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self.server is not None:
            self.server.stop(signal.SIGKILL)

    def _handler(self) -> type:
        from http.server import BaseHTTPRequestHandler

        import requests

        outage = self

        class Forward(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet: the test prints what matters
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outage._crash_if_due(self.path, body)
                if outage.health_waits and outage.killed.is_set() and self.path.startswith("/health"):
                    outage.back.wait(HEALTH_HOLD_S)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                try:
                    r = requests.request(self.command, f"http://127.0.0.1:{outage.port_behind}{self.path}",
                                         data=body, headers=headers, timeout=60)
                    status, content, ctype = r.status_code, r.content, r.headers.get("Content-Type", "")
                except requests.RequestException:
                    status, content, ctype = 502, b'{"error": "mlflow server down"}', "application/json"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        return Forward
