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
    connect()
    # One MLflow run per training run (when a tracking server is configured or up).
    out, run_id = tracked_train(cfg, name=name)
    result = {"name": out.name, "checkpoint": out.checkpoint, "last_epoch": _summary(out.metrics),
              "test": _summary(out.test_metrics), "mlflow_run_id": run_id}
    print(json.dumps(result, indent=2))
    return result
