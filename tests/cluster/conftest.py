"""A real 2-node Ray cluster on this machine (separate ``ray start`` processes, token auth on) and a
real MLflow tracking server, shared by the tests of one module.

Other people run Ray on the same machine, so nothing here uses Ray's default ports, temp dir or
token file, and nothing is stopped with ``ray stop`` (which stops every Ray on the machine): the
nodes run under ``ray start --block`` in their own process groups and are stopped by the recorded
process ids (the groups plus every descendant, e.g. Ray workers, which get groups of their own).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from deepindex.net import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: ray, mlflow
RAY = str(BIN / "ray")

# Tiny training runs: 2 workers x 1 CPU, one per node (STRICT_SPREAD fails rather than packs).
TINY_TRAIN = ["data.dataset=digits", "data.train_size=600", "data.val_size=200", "data.test_size=200",
              "train.epochs=1", "model.channels=[8,16]", "ray.num_workers=2", "ray.cpus_per_worker=1",
              "ray.placement_strategy=STRICT_SPREAD"]



def _children() -> dict[int, list[int]]:
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
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; it only waits for its parent to reap it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Proc:
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@dataclass
class RayTestCluster:
    """Head (dashboard + Jobs API on loopback) and one worker node, 2 CPUs each."""

    tmp: Path
    token: str
    gcs_port: int
    dashboard_port: int
    procs: list[Proc] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)  # head first

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def storage(self) -> Path:
        return self.tmp / "shared" / "ray_results"

    def env(self, *, auth_mode: bool = True, **extra: str) -> dict[str, str]:
        """The environment of the nodes and of the CLI clients; ``auth_mode=False`` leaves only the
        token file, as a user who has a token but did not set ``RAY_AUTH_MODE`` would."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE",
                            "MLFLOW_TRACKING_URI")}
        env.update(RAY_AUTH_TOKEN_PATH=str(self.tmp / "auth_token"), RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
                   DEEPINDEX_HOME=str(self.tmp / "home"))
        if auth_mode:
            env["RAY_AUTH_MODE"] = "token"
        env.update(extra)
        return env

    # ---- lifecycle ---------------------------------------------------------------------------
    def _start_node(self, name: str, args: list[str]) -> Proc:
        log = self.tmp / f"{name}.log"
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                 "--min-worker-port=0", "--max-worker-port=0"]  # 0: any free port, never the default range
        popen = subprocess.Popen(
            [RAY, "start", "--block", "--num-cpus=2", f"--temp-dir={self.tmp / name}", "--disable-usage-stats",
             *ports, *args],
            env=self.env(), cwd=self.tmp, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(popen, log)
        self.procs.append(proc)
        return proc

    def _check_alive(self, proc: Proc) -> None:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.popen.returncode}:\n{proc.tail()}")

    def nodes(self) -> list[dict]:
        r = requests.get(f"{self.address}/api/v0/nodes", headers=self.headers, timeout=30)
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def start(self, timeout_s: float = 150) -> None:
        deadline = time.monotonic() + timeout_s
        head = self._start_node("head", [
            "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"])
        while True:  # the Jobs API is up when the dashboard answers
            self._check_alive(head)
            try:
                if requests.get(f"{self.address}/api/version", headers=self.headers, timeout=10).ok:
                    break
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"head not up after {timeout_s}s:\n{head.tail()}")
            time.sleep(0.5)
        worker = self._start_node("worker", [f"--address=127.0.0.1:{self.gcs_port}"])
        while True:
            self._check_alive(worker)
            try:
                alive = self.nodes()
            except requests.RequestException:
                alive = []
            if len(alive) == 2:
                self.node_ids = [n["node_id"] for n in sorted(alive, key=lambda n: not n["is_head_node"])]
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker node not up after {timeout_s}s:\n{worker.tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM each node's process group, then SIGKILL whatever of it (and its descendants) is left."""
        pids = []
        for p in self.procs:
            pids += [p.popen.pid, *descendants(p.popen.pid)]
        for p in self.procs:
            try:
                os.killpg(p.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
            time.sleep(0.5)
        for p in self.procs:
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.popen.wait(timeout=30)

    # ---- helpers for the tests ---------------------------------------------------------------
    def ray_cli(self, *args: str, timeout: float = 240, check: bool = False, **env: str) -> subprocess.CompletedProcess:
        out = subprocess.run([RAY, *args], cwd=ROOT, env=self.env(**env), capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def deepindex(self, *args: str, timeout: float = 240, auth_mode: bool = False,
                  **env: str) -> subprocess.CompletedProcess:
        # By default without RAY_AUTH_MODE: `deepindex submit` must find and send the token itself.
        return subprocess.run([sys.executable, "-m", "deepindex.cli", *args], cwd=ROOT,
                              env=self.env(auth_mode=auth_mode, **env), capture_output=True, text=True,
                              timeout=timeout)

    def job_info(self, job_id: str) -> dict:
        r = requests.get(f"{self.address}/api/jobs/{job_id}", headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def wait_job(self, job_id: str, timeout_s: float = 240) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job_info(job_id)
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['status']} after {timeout_s}s")
            time.sleep(1)

    def train_workers(self, ray_job_id: str) -> list[dict]:
        """The Ray Train worker actors of one Ray job (``ray list actors``, through the State API)."""
        out = self.ray_cli("list", "actors", "--address", self.address, "--filter", "class_name=RayTrainWorker",
                           "--filter", f"job_id={ray_job_id}", "--detail", "--format", "json", "--limit", "1000",
                           check=True, timeout=60)
        # Warnings may precede the JSON on stdout; no match at all prints nothing.
        start = out.stdout.find("[")
        return json.loads(out.stdout[start:]) if start >= 0 else []


@pytest.fixture(scope="module")
def mlflow_server():
    """A real MLflow tracking server (SQLite backend, local artifact store) on a free loopback port."""
    tmp = Path(tempfile.mkdtemp(prefix="di-mlflow-"))
    port = free_port()
    log = tmp / "mlflow.log"
    popen = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
         "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    uri = f"http://127.0.0.1:{port}"
    try:
        yield popen, uri, log
    finally:
        pids = [popen.pid, *descendants(popen.pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                if pid_alive(pid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            try:
                popen.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(tmp, ignore_errors=True)


def wait_http_ok(url: str, popen: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if popen.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {popen.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=10).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not up after {timeout_s}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(mlflow_server):
    """(cluster, tracking URI): the 2-node cluster and the MLflow server, started side by side."""
    popen, uri, log = mlflow_server
    # Short path: Ray's unix sockets live under the temp dir and sun_path holds ~107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="di-", dir="/tmp"))
    token = secrets.token_hex(32)
    (tmp / "auth_token").write_text(token)
    (tmp / "auth_token").chmod(0o600)
    cluster = RayTestCluster(tmp=tmp, token=token, gcs_port=free_port(), dashboard_port=free_port())
    try:
        cluster.start()
        wait_http_ok(f"{uri}/health", popen, log)
        yield cluster, uri
    finally:
        cluster.stop()
        if os.environ.get("DEEPINDEX_KEEP_TEST_CLUSTER"):
            print(f"cluster files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
