"""Shared fixtures: tiny configs, a local Ray cluster (token auth left on), temp state dirs."""
from __future__ import annotations

import os

import pytest

# Tests must never attach to a cluster someone started on this machine, nor write state into
# the checkout: every fixture below uses address="local" and a temp DEEPINDEX_HOME.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

TINY = [
    "data.dataset=digits", "data.train_size=800", "data.val_size=200", "data.test_size=200",
    "model.channels=[8,16]", "model.embed_dim=32", "train.epochs=2", "train.batch_size=64",
]


@pytest.fixture(autouse=True)
def _state_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPINDEX_HOME", str(tmp_path / "state"))


@pytest.fixture
def tiny_cfg():
    from deepindex.config import load_config

    return load_config(None, TINY)


@pytest.fixture(scope="module")
def ray_local():
    """A fresh single-node Ray cluster for a test module: 4 logical CPUs on 2 cores."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Torch on one thread for a test that trains: on a shared 2-core machine two OpenMP threads
    wait on each other whenever another process holds a core (several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
