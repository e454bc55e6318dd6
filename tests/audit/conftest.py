"""Fixtures of the audit tests: the shared MLflow server of tests/fixtures_mlflow.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the shared fixture modules

from fixtures_mlflow import mlflow_server  # noqa: E402,F401
