"""The local platform keeps to loopback and keeps Ray's token authentication on.

The commands ``deepindex up`` builds (cheap, no process).  A real ``up`` is checked in
``tests/test_localplatform.py``, on the platform it starts anyway: every TCP socket its process
groups listen on, read from ``/proc``, the ports deepindex chooses (the GCS and MLflow) on 127.0.0.1
only, and a client with a wrong token refused.
"""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

WILDCARD = {"0.0.0.0", "::"}


@pytest.mark.timeout(60)
def test_commands_bind_loopback_and_keep_token_auth(monkeypatch, tmp_path):
    from deepindex import localplatform as lp

    monkeypatch.setenv("DEEPINDEX_HOME", str(tmp_path / "home"))
    # A user who turned auth off in their shell does not turn it off for the platform.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # Nor does a shell set up for a remote cluster hand the head that cluster's token or API server (Ray reads
    # RAY_AUTH_TOKEN before the token file; its Train cleaner asks RAY_API_SERVER_ADDRESS whether runs live).
    monkeypatch.setenv("RAY_AUTH_TOKEN", "remote-token")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://remote-head:8265")
    spawned: dict[str, tuple[list[str], dict[str, str]]] = {}

    class _Proc:
        pid = 999_999_999

    def spawn(name, cmd, env):
        spawned.setdefault(name, (cmd, env))
        return _Proc, tmp_path / f"{name}.log"

    monkeypatch.setattr(lp, "_spawn", spawn)
    opts = lp.UpOptions(num_cpus=2, dashboard_port=8265)
    lp._start_ray(6390, opts)
    lp._start_mlflow(5050, opts)
    ray_cmd, ray_env = spawned["ray"]
    ml_cmd, _ = spawned["mlflow"]
    flags = dict(a.split("=", 1) for a in ray_cmd if a.startswith("--") and "=" in a)
    assert flags["--node-ip-address"] == "127.0.0.1"
    # The dashboard (Jobs and State API, HTTP) is Ray's one web server: on loopback when it runs.
    assert flags.get("--include-dashboard") == "false" or flags.get("--dashboard-host") == "127.0.0.1", flags
    assert ml_cmd[ml_cmd.index("--host") + 1] == "127.0.0.1"
    assert not any(h in " ".join(ray_cmd + ml_cmd) for h in WILDCARD)
    assert ray_env["RAY_AUTH_MODE"] == "token"
    token = Path(ray_env["RAY_AUTH_TOKEN_PATH"])
    assert len(token.read_text().strip()) == 64  # 256 bits
    assert stat.S_IMODE(token.stat().st_mode) == 0o600  # readable by its owner only
    assert lp.ray_client_env()["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_TOKEN" not in ray_env and ray_env["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:8265"
    # The dashboard agent's HTTP port off Ray's fixed 52365: a second Ray on the machine holding it left the
    # head's agent without its HTTP server, and the Jobs API answered "No available agent" (found on review).
    assert flags["--dashboard-agent-listen-port"] != "52365"
