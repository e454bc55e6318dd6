"""Which MLflow tracking server to use, decided once on the driver."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_warned = False


def resolve_tracking_uri(warn: bool = True) -> str | None:
    """``MLFLOW_TRACKING_URI``, else the local platform's MLflow server if it runs, else None.

    None means tracking is off: training goes on and logs one warning (no local file store,
    so no run is ever split between a hidden ``mlruns/`` folder and the real server).
    """
    global _warned
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    from deepindex.localplatform import running_service

    svc = running_service("mlflow")
    if svc is not None:
        return svc.address
    if warn and not _warned:
        _warned = True
        log.warning("MLflow tracking is off: MLFLOW_TRACKING_URI is not set and the local platform is not up "
                    "(`deepindex up`); results stay on the Ray storage path only")
    return None


def is_http(uri: str | None) -> bool:
    return bool(uri and uri.split("://", 1)[0] in ("http", "https"))


# How long one MLflow HTTP request may take: MLflow's own setting, which deepindex defaults to 10 s
# (MLflow's default, 120 s with retries, would hold a run for minutes on a dead server).
HTTP_TIMEOUT_ENV, HTTP_TIMEOUT_DEFAULT = "MLFLOW_HTTP_REQUEST_TIMEOUT", "10"


def reachable(uri: str, timeout: float | None = None) -> bool:
    """A cheap probe before any logging call, so a dead server costs one warning, not retries.

    A refused connection answers at once; a server that accepts but does not answer gets as long
    as any MLflow request would (``MLFLOW_HTTP_REQUEST_TIMEOUT``, 10 s unless set).
    """
    if not is_http(uri):
        return True  # file/sqlite/databricks stores: no probe, the first call tells
    import requests

    if timeout is None:
        timeout = float(os.environ.get(HTTP_TIMEOUT_ENV) or HTTP_TIMEOUT_DEFAULT)
    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).status_code < 500
    except requests.RequestException:
        return False


# MLflow 3's UI follows a per-browser switch, "GenAI" (the default) or "Model training", and opens an
# experiment on its GenAI overview (traces, token usage) unless the link asks for model training.
# Every MLflow link deepindex prints asks for it; in a browser, clicking "Model training" once does too.
ML_VIEW = "workflowType=machine_learning"


def ui_url(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """A link into the MLflow UI at ``uri`` that opens on the runs table (or a run's page)."""
    base = uri.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?{ML_VIEW}"
    if run_id is None:
        return f"{base}/#/experiments/{experiment_id}/runs?{ML_VIEW}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"


def experiment_ui_url(uri: str, name: str = "deepindex", timeout: float = 2.0) -> str:
    """The runs table of experiment ``name`` if the server has it, else the experiments list."""
    if not is_http(uri):
        return uri
    import requests

    try:
        r = requests.get(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name",
                         params={"experiment_name": name}, timeout=timeout)
        exp_id = r.json()["experiment"]["experiment_id"] if r.status_code == 200 else None
    except (requests.RequestException, ValueError, KeyError):
        exp_id = None
    return ui_url(uri, exp_id)
