"""Our modules' log lines in the replica's Serve log (``logs/serve/replica_*.log``), next to Serve's own.

Ray Serve configures only its ``ray.serve`` logger in a replica; the ``deepindex`` and ``serving``
loggers would otherwise print warnings to stderr and drop the rest.
"""
from __future__ import annotations

import logging


def adopt_serve_logging(level: int = logging.INFO) -> None:
    serve_logger = logging.getLogger("ray.serve")
    for name in ("deepindex", "serving"):
        lg = logging.getLogger(name)
        lg.setLevel(level)
        for h in serve_logger.handlers:
            if h not in lg.handlers:
                lg.addHandler(h)
        lg.propagate = False
