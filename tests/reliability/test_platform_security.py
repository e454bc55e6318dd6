"""The local platform keeps to loopback and keeps Ray's token authentication on.

First the commands ``deepindex up`` builds (cheap, no process); then a real ``up``: every TCP socket
its process groups listen on, read from ``/proc``, and the ports deepindex chooses (the GCS and
MLflow) on 127.0.0.1 only.  (``tests/test_localplatform.py`` shows a client with a wrong token is
refused.)
"""
from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.mlflow]

WILDCARD = {"0.0.0.0", "::"}


@pytest.mark.timeout(60)
def test_commands_bind_loopback_and_keep_token_auth(monkeypatch, tmp_path):
    from deepindex import localplatform as lp

    monkeypatch.setenv("DEEPINDEX_HOME", str(tmp_path / "home"))
    # A user who turned auth off in their shell does not turn it off for the platform.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
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


# ---- a real `up`: what listens where ------------------------------------------------------
def _listening() -> dict[int, tuple[str, int]]:
    """socket inode -> (address, port) of every listening TCP socket on the machine."""
    out = {}
    for f, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A":  # LISTEN
                continue
            hexaddr, hexport = parts[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw)
            if v6 and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            out[int(parts[9])] = (str(addr), int(hexport, 16))
    return out


def _sockets_of(pid: int, listening: dict[int, tuple[str, int]]) -> list[tuple[str, int]]:
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inode = int(link[8:-1])
            if inode in listening:
                found.append(listening[inode])
    return found


def _name(pid: int) -> str:
    """The program: its executable, or for a Python process the script or module it runs."""
    try:
        argv = [a for a in Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0") if a]
    except OSError:
        return "?"
    if argv and "python" in argv[0].rsplit("/", 1)[-1]:
        rest = argv[1:]
        if "-m" in rest and rest.index("-m") + 1 < len(rest):
            return rest[rest.index("-m") + 1]
        scripts = [a for a in rest if a.endswith(".py")]
        return scripts[0].rsplit("/", 1)[-1] if scripts else "python"
    return argv[0].rsplit("/", 1)[-1][:40] if argv else "?"


def _flag(pid: int, name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` on a process's command line."""
    try:
        argv = [a for a in Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0") if a]
    except OSError:
        return None
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


@pytest.mark.timeout(300)
def test_up_listens_on_loopback(monkeypatch, tmp_path):
    from deepindex.localplatform import down, up
    from deepindex.net import free_port
    from deepindex.sessions import session_members

    monkeypatch.setenv("DEEPINDEX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        state = up(ray_port=free_port(), mlflow_port=free_port(), num_cpus=1)
        listening = _listening()
        sockets = {name: {(_name(p), p): _sockets_of(p, listening) for p in session_members(svc.pgid)}
                   for name, svc in state.items()}
        dashboard_ports = [_flag(p, "--port") for p in session_members(state["ray"].pgid) if _name(p) == "dashboard.py"]
    finally:
        down()
    flat = {name: sorted({(proc, a, port) for (proc, _), ss in procs.items() for a, port in ss})
            for name, procs in sockets.items()}
    print(f"listening sockets of `deepindex up`: {flat}")
    for name, svc in state.items():
        assert any(port == svc.port for _, _, port in flat[name]), f"{name}: nothing on port {svc.port}: {flat[name]}"
    # MLflow (uvicorn) is entirely deepindex's choice: loopback on every socket.
    assert all(ipaddress.ip_address(a).is_loopback for _, a, _ in flat["mlflow"]), flat["mlflow"]
    # The dashboard's HTTP server (Jobs API: it runs code) is on the host deepindex gives it: loopback.
    assert dashboard_ports and dashboard_ports[0], "no dashboard process found"
    http = [(a, port) for _, a, port in flat["ray"] if port == int(dashboard_ports[0])]
    assert http and all(ipaddress.ip_address(a).is_loopback for a, _ in http), http
    # Ray 2.60 binds its other servers (GCS and raylet gRPC, the agents, the Ray Client server, the
    # dashboard's gRPC and metrics ports) to all interfaces or the host address whatever
    # --node-ip-address says, and has no flag against it: the 256-bit token (checked on every gRPC
    # call; tests/test_localplatform.py shows a wrong token refused) is the guard, and the README
    # advises a host firewall.  A process outside this known set on a non-loopback address fails.
    ray_internal = {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard.py",
                    "monitor.py", "ray.util.client.server"}
    exposed = [s for s in flat["ray"] if not ipaddress.ip_address(s[1]).is_loopback]
    print(f"Ray listeners off loopback (Ray's own, token-guarded): {exposed}")
    assert {proc for proc, _, _ in exposed} <= ray_internal, exposed
