"""The steps that span training and tracking: train-then-log, promotion, and their CLI/job entry points.

``deepindex train`` / ``jobs/train.py`` call :func:`train_main`; ``deepindex promote`` /
``jobs/promote.py`` call :func:`promote_main`; the Tune driver finalises each trial with
:func:`finalize_run` and promotes with :func:`promote`.  This module sits above both
``deepindex.train`` (training, scoring) and ``deepindex.tracking`` (MLflow), so neither of those
imports the other.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from deepindex.config import Config, load_config
from deepindex.tracking.registry import PromotionDecision
from deepindex.tracking.tracker import Tracker
from deepindex.train.trainer import TrainOutcome

if TYPE_CHECKING:
    from ray.train import UserCallback

log = logging.getLogger(__name__)


def _summary(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not isinstance(v, list)}


def train_main(config_path: str | None, overrides: list[str], name: str | None = None) -> dict[str, Any]:
    """Validate the config first (a bad key fails before Ray starts), train, print the results."""
    from deepindex.cluster import connect

    cfg = load_config(config_path, overrides)
    connect()
    # One MLflow run per training run (when a tracking server is configured or up).
    out, run_id = tracked_train(cfg, name=name)
    result = {"name": out.name, "checkpoint": out.checkpoint, "last_epoch": _summary(out.metrics),
              "test": _summary(out.test_metrics), "mlflow_run_id": run_id}
    print(json.dumps(result, indent=2))
    return result


def tracked_train(cfg: Config, *, name: str | None = None, callbacks: list[UserCallback] | None = None,
                  parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                  tracking_uri: str | None = None) -> tuple[TrainOutcome, str | None]:
    """Train on the connected cluster with MLflow tracking; returns (outcome, MLflow run id).

    After Ray Train returns, the best checkpoint (by the validation metric) is scored on the test
    split and the run gets the test metrics, reports and the checkpoint (:func:`finalize_run`).
    """
    from deepindex.tracking.run import make_tracker, mark_failed
    from deepindex.train.trainer import journal_path, run_name, train

    name = name or run_name(cfg)
    tracker = make_tracker(cfg, name, journal=journal_path(cfg, name), tracking_uri=tracking_uri,
                           parent_run_id=parent_run_id, tags=tags)
    try:
        outcome = train(cfg, name=name, evaluate_test=False, tracker=tracker, callbacks=callbacks)
    except BaseException:
        mark_failed(tracker, name)
        raise
    outcome.test_metrics, run_id = finalize_run(tracker, outcome.checkpoint, outcome.latest_checkpoint, name)
    return outcome, run_id


def finalize_run(tracker: Tracker | None, best_checkpoint: str, latest_checkpoint: str | None, name: str,
                 status: str = "FINISHED") -> tuple[dict[str, Any], str | None]:
    """Score ``best_checkpoint`` on the test split and hand the report to tracking; ends the run with
    ``status`` (a Tune trial that ASHA stopped ends KILLED).  Returns (test metrics, run id)."""
    import matplotlib.pyplot as plt

    from deepindex.checkpoint import checkpoint_file
    from deepindex.tracking.run import FinalReport, log_final
    from deepindex.tracking.tracker import numeric_metrics
    from deepindex.train.evaluation import ap_table, curve_figure, score_checkpoint

    scored = score_checkpoint(best_checkpoint)
    if tracker is None:
        return scored.metrics, None
    fig = curve_figure(scored)
    try:
        figure = "test_pr_curve.png" if scored.multilabel else "test_confusion_matrix.png"
        report = FinalReport(numeric_metrics(scored.metrics), str(checkpoint_file(best_checkpoint)),
                             texts={"test_ap.csv": ap_table(scored)}, figures={figure: fig})
        run_id = log_final(tracker, report, latest_checkpoint, name, status)
    finally:
        plt.close(fig)
    return scored.metrics, run_id


def promote(run_id: str, name: str, tracking_uri: str | None = None, *, parent_run_id: str | None = None,
            alias: str = "champion") -> PromotionDecision:
    """Score the candidate run and the current champion on the candidate's test split; move the
    alias to the candidate only when it is strictly better.  The candidate is registered either way."""
    from deepindex.checkpoint import read_checkpoint
    from deepindex.config import from_dict
    from deepindex.tracking import registry
    from deepindex.train.engine import primary_metric
    from deepindex.train.evaluation import score_checkpoint

    with tempfile.TemporaryDirectory(prefix="deepindex-candidate-") as tmp:
        cand_dir = registry.download_run_checkpoint(run_id, tmp, tracking_uri)
        cand_cfg = from_dict(read_checkpoint(cand_dir)["config"])
        cand = score_checkpoint(cand_dir)
    metric, mode = primary_metric(cand.multilabel, prefix="test_")
    cand_value = float(cand.metrics[metric])
    version = registry.register_run(run_id, name, tracking_uri)

    champ_version = registry.alias_version(name, alias, tracking_uri)
    champ_value: float | None = None
    if champ_version == version:
        champ_value = cand_value
        promoted, reason = False, f"version {version} is already the {alias}"
    elif champ_version is not None:
        champ = registry.resolve_model(f"models:/{name}/{champ_version}", tracking_uri)
        champ_value = float(score_checkpoint(champ.checkpoint_path, data=cand_cfg.data).metrics[metric])
        promoted = cand_value > champ_value if mode == "max" else cand_value < champ_value
        reason = (f"{metric} {cand_value:.4f} {'beats' if promoted else 'does not beat'} the {alias} "
                  f"(version {champ_version}) {champ_value:.4f}")
    else:
        promoted, reason = True, f"no {alias} yet; {metric} {cand_value:.4f}"
    if promoted:
        registry.set_alias(name, version, alias, tracking_uri)
    decision = PromotionDecision(promoted, name, version, metric, mode, cand_value, champ_value, champ_version,
                                 run_id, reason)
    log.info("promotion of run %s (version %s): %s -> %s", run_id, version, reason,
             f"{alias} = version {version}" if promoted else f"{alias} unchanged")
    registry.log_decision(decision, parent_run_id, tracking_uri)
    return decision


def promote_main(*, sweep: str | None = None, run_id: str | None = None, model: str = "deepindex",
                 experiment: str = "deepindex", tracking_uri: str | None = None) -> dict[str, Any]:
    """Promote a sweep's best trial (or a given run): register it, move ``champion`` if better."""
    from deepindex.tracking.sweep import find_sweep_best

    if (sweep is None) == (run_id is None):
        raise ValueError("promote: give exactly one of --sweep NAME or --run RUN_ID")
    parent = None
    if sweep is not None:
        run_id, parent = find_sweep_best(sweep, experiment, tracking_uri)
    assert run_id is not None
    out = asdict(promote(run_id, model, tracking_uri, parent_run_id=parent))
    print(json.dumps(out, indent=2))
    return out
