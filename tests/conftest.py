"""Shared fixtures: one local Ray cluster, one MLflow server and one small trained model per test
session (tests only read them), a temp state folder for every test, the tiny config.

Tests that kill a cluster or a server start their own (in subprocesses or with
``start_mlflow_server``); a test that replaces this process's Ray connection (the 2-node fixture)
leaves it closed, and the next ``ray_local`` starts the shared cluster again.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from support import TINY, MlflowServer, ensure_ray, start_mlflow_server

if TYPE_CHECKING:
    from deepindex.config import Config

# Tests must never attach to a cluster or server someone started on this machine, nor write state
# into the checkout: the cluster below is address="local", and every test gets a temp DEEPINDEX_HOME.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DEEPINDEX_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path / "state"


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import support

    if support.ray_started_here:
        import ray

        ray.shutdown()


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
