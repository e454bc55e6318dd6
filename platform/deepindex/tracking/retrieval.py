"""Log a retrieval-quality report (:func:`deepindex.index.evaluate.evaluate_retrieval`) to an MLflow run.

Metrics are flat names under ``retrieval.``: ``keyword.map``, ``keyword.ap.<concept>``,
``qbe.<descriptor>.<metric>.map_at_<k>`` / ``precision_at_<k>`` / ``ndcg_at_<k>``, ``qbe_best.map_at_<k>``,
``fusion.<signal>.map_at_<k>``; the whole report is the artifact ``retrieval/report.json``.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepindex.tracking.tracker import mlflow_client

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from deepindex.tracking.registry import ResolvedModel

log = logging.getLogger(__name__)
REPORT = "retrieval/report.json"  # the run artifact; beside a checkpoint file, the same relative path

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

    for section in ("keyword", "qbe", "qbe_best", "qbe_chance", "qbe_chance_ndcg", "fusion"):
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
    client.log_dict(run_id, report, REPORT)
    return len(metrics)


def _beside(model: ResolvedModel) -> Path:
    """Where a checkpoint file's report is kept: ``retrieval/report.json`` in its folder."""
    return Path(model.checkpoint_path).parent / REPORT


def _run_of(model: ResolvedModel, tracking_uri: str | None) -> str | None:
    """The MLflow run that logged a registered version (None for a version registered without one)."""
    run_id: str | None = mlflow_client(tracking_uri).get_model_version(model.name, model.version).run_id
    return run_id or None


def report_for(model: ResolvedModel, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """The retrieval report of a model version, None where it has none: a registered version's run
    artifact ``retrieval/report.json`` (``deepindex evaluate-retrieval --attach`` or ``--log-run``,
    or a promotion with a retrieval floor), or for a checkpoint path the file ``retrieval/report.json``
    beside it (``--attach``), if it measured that file's version."""
    if model.name == "local":
        path = _beside(model)
        if not path.is_file():
            return None
        local: dict[str, Any] = json.loads(path.read_text())
        # The file stays when the checkpoint beside it is replaced: only the version it measured counts.
        return local if (local.get("model") or {}).get("version") == model.version else None
    from mlflow.exceptions import MlflowException

    run_id = _run_of(model, tracking_uri)
    if run_id is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        try:
            got = mlflow_client(tracking_uri).download_artifacts(run_id, REPORT, d)
        except (MlflowException, OSError) as e:  # none logged (yet)
            log.debug("no %s on run %s: %s", REPORT, run_id, e)
            return None
        report: dict[str, Any] = json.loads(Path(got).read_text())
        return report


def attach_report(model: ResolvedModel, report: dict[str, Any], tracking_uri: str | None = None) -> str:
    """Keep ``report`` where :func:`report_for` finds it (the version's run, or beside the checkpoint
    file); returns where, for the user."""
    report = {**report, "model": {**(report.get("model") or {}), "name": model.name, "version": model.version}}
    if model.name == "local":
        from deepindex.atomic import write_file

        return str(write_file(_beside(model), json.dumps(report, indent=2)))
    run_id = _run_of(model, tracking_uri)
    if run_id is None:
        raise ValueError(f"attach: {model.name} version {model.version} has no MLflow run to hold the report")
    n = log_retrieval_report(report, run_id, tracking_uri)
    return f"run {run_id} of {model.name} version {model.version} ({n} metrics and {REPORT})"
