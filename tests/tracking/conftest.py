"""Fixtures of the tracking tests: a real MLflow server, a local Ray cluster, an isolated state dir."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the shared fixture modules

from fixtures_mlflow import deepindex_home, mlflow_server, ray_local  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _isolated_home(deepindex_home):
    return deepindex_home
