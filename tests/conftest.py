"""Shared fixtures: one local Ray cluster, one MLflow server and one small trained model per test
session (tests only read them), a temp state folder for every test, the tiny config.

Tests that kill a cluster or a server start their own (in subprocesses or with
``start_mlflow_server``); a test that replaces this process's Ray connection (the 2-node fixture)
leaves it closed, and the next ``ray_local`` starts the shared cluster again.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from support import TINY, MlflowServer, ensure_ray, require_tool, start_mlflow_server

# pytest-timeout that also ends a test blocked in ray.get; pytester runs a session inside a test.
pytest_plugins = ["timeouts", "pytester"]

if TYPE_CHECKING:
    from deepindex.config import Config

# Tests must never attach to a cluster or server someone started on this machine, nor write state
# into the checkout: the cluster below is address="local", and every test gets a temp DEEPINDEX_HOME.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("DEEPINDEX_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield tmp_path / "state"
    from deepindex import console

    console.teardown()  # a command run in this process set up its console; the next test starts clean


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium for the browser tests (driven over the DevTools protocol, tests/serving/cdp.py)."""
    return require_tool("chromium", ("chromium", "chromium-browser"),
                        "apt-get install chromium (Debian) or chromium-browser (Ubuntu)")


@pytest.fixture
def tiny_cfg() -> Config:
    from deepindex.config import load_config

    return load_config(None, TINY)


@pytest.fixture
def ray_local() -> Iterator[None]:
    """The session's local Ray cluster (``support.ensure_ray``): started on first use, or again after
    a test closed it."""
    ensure_ray()
    yield


# ---- where the suite's time goes: the machine's CPU per test --------------------------------------
# On 2 cores the suite's length is bounded by its CPU work (wall >= CPU / cores), whatever runs in
# parallel: `make test` prints the tests that use the most, beside pytest's slowest durations.
_cpu_per_test: dict[str, tuple[float, float]] = {}  # nodeid -> (machine CPU seconds, wall seconds)


def _machine_cpu_s() -> float:
    """Busy CPU time of the whole machine so far (all cores; /proc/stat), in seconds; 0 elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    cpu, wall = _machine_cpu_s(), time.monotonic()
    yield
    _cpu_per_test[item.nodeid] = (_machine_cpu_s() - cpu, time.monotonic() - wall)


def _cpu_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _cpu_per_test:
        return
    cpu = sum(c for c, _ in _cpu_per_test.values())
    wall = sum(w for _, w in _cpu_per_test.values())
    terminalreporter.write_sep("=", f"15 tests using the most CPU (the machine's, setup to teardown; "
                                    f"all {len(_cpu_per_test)}: {cpu:.0f} CPU-s in {wall:.0f} s, "
                                    f"{cpu / max(wall, 1e-9):.2f} cores busy)")
    for nodeid, (c, w) in sorted(_cpu_per_test.items(), key=lambda kv: -kv[1][0])[:15]:
        terminalreporter.write_line(f"{c:7.1f} CPU-s {w:7.1f} s  {nodeid}")
    out = os.environ.get("DEEPINDEX_TEST_CPU_TSV")  # every test's figures, in the order they ran
    if out:
        rows = [f"{c:.2f}\t{w:.2f}\t{nodeid}" for nodeid, (c, w) in _cpu_per_test.items()]
        Path(out).write_text("cpu_s\twall_s\ttest\n" + "\n".join(rows) + "\n")
        terminalreporter.write_line(f"every test's CPU and wall time: {out}")


_leftovers: list[str] = []  # processes that outlived the session (pytest_sessionfinish stopped them)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """No silent skips: every test that could not run here, and why, at the very end."""
    _cpu_summary(terminalreporter)
    if _leftovers:
        terminalreporter.write_sep("=", f"{len(_leftovers)} process(es) outlived the tests that started them; "
                                        "stopped now")
        for line in _leftovers:
            terminalreporter.write_line(line)
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.write_sep("=", f"{len(skipped)} test(s) could not run here")
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        terminalreporter.write_line(f"{rep.nodeid}: {reason.removeprefix('Skipped: ')}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import support

    if support.ray_started_here:
        import ray

        ray.shutdown()
    # Tests stop what they start; what is still running here (seen once: a Ray Train controller
    # still asleep after its cluster and the suite had ended) is stopped by pid and listed.
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        _leftovers.extend(support.stop_leftovers(factory.getbasetemp()))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One MLflow server per session (tests use experiments or model names of their own)."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``checkpoint.pt`` of the small digit-scenes ConvNet (``deepindex.index.tiny``), trained once."""
    from deepindex.index.tiny import train_small

    path, _ = train_small(tmp_path_factory.mktemp("small-model"), seed=0)
    return path
@pytest.fixture
def one_thread():
    """Torch on one thread for a test that trains: on a shared 2-core machine two OpenMP threads
    wait on each other whenever another process holds a core (several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
