"""`deepindex up` / `down` / `status` / `env`: a real Ray head and MLflow server, stopped by process group.

The platform a test starts is also checked for what it listens on (deepindex's own ports on
loopback; ``tests/reliability/test_platform_security.py`` checks the commands it builds).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deepindex.cli import main
from deepindex.localplatform import SERVICES, Service, _write_state, down, platform_dir, ray_temp_dir, read_state, up
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
    shutil.rmtree(ray_temp_dir(), ignore_errors=True)  # the head's sockets and logs, kept by `down` for a user


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
        if len(groups) == 2:  # first round only: another shell reaches the platform with `deepindex env` alone,
            _ray_cli_through_deepindex_env(home, dashboard)
            _check_listeners(first)  # and it listens on loopback (Ray's own guarded servers aside)
            _serve_cli_through_deepindex_env(home, dashboard)  # after: its dashboard call starts a Ray worker

        # A client of this head: token auth is on, so it needs the token `up` wrote.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        code = ("from deepindex.cluster import connect; import ray; connect(); "
                "print(int(ray.cluster_resources()['CPU']))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == "2", out.stderr[-2000:]
        if len(groups) == 2:  # first round only
            # A wrong token is refused by the GCS.  The client retries once a second (20 s by default)
            # before it gives up: two tries are enough to see why it was refused.
            bad = subprocess.run([sys.executable, "-c", "import ray, os; ray.init(address=os.environ['A'])"],
                                 env={**env, "A": first["ray"].address, "RAY_AUTH_MODE": "token",
                                      "RAY_AUTH_TOKEN": "0" * 64, "RAY_gcs_server_port_wait_time_s": "2"},
                                 capture_output=True, text=True, timeout=120)
            assert bad.returncode != 0 and "InvalidAuthToken" in bad.stderr, bad.stderr[-2000:]

        assert main(["down"]) == 0
        assert main(["down"]) == 0  # idempotent
        assert read_state() == {}
        assert all(not session_members(g) for g in groups)
    alive = [p for p in seen if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
    assert alive == [], alive
    assert "was not running" in capsys.readouterr().out


# ---- what a real `up` listens on -----------------------------------------------------------
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


def _check_listeners(state: dict) -> None:
    """Every TCP socket the platform's process groups listen on: deepindex's own on loopback, and
    off loopback only Ray's token-guarded servers."""
    listening = _listening()
    sockets = {name: {(_name(p), p): _sockets_of(p, listening) for p in session_members(svc.pgid)}
               for name, svc in state.items()}
    dashboard_ports = [_flag(p, "--port") for p in session_members(state["ray"].pgid) if _name(p) == "dashboard.py"]
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


def _ray_cli_through_deepindex_env(home: Path, dashboard: int) -> None:
    """`ray status` and `ray job list` as a user runs them: nothing but `eval $(deepindex env)` (the README's
    unquoted form), in a shell set up for a remote cluster first (its token exported, as the README's remote
    steps do: Ray's clients present RAY_AUTH_TOKEN before the token file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["RAY_AUTH_TOKEN"] = "0" * 64  # another cluster's
    script = 'eval $(deepindex env) && env | grep -E "^(RAY|MLFLOW)_" | sort && ray status && ray job list'
    out = subprocess.run(["bash", "-c", script], env={**env, "PATH": f"{BIN}:{env['PATH']}"}, cwd=home.parent,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    exported = dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith(("RAY_", "MLFLOW_")))
    assert exported["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{dashboard}"
    assert exported["RAY_AUTH_MODE"] == "token" and Path(exported["RAY_AUTH_TOKEN_PATH"]).is_file()
    assert {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"} <= set(exported)
    assert "RAY_AUTH_TOKEN" not in exported  # the remote token is gone from the shell
    assert "Active:" in out.stdout and "CPU" in out.stdout  # ray status reached the head
    assert f"http://127.0.0.1:{dashboard}" in out.stdout + out.stderr  # ray job list used the Jobs API


def _serve_cli_through_deepindex_env(home: Path, dashboard: int) -> None:
    """Ray Serve's CLI (`serve status`; `serve delete deepindex` stops a detached service) after nothing
    but `eval $(deepindex env)`: it reads RAY_DASHBOARD_ADDRESS, else port 8265, not this head's dashboard."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    out = subprocess.run(["bash", "-c", "eval $(deepindex env) && echo RAY_DASHBOARD_ADDRESS=$RAY_DASHBOARD_ADDRESS "
                          "&& serve status"], env={**env, "PATH": f"{BIN}:{env['PATH']}"}, cwd=home.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"RAY_DASHBOARD_ADDRESS=http://127.0.0.1:{dashboard}" in out.stdout
    assert "applications:" in out.stdout  # serve status reached this head's dashboard


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


