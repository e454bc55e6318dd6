"""A real MLflow tracking server on a free loopback port (sqlite + local artifacts in a tmp dir),
and what the tracking/tune tests use with it: ``TINY`` config overrides, a local Ray cluster
(``ray_local``) and an isolated state dir (``deepindex_home``).

``mlflow_server`` is one server for the whole test session; ``start_mlflow_server`` starts a
private one (a test that kills its server).  The server runs in its own session, so it and
its uvicorn worker form one process group that ``stop`` ends by id.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from deepindex.net import free_port
from deepindex.sessions import session_members


@dataclass
class MlflowServer:
    uri: str
    pid: int
    root: Path
    proc: subprocess.Popen

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the server's process group (``SIGKILL`` to simulate a crash)."""
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


def start_mlflow_server(root: Path, timeout: float = 90.0) -> MlflowServer:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)
    server = MlflowServer(f"http://127.0.0.1:{port}", proc.pid, root, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}); see {root / 'server.log'}")
        try:
            if requests.get(server.uri + "/health", timeout=1).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.3)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"mlflow server not healthy after {timeout}s; see {root / 'server.log'}")


_shared: MlflowServer | None = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """One server per test session, however many conftests import this fixture."""
    global _shared
    if _shared is None or _shared.proc.poll() is not None:
        _shared = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
        atexit.register(_shared.stop)  # the last user may be any directory's session fixture
    return _shared


# Small enough for a 2-core machine: 8x8 digits, a 2-block ConvNet, one half-CPU worker.
TINY = ["data.dataset=digits", "data.train_size=1000", "data.val_size=300", "data.test_size=300",
        "model.channels=[8,16]", "model.embed_dim=32", "train.batch_size=32", "ray.num_workers=1",
        "ray.cpus_per_worker=0.5", "ray.max_failures=0"]


@pytest.fixture
def deepindex_home(tmp_path, monkeypatch):
    """Its own state dir for a test; never a developer's MLflow server or Ray cluster.
    (tests/tracking and tests/tune use it for every test, through their conftest.)"""
    monkeypatch.setenv("DEEPINDEX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster with more logical CPUs than cores (Train + Tune need them)."""
    import ray

    if ray.is_initialized():  # another module's cluster: reuse it, leave it running
        yield
        return
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()
