"""`deepindex serve` as `make demo` runs it: the local platform, the registry's champion, HAProxy.

Run from a project folder with no DEEPINDEX_HOME and no MLFLOW_TRACKING_URI, as a user would:
the Serve replicas run in Ray's worker folders, so they must be told where MLflow is.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from support import REPO, pid_alive

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.cluster, pytest.mark.mlflow, pytest.mark.timeout(600)]


def _cli(project: Path, env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "deepindex"  # the console script of this venv
    out = subprocess.run([str(exe), *args], cwd=project, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"deepindex {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def _console(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]


def _champion(uri: str, ckpt: Path) -> str:
    """The session's small trained model registered as `deepindex` version 1, alias champion."""
    from mlflow.tracking import MlflowClient

    from deepindex.workflows import promote

    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("serve-command"), run_name="candidate")
    client.log_artifact(run.info.run_id, str(ckpt), "checkpoint")
    client.set_terminated(run.info.run_id)
    decision = promote(run.info.run_id, "deepindex", uri)
    assert decision.promoted
    return decision.version


def test_serve_command_serves_the_champion_behind_haproxy(tmp_path, monkeypatch, small_model):
    from deepindex.net import free_port
    from deepindex.tracking.uri import resolve_tracking_uri

    project = tmp_path / "project"
    project.mkdir()
    haproxy: list[int] = []
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEEPINDEX_HOME", "MLFLOW_TRACKING_URI") and not k.startswith("RAY_")}
    up = _cli(project, env, "up", "--num-cpus", "4", "--ray-port", str(free_port()), "--mlflow-port", str(free_port()),
              "--dashboard-port", str(free_port()))
    assert _console(up)[0].startswith("platform up: Ray head 127.0.0.1:"), up.stderr
    try:
        # This test process finds the same platform through the project's state folder.
        monkeypatch.setenv("DEEPINDEX_HOME", str(project / ".deepindex"))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = resolve_tracking_uri(warn=False)
        assert uri and uri.startswith("http://127.0.0.1:")
        version = _champion(uri, small_model)
        imported = _cli(project, env, "collection", "import", "digit-scenes", "--digit-scenes", "--size", "300")
        assert "imported 300 items into digit-scenes" in imported.stdout + imported.stderr

        port = free_port()
        # No index exists yet: the service builds the champion's from the collection before it is ready.
        served = _cli(project, env, "serve", "--detach", "--config", str(REPO / "serving" / "config.yaml"),
                      "--model", "models:/deepindex@champion", "--collection", "digit-scenes",
                      "--host", "127.0.0.1", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        # A quiet console: the service's URL and how to write; Serve's and its replicas' output is in the log file.
        lines = _console(served)
        assert len(lines) == 2 and lines[0].split(" (")[0] == f"service ready: {url}/", lines
        assert lines[1].startswith("writes (POST/DELETE /v1/items) need: Authorization: Bearer"), lines
        (log,) = (project / ".deepindex" / "logs").glob("serve-*.log")
        assert "ServeController" in log.read_text()
        status = _cli(project, env, "status").stdout
        assert "serve: answering" in status and f"serve      {url}" in status, status
        from support import wait_until

        wait_until(lambda: requests.get(f"{url}/readyz", timeout=30).status_code == 200, 240,
                   what="the service to build its first index and be ready")
        ready = requests.get(f"{url}/readyz", timeout=60)
        body = ready.json()
        assert body["model"]["version"] == version and body["index"]["count"] == 300

        from deepindex.index.collection import digit_gallery
        from support import png_bytes

        tag = requests.post(f"{url}/v1/tag", files={"images": ("a.png", png_bytes(digit_gallery(1, seed=5).images[0]))},
                            timeout=60)
        assert tag.status_code == 200 and tag.json()["model"]["version"] == version
        assert len(tag.json()["results"][0]["concepts"]) == 10
        listeners = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert '"haproxy"' in listeners, listeners
        haproxy = [int(p) for p in re.findall(r'"haproxy",pid=(\d+)', listeners)]
    finally:
        _cli(project, env, "down", timeout=120)
    # HAProxy is a child of a Ray worker, not a worker: `down` must stop it too (it holds the port).
    assert not [p for p in haproxy if pid_alive(p)], f"haproxy {haproxy} outlived `deepindex down`"
