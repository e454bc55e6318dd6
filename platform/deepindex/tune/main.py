"""What ``deepindex tune`` / ``deepindex promote`` and ``jobs/tune.py`` / ``jobs/promote.py`` share."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

log = logging.getLogger(__name__)


def tune_main(space: str, overrides: list[str] | None = None, *, name: str | None = None,
              settings: dict[str, Any] | None = None, promote: bool | None = None) -> dict[str, Any]:
    """Validate the space first (a bad key fails before Ray starts), sweep, print a JSON summary."""
    from deepindex.cluster import connect
    from deepindex.tune.driver import run_sweep
    from deepindex.tune.space import load_space

    spec = load_space(space, overrides, settings)
    connect()
    out = run_sweep(spec, name=name, promote=promote)
    summary = sweep_summary(out)
    print(json.dumps(summary, indent=2, default=str))
    return summary


def sweep_summary(out) -> dict[str, Any]:
    from deepindex.tracking.uri import resolve_tracking_uri

    best = out.best
    return {
        "sweep": out.name, "path": out.path, "metric": out.metric, "mode": out.mode,
        "wall_s": round(out.wall_s, 1), "trials": len(out.trials), "stopped_early": out.stopped_early,
        "interrupted": out.interrupted,
        "best": None if best is None else {"trial_id": best.trial_id, out.metric: best.metric,
                                           "epochs": best.epochs_done, "mlflow_run_id": best.run_id,
                                           "params": best.params},
        "promotion": asdict(out.promotion) if out.promotion is not None else None,
        "mlflow_parent_run_id": out.parent_run_id,
        "mlflow_ui": resolve_tracking_uri(warn=False),
    }


def find_sweep_best(sweep: str, experiment: str = "deepindex", tracking_uri: str | None = None) -> tuple[str, str]:
    """(best child run id, parent run id) of a finished sweep, from its MLflow parent run."""
    from mlflow.tracking import MlflowClient

    from deepindex.tracking.uri import resolve_tracking_uri

    uri = tracking_uri or resolve_tracking_uri(warn=False)
    if uri is None:
        raise ValueError("tracking: no MLflow server (set MLFLOW_TRACKING_URI or run `deepindex up`)")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"tracking.experiment: no experiment {experiment!r} on {uri}")
    runs = client.search_runs([exp.experiment_id], f"tags.`tune.sweep` = '{sweep}' and tags.`deepindex.kind` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ValueError(f"sweep: no sweep named {sweep!r} in experiment {experiment!r}")
    best = runs[0].data.tags.get("best_run_id")
    if not best:
        raise ValueError(f"sweep: {sweep!r} has no best trial recorded (unfinished or untracked)")
    return best, runs[0].info.run_id


def promote_main(*, sweep: str | None = None, run_id: str | None = None, model: str = "deepindex",
                 experiment: str = "deepindex", tracking_uri: str | None = None) -> dict[str, Any]:
    """Promote a sweep's best trial (or a given run): register it, move ``champion`` if better."""
    from deepindex.tracking.registry import promote

    if (sweep is None) == (run_id is None):
        raise ValueError("promote: give exactly one of --sweep NAME or --run RUN_ID")
    parent = None
    if sweep is not None:
        run_id, parent = find_sweep_best(sweep, experiment, tracking_uri)
    decision = promote(run_id, model, tracking_uri, parent_run_id=parent)
    out = asdict(decision)
    print(json.dumps(out, indent=2))
    return out
