"""Log a retrieval-quality report (:func:`deepindex.index.evaluate.evaluate_retrieval`) to an MLflow run.

Metrics are flat names under ``retrieval.``: ``keyword.map``, ``keyword.ap.<concept>``,
``qbe.<descriptor>.<metric>.map_at_<k>`` / ``precision_at_<k>``, ``qbe_best.map_at_<k>``,
``fusion.<signal>.map_at_<k>``; the whole report is the artifact ``retrieval/report.json``.
"""
from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from deepindex.tracking.tracker import mlflow_client

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

_UNSAFE = re.compile(r"[^\w\-./ ]")  # what MLflow accepts in a metric name


def flat_metrics(report: dict[str, Any], prefix: str = "retrieval") -> dict[str, float]:
    """The report's numbers as ``{dotted.name: value}``, names made safe for MLflow."""
    out: dict[str, float] = {}

    def walk(node: Any, path: list[str]) -> None:  # numbers at any depth; text (names, queries) skipped
        if isinstance(node, dict):
            for key, v in node.items():
                walk(v, [*path, _UNSAFE.sub("_", str(key))])
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[".".join(path)] = float(node)

    for section in ("keyword", "qbe", "qbe_best", "qbe_chance", "fusion"):
        walk(report.get(section, {}), [prefix, section])
    return out


def check_run(run_id: str, tracking_uri: str | None = None) -> MlflowClient:
    """The MLflow client, once ``run_id`` is known to exist (ValueError naming ``log-run`` otherwise)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"log-run: no MLflow run {run_id!r} at {client.tracking_uri}: {e.message}") from None
    return client


def log_retrieval_report(report: dict[str, Any], run_id: str, tracking_uri: str | None = None) -> int:
    """Metrics + ``retrieval/report.json`` on run ``run_id``; returns how many metrics were logged."""
    from mlflow.entities import Metric

    client = check_run(run_id, tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(name, value, now, 0) for name, value in sorted(flat_metrics(report).items())]
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    client.log_dict(run_id, report, "retrieval/report.json")
    return len(metrics)
