"""`deepindex up` / `down` / `status` / `env`: a real Ray head and MLflow server, stopped by process group."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepindex.cli import main
from deepindex.localplatform import read_state
from deepindex.net import free_port
from deepindex.sessions import session_members
from support import BIN, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.mlflow]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPINDEX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path / "home"
    main(["down"])  # whatever a failing test left running


def _platform_pids() -> list[int]:
    return [p for svc in read_state().values() for p in session_members(svc.pgid)]


@pytest.mark.timeout(300)
def test_up_down_twice_leaves_no_stray_process(home, capsys):
    seen: list[int] = []
    groups: list[int] = []
    for _ in range(2):
        dashboard = free_port()
        ports = ["--ray-port", str(free_port()), "--mlflow-port", str(free_port()), "--num-cpus", "2",
                 "--dashboard-port", str(dashboard)]
        assert main(["up", *ports]) == 0
        first = read_state()
        assert set(first) == {"ray", "mlflow"}
        assert any(len(session_members(s.pgid)) > 1 for s in first.values())  # helpers are in the groups
        assert main(["up", *ports]) == 0  # idempotent: the same processes, nothing new started
        assert {k: v.pid for k, v in read_state().items()} == {k: v.pid for k, v in first.items()}
        capsys.readouterr()
        assert main(["status"]) == 0
        status = capsys.readouterr().out
        for url in (first["ray"].address, f"http://127.0.0.1:{dashboard}", "ray://127.0.0.1:", first["mlflow"].address,
                    "workflowType=machine_learning"):
            assert url in status, status
        groups += [s.pgid for s in first.values()]
        seen += _platform_pids()
        if len(groups) == 2:  # first round only: another shell reaches the platform with `deepindex env` alone
            _ray_cli_through_deepindex_env(home, dashboard)

        # A client of this head: token auth is on, so it needs the token `up` wrote.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        code = ("from deepindex.cluster import connect; import ray; connect(); "
                "print(int(ray.cluster_resources()['CPU']))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == "2", out.stderr[-2000:]
        if len(groups) == 2:  # first round only: a refused client waits for its connect timeout
            bad = subprocess.run([sys.executable, "-c", "import ray, os; ray.init(address=os.environ['A'])"],
                                 env={**env, "A": first["ray"].address, "RAY_AUTH_MODE": "token",
                                      "RAY_AUTH_TOKEN": "0" * 64}, capture_output=True, text=True, timeout=120)
            assert bad.returncode != 0  # a wrong token is refused

        assert main(["down"]) == 0
        assert main(["down"]) == 0  # idempotent
        assert read_state() == {}
        assert all(not session_members(g) for g in groups)
    alive = [p for p in seen if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
    assert alive == [], alive
    assert "was not running" in capsys.readouterr().out


def _ray_cli_through_deepindex_env(home: Path, dashboard: int) -> None:
    """`ray status` and `ray job list` as a user runs them: nothing but `eval $(deepindex env)`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    script = 'eval "$(deepindex env)" && env | grep -E "^(RAY|MLFLOW)_" | sort && ray status && ray job list'
    out = subprocess.run(["bash", "-c", script], env={**env, "PATH": f"{BIN}:{env['PATH']}"}, cwd=home.parent,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    exported = dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith(("RAY_", "MLFLOW_")))
    assert exported["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{dashboard}"
    assert exported["RAY_AUTH_MODE"] == "token" and Path(exported["RAY_AUTH_TOKEN_PATH"]).is_file()
    assert {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"} <= set(exported)
    assert "Active:" in out.stdout and "CPU" in out.stdout  # ray status reached the head
    assert f"http://127.0.0.1:{dashboard}" in out.stdout + out.stderr  # ray job list used the Jobs API


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rfind(")") + 2]


@pytest.mark.timeout(120)
def test_a_port_in_use_is_reported_and_nothing_starts(home, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["up", "--mlflow-port", str(port), "--ray-port", str(free_port()),
                     "--dashboard-port", str(free_port())]) == 1
        assert f"mlflow: port 127.0.0.1:{port} is in use" in capsys.readouterr().err
        # The dashboard's fixed port too, named with the option that moves it.
        assert main(["up", "--dashboard-port", str(port), "--ray-port", str(free_port()),
                     "--mlflow-port", str(free_port())]) == 1
        assert f"ray: port 127.0.0.1:{port} is in use by another process; choose another with --dashboard-port" \
            in capsys.readouterr().err
    assert read_state() == {}  # every port is checked before anything starts


@pytest.mark.timeout(180)
def test_a_dead_service_is_reported_and_restarted(home, capsys):
    import signal

    from deepindex.localplatform import up

    first = up(mlflow_port=0, services=("mlflow",))["mlflow"]
    os.killpg(first.pgid, signal.SIGKILL)
    wait_until(lambda: not session_members(first.pgid), 10, what="the killed server's session gone")
    assert main(["status", "--json"]) == 1
    assert '"state": "dead"' in capsys.readouterr().out
    assert main(["status"]) == 1
    assert "mlflow: dead" in capsys.readouterr().out
    again = up(mlflow_port=0, services=("mlflow",))["mlflow"]
    assert again.pid != first.pid and session_members(again.pgid)