# ---- `up` on a running platform, and two `up`s at once: no Ray, no MLflow -------------------------
# The services in the state file are processes of the test's own (`sleep`, each the leader of a new
# session, as `up` starts a service), stopped by their pids when the test ends.
@pytest.fixture
def sleepers():
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _fake(name: str, proc: subprocess.Popen, port: int, **options: int) -> Service:
    address = f"127.0.0.1:{port}" if name == "ray" else f"http://127.0.0.1:{port}"
    started_with = {f"--{k.replace('_', '-')}": v for k, v in options.items()}
    return Service(name, proc.pid, proc.pid, port, address, f"{name}.log", [], {name: address},
                   **({"options": started_with} if started_with else {}))


@pytest.mark.timeout(60)
def test_up_checks_that_a_running_platform_answers(sleepers, monkeypatch, capsys):
    monkeypatch.setattr("deepindex.localplatform.READY_TIMEOUT_S", 1.0, raising=False)
    ray_port, mlflow_port, dashboard = free_port(), free_port(), free_port()
    ray, mlflow = sleepers(), sleepers()  # alive, and nothing answers on their ports
    _write_state({"ray": _fake("ray", ray, ray_port), "mlflow": _fake("mlflow", mlflow, mlflow_port)})
    assert main(["up", "--ray-port", str(ray_port), "--mlflow-port", str(mlflow_port),
                 "--dashboard-port", str(dashboard)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"deepindex up: error: ray (running already, pid {ray.pid}), mlflow (running already, pid {mlflow.pid}): "
        f"not ready after 1s; see {platform_dir()}/*.log (`deepindex down` stops the platform, `deepindex up` then "
        "starts it afresh)"), err
    assert "platform up" not in err
    # Kept as they were: `up` stops nothing that runs.
    assert ray.poll() is None and mlflow.poll() is None
    assert {k: v.pid for k, v in read_state().items()} == {"ray": ray.pid, "mlflow": mlflow.pid}


@pytest.mark.timeout(60)
def test_up_says_which_options_a_running_platform_keeps(sleepers, monkeypatch, caplog):
    for name in SERVICES:
        monkeypatch.setitem(SERVICES, name, dataclasses.replace(SERVICES[name], ready=lambda svc: True))
    monkeypatch.delenv("DEEPINDEX_NUM_CPUS", raising=False)
    ray_port, mlflow_port, dashboard = free_port(), free_port(), free_port()
    ray, mlflow = sleepers(), sleepers()
    _write_state({"ray": _fake("ray", ray, ray_port, num_cpus=2, dashboard_port=dashboard),
                  "mlflow": _fake("mlflow", mlflow, mlflow_port)})
    pids = {"ray": ray.pid, "mlflow": mlflow.pid}

    def warnings() -> list[str]:
        out = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        caplog.clear()
        return out

    caplog.set_level(logging.INFO, logger="deepindex.localplatform")
    # What it runs with, the defaults and 0 (any port): nothing to say.
    for kwargs in ({"ray_port": ray_port, "mlflow_port": mlflow_port, "dashboard_port": dashboard, "num_cpus": 2},
                   {}, {"ray_port": 0, "mlflow_port": 0, "dashboard_port": 0}):
        assert {k: v.pid for k, v in up(**kwargs).items()} == pids
        assert warnings() == [], kwargs

    other = {"ray_port": free_port(), "mlflow_port": free_port(), "dashboard_port": free_port()}
    assert {k: v.pid for k, v in up(**other, num_cpus=4).items()} == pids
    assert warnings() == [
        f"the platform runs already with other options than asked for, kept as they are: ray --ray-port {ray_port} "
        f"(asked for {other['ray_port']}); ray --dashboard-port {dashboard} (asked for {other['dashboard_port']}); "
        f"ray --num-cpus 2 (asked for 4); mlflow --mlflow-port {mlflow_port} (asked for {other['mlflow_port']}) "
        "(options apply when a service starts: `deepindex down` first to change them)"]
    monkeypatch.setenv("DEEPINDEX_NUM_CPUS", "3")
    up()
    assert [w for w in warnings() if "ray --num-cpus 2 (asked for 3)" in w] != []


@pytest.mark.timeout(60)
def test_two_ups_at_once_start_one_platform(sleepers, monkeypatch, caplog):
    started: list[str] = []

    def fake_start(name: str):
        def start(port: int, opts) -> Service:
            time.sleep(0.5)  # what `ray start` takes before `up` records it: the other `up` reads the state meanwhile
            started.append(name)
            return _fake(name, sleepers(), port)
        return start

    for name in SERVICES:
        monkeypatch.setitem(SERVICES, name, dataclasses.replace(SERVICES[name], start=fake_start(name),
                                                                ready=lambda svc: True))
    ports = {"ray_port": free_port(), "mlflow_port": free_port(), "dashboard_port": free_port()}
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(up(**ports))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2
    assert sorted(started) == ["mlflow", "ray"]  # one platform, not a second one that orphans the first
    recorded = {k: v.pid for k, v in read_state().items()}
    assert [{k: v.pid for k, v in r.items()} for r in results] == [recorded, recorded]
    assert any("waiting for it to end" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_down_waits_for_the_process_that_holds_the_lock(sleepers):
    service = sleepers()
    _write_state({"mlflow": _fake("mlflow", service, free_port())})
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(platform_dir() / "state.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(down()))
        t.start()
        t.join(1.0)
        assert t.is_alive() and service.poll() is None  # an `up` holds the lock: `down` waits for it
        holder.kill()  # the lock goes with its process, however that ends
        holder.wait()
        t.join(30)
        assert not t.is_alive() and result == {"mlflow": [service.pid]}
        assert read_state() == {}
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


@pytest.mark.timeout(60)
def test_a_stale_state_file_stops_no_other_program(sleepers):
    """After a reboot, or once pids wrap around, the head's recorded pid may be another program's (a login
    shell, tmux): `status` called it running and `down` sent its whole session SIGTERM, then SIGKILL (found on
    review).  A service is known by its pid and the leader's start (boot id, start time), kept by `up`."""
    from deepindex.localplatform import running_service, status
    from deepindex.sessions import process_start

    other = sleepers()  # the program that has the recorded pid now
    stale = dataclasses.replace(_fake("ray", other, free_port()), started="another-boot:12345")
    _write_state({"ray": stale})
    assert running_service("ray") is None
    assert status()["ray"]["state"] == "dead" and status()["ray"]["processes"] == []
    assert down() == {"ray": []}
    assert other.poll() is None  # left alone (a stopped session is gone before down() returns)
    # The same record with the leader's own start is the service, and `down` stops it.
    ours = sleepers()
    _write_state({"ray": dataclasses.replace(_fake("ray", ours, free_port()), started=process_start(ours.pid) or "")})
    assert running_service("ray") is not None and status()["ray"]["state"] == "running"
    assert down()["ray"] == [ours.pid]
    assert ours.wait(timeout=10) is not None and other.poll() is None


@pytest.mark.timeout(60)
def test_two_services_asked_for_one_port_are_refused_before_anything_starts(capsys):
    port = free_port()
    assert main(["up", "--ray-port", str(port), "--mlflow-port", str(port), "--dashboard-port", str(free_port())]) != 0
    assert f"--mlflow-port: port {port} is asked for --ray-port too; give each service its own" \
        in capsys.readouterr().err
    assert main(["up", "--ray-port", str(port), "--dashboard-port", str(port), "--mlflow-port", str(free_port())]) != 0
    assert f"--dashboard-port: port {port} is asked for --ray-port too" in capsys.readouterr().err
    assert read_state() == {}


@pytest.mark.timeout(60)
def test_down_keeps_a_state_file_it_cannot_read(capsys):
    """`down` used to remove a state file it could not read (damaged, or a newer version's fields) and say
    the platform was not running: the services it named ran on with no record of them (found on review)."""
    f = platform_dir() / "state.json"
    f.write_text('{"ray": {"name": "ray", "pid": 1, "a_field_of_tomorrow": 1}}')
    assert main(["down"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"deepindex down: error: {f} does not read (damaged, or another")
    assert f.is_file()
    f.write_text("{}")
    assert main(["down"]) == 0 and not f.exists()


@pytest.mark.timeout(60)
def test_a_half_started_platform_is_not_running(sleepers, capsys):
    """An `up` whose Ray head failed to start leaves MLflow alone in the state file: `status` said `mlflow: running`,
    nothing of Ray, and exit 0 (`--json`: running true) while `deepindex env` said the platform is not running."""
    mlflow = sleepers()  # alive: a process of this test's own stands in for the server
    _write_state({"mlflow": _fake("mlflow", mlflow, free_port())})
    assert main(["status", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["running"] is False
    assert doc["services"]["mlflow"]["state"] == "running" and doc["services"]["ray"]["state"] == "not running"
    assert main(["status"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "ray: not running (start it with: deepindex up)" in out, out
    assert any(line.startswith("mlflow: running (pid ") for line in out), out
    assert main(["env"]) == 1
