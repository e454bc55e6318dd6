"""What ``deepindex tune`` and ``jobs/tune.py`` share (promotion: ``deepindex.workflows``)."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepindex.tune.driver import SweepOutcome

log = logging.getLogger(__name__)


def tune_main(space: str, overrides: list[str] | None = None, *, name: str | None = None,
              settings: dict[str, Any] | None = None, promote: bool | None = None, show: bool = True,
              config: str | None = None) -> dict[str, Any]:
    """Validate the space first (a bad key fails before Ray starts), sweep, return its summary
    (``show``: also printed as JSON on stdout).  ``space``: a file or a shipped space's name;
    ``config``: the training YAML the trials start from instead of the space's ``base``."""
    from deepindex.cluster import connect
    from deepindex.train.trainer import storage_path
    from deepindex.tune.driver import run_sweep
    from deepindex.tune.space import load_space
    from deepindex.workflows import check_data, sync_pending

    spec = load_space(space, overrides, settings, config)
    check_data(spec.base)
    connect()
    sync_pending(storage_path(spec.base))
    out = run_sweep(spec, name=name, promote=promote)
    summary = sweep_summary(out)
    if show:
        print(json.dumps(summary, indent=2, default=str))
    return summary


def sweep_summary(out: SweepOutcome) -> dict[str, Any]:
    from deepindex.tracking.uri import resolve_tracking_uri, ui_url

    best = out.best
    uri = resolve_tracking_uri(warn=False)
    return {
        "sweep": out.name, "path": out.path, "metric": out.metric, "mode": out.mode,
        "wall_s": round(out.wall_s, 1), "trials": len(out.trials), "stopped_early": out.stopped_early,
        "interrupted": out.interrupted,
        "best": None if best is None else {"trial_id": best.trial_id, out.metric: best.metric,
                                           "epochs": best.epochs_done, "mlflow_run_id": best.run_id,
                                           "params": best.params},
        # every trial, best first (those without a result last): what a second look at the sweep needs
        "trials_ranked": [{"trial_id": t.trial_id, out.metric: t.metric, "epochs": t.epochs_done,
                           "stopped_early": t.stopped_early, "mlflow_run_id": t.run_id}
                          for t in sorted(out.trials, key=lambda t: (t.metric is None,
                                                                     -(t.metric or 0) if out.mode == "max"
                                                                     else (t.metric or 0)))],
        "promotion": asdict(out.promotion) if out.promotion is not None else None,
        "mlflow_parent_run_id": out.parent_run_id,
        # the sweep's parent run: its description links every trial and the compare view
        "mlflow_ui": ui_url(uri, out.experiment_id, out.parent_run_id) if uri and out.experiment_id else uri,
    }
