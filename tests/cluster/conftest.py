"""A real 2-node Ray cluster on this machine (separate ``ray start`` processes, token auth on) and a
real MLflow tracking server, shared by the tests of one module.

Other people run Ray on the same machine, so nothing here uses Ray's default ports, temp dir or
token file, and nothing is stopped with ``ray stop`` (which stops every Ray on the machine): the
nodes run under ``ray start --block`` in their own process groups and are stopped by the recorded
process ids (the groups plus every descendant, e.g. Ray workers, which get groups of their own).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from deepindex.net import free_port
from support import BIN, REPO, MlflowServer, descendants, pid_alive, wait_until

RAY = str(BIN / "ray")



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
        # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: a test cluster's nodes stop at once on SIGTERM, as
        # the local platform's head does (no 30 s drain of replicas to nodes that stop with it).
        env.update(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                   RAY_AUTH_TOKEN_PATH=str(self.tmp / "auth_token"), RAY_USAGE_STATS_ENABLED="0",
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

    def nodes(self) -> list[dict]:
        r = requests.get(f"{self.address}/api/v0/nodes", headers=self.headers, timeout=30)
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def start(self, timeout_s: float = 150) -> None:
        head = self._start_node("head", [
            "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"])

        def jobs_api_up() -> bool:  # the Jobs API is up when the dashboard answers
            try:
                return requests.get(f"{self.address}/api/version", headers=self.headers, timeout=10).ok
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                return False

        wait_until(jobs_api_up, timeout_s, every=0.5, alive=lambda: head.popen.poll() is None,
                   what=f"the head's Jobs API (log: {head.log})")
        worker = self._start_node("worker", [f"--address=127.0.0.1:{self.gcs_port}"])

        def both_alive() -> list[dict]:
            try:
                alive = self.nodes()
            except requests.RequestException:
                return []
            return alive if len(alive) == 2 else []

        alive = wait_until(both_alive, timeout_s, every=0.5, alive=lambda: worker.popen.poll() is None,
                           what=f"the worker node (log: {worker.log})")
        self.node_ids = [n["node_id"] for n in sorted(alive, key=lambda n: not n["is_head_node"])]

    def stop(self) -> None:
        """SIGTERM each node's process group, then SIGKILL whatever of it (and its descendants) is left."""
        pids = []
        for p in self.procs:
            pids += [p.popen.pid, *descendants(p.popen.pid)]
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGTERM)
        with contextlib.suppress(AssertionError):  # what SIGTERM did not stop gets SIGKILL below
            wait_until(lambda: not any(pid_alive(pid) for pid in pids), 10, every=0.2)
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGKILL)
        for pid in pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            p.popen.wait(timeout=30)

    # ---- helpers for the tests ---------------------------------------------------------------
    def ray_cli(self, *args: str, timeout: float = 240, check: bool = False, **env: str) -> subprocess.CompletedProcess:
        out = subprocess.run([RAY, *args], cwd=REPO, env=self.env(**env), capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} -> {out.returncode}\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def deepindex(self, *args: str, timeout: float = 240, auth_mode: bool = False, cwd: Path = REPO,
                  **env: str) -> subprocess.CompletedProcess:
        # By default without RAY_AUTH_MODE: `deepindex submit` must find and send the token itself.
        return subprocess.run([sys.executable, "-m", "deepindex.cli", *args], cwd=cwd,
                              env=self.env(auth_mode=auth_mode, **env), capture_output=True, text=True,
                              timeout=timeout)

    def job_info(self, job_id: str) -> dict:
        r = requests.get(f"{self.address}/api/jobs/{job_id}", headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def wait_job(self, job_id: str, timeout_s: float = 240) -> dict:
        return wait_until(lambda: (i := self.job_info(job_id))["status"] in ("SUCCEEDED", "FAILED", "STOPPED") and i,
                          timeout_s, every=1.0, what=f"job {job_id} to end")

    def train_workers(self, ray_job_id: str) -> list[dict]:
        """The Ray Train worker actors of one Ray job, from the State API (what ``ray list actors
        --filter ... --detail`` asks; over HTTP, as a poll every 2 s would cost a CLI process each)."""
        params = {"filter_keys": ["class_name", "job_id"], "filter_predicates": ["=", "="],
                  "filter_values": ["RayTrainWorker", ray_job_id], "detail": "1", "limit": "1000"}
        r = requests.get(f"{self.address}/api/v0/actors", params=params, headers=self.headers, timeout=60)
        r.raise_for_status()
        actors: list[dict] = r.json()["data"]["result"]["result"]
        return actors

    def cluster_status(self) -> str:
        """The cluster's resource usage as ``ray status`` prints it (the dashboard's formatted status)."""
        r = requests.get(f"{self.address}/api/cluster_status", params={"format": "1"}, headers=self.headers,
                         timeout=60)
        r.raise_for_status()
        status: str = r.json()["data"]["clusterStatus"]
        return status


@pytest.fixture(scope="module")
def stack(mlflow_server: MlflowServer):
    """(cluster, tracking URI): the 2-node cluster and the session's MLflow server."""
    # Short path: Ray's unix sockets live under the temp dir and sun_path holds ~107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="di-", dir="/tmp"))
    token = secrets.token_hex(32)
    (tmp / "auth_token").write_text(token)
    (tmp / "auth_token").chmod(0o600)
    cluster = RayTestCluster(tmp=tmp, token=token, gcs_port=free_port(), dashboard_port=free_port())
    try:
        cluster.start()
        yield cluster, mlflow_server.uri
    finally:
        cluster.stop()
        if os.environ.get("DEEPINDEX_KEEP_TEST_CLUSTER"):
            print(f"cluster files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
