"""What the job entrypoints (``jobs/*.py``) and the CLI share: one code path per step."""
from __future__ import annotations

import json
import logging
from typing import Any

from deepindex.config import load_config

log = logging.getLogger(__name__)


def _summary(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not isinstance(v, list)}


def train_main(config_path: str | None, overrides: list[str], name: str | None = None) -> dict[str, Any]:
    """Validate the config first (a bad key fails before Ray starts), train, print the results."""
    from deepindex.cluster import connect
    from deepindex.tracking.run import tracked_train

    cfg = load_config(config_path, overrides)
    from deepindex.data.label_view import check_label_filter

    check_label_filter(cfg.data)  # a missing or mismatched audit report fails here, not in every worker
    connect()
    # One MLflow run per training run (when a tracking server is configured or up).
    out, run_id = tracked_train(cfg, name=name)
    result = {"name": out.name, "checkpoint": out.checkpoint, "last_epoch": _summary(out.metrics),
              "test": _summary(out.test_metrics), "mlflow_run_id": run_id}
    print(json.dumps(result, indent=2))
    return result


def audit_main(config_path: str | None, overrides: list[str], name: str | None = None,
               tracking_uri: str | None = None) -> dict[str, Any]:
    """Validate, audit the train labels on the cluster, print the summary table and the results."""
    from deepindex.audit.run import check_config, run_audit

    cfg = load_config(config_path, overrides)
    check_config(cfg)  # before Ray starts: a bad audit config costs nothing
    out = run_audit(cfg, name=name, tracking_uri=tracking_uri)
    print(out.summary)
    result = {"name": out.name, "report": str(out.report), "flagged_labels": out.flagged,
              "oof_map_given": round(out.oof_map, 4), "detection": out.scores, "mlflow_parent_run_id": out.parent_run_id,
              "fold_runs": [f.run_id for f in out.folds], "wall_s": round(out.wall_s, 1),
              "train_on_cleaned_labels": f"data.label_filter={out.report}"}
    print(json.dumps(result, indent=2))
    return result
