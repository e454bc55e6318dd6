"""Experiment tracking in MLflow: a rank-0 :class:`~deepindex.tracking.tracker.Tracker` for
the worker loop, the driver-side wrapper that adds test metrics and artifacts
(:mod:`~deepindex.tracking.run`), and the model registry with promotion
(:mod:`~deepindex.tracking.registry`).

Tracking URI: ``MLFLOW_TRACKING_URI``, else the local platform's server (``deepindex up``),
else tracking is off with one warning (:func:`~deepindex.tracking.uri.resolve_tracking_uri`).
"""
