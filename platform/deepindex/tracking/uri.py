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


def reachable(uri: str, timeout: float = 3.0) -> bool:
    """A cheap probe before any logging call, so a dead server costs one warning, not retries."""
    if not is_http(uri):
        return True  # file/sqlite/databricks stores: no probe, the first call tells
    import requests

    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).status_code < 500
    except requests.RequestException:
        return False
