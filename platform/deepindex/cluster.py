"""Connecting to Ray: a remote cluster (``RAY_ADDRESS``), the local platform, or a new local one."""
from __future__ import annotations

import logging
import os
from typing import Any

from deepindex.serve_env import serve_env

log = logging.getLogger(__name__)

# Ray Train's preemption watcher (an actor per training run, polling for spot-instance notices)
# has nothing to watch on one machine, and each one is a Python process to start: on 2 cores a
# sweep's trials wait for those starts.  The controller polls its workers every 2 s by default:
# a finished run (and each epoch's report) waits up to that long to be seen, a poll of a few local
# workers costs next to nothing, so every 0.5 s here.  Remote clusters keep Ray's defaults.
_LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def local_cluster_env() -> dict[str, str]:
    """Environment for the processes of a Ray cluster on this machine (the platform's head, a
    fresh local cluster): the Serve data plane's, and Ray Train's without the preemption watcher.
    A value already set in the environment wins."""
    return {**serve_env(), **{k: os.environ.get(k, v) for k, v in _LOCAL_TRAIN_ENV.items()}}


def connect(num_cpus: int | None = None, **kwargs: Any) -> None:
    """``ray.init`` once: ``RAY_ADDRESS`` if set, else the local platform's head if
    ``deepindex up`` runs one, else a fresh local cluster.

    On a 2-core machine a Train run plus its controller needs more logical CPUs than
    cores: ``num_cpus`` (or ``DEEPINDEX_NUM_CPUS``) sets the local cluster's count.
    """
    import ray

    from deepindex.console import route_worker_output

    if ray.is_initialized():
        return
    _init(num_cpus, **kwargs)
    # What Ray forwards from its workers goes to the log file, not the console (unless -v).
    route_worker_output()


def _init(num_cpus: int | None, **kwargs: Any) -> None:
    import ray

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
        # Ray Train reads its settings in the driver and hands them to its controller and workers.
        os.environ.update({**ray_client_env(), **{k: os.environ.get(k, v) for k, v in _LOCAL_TRAIN_ENV.items()}})
        reload_ray_auth()
        ray.init(address=head.address, **kwargs)
        return
    n = num_cpus or int(os.environ.get("DEEPINDEX_NUM_CPUS", "0")) or max(4, os.cpu_count() or 1)
    start_local_cluster(n, **kwargs)


def start_local_cluster(num_cpus: int, **kwargs: Any) -> None:
    """``ray.init`` of a new cluster on this machine, this process its driver.

    With its dashboard, on a free loopback port: its State API is what Ray Train's placement-group
    cleaner asks whether a run's controller still lives.  Tune ends a trial by killing its actor,
    the Train controller with it; without that answer the killed run's worker group keeps its CPUs
    until this driver exits, and on a cluster sized for one trial at a time the next trial waits
    forever.  ``RAY_API_SERVER_ADDRESS`` (inherited by the cluster's processes) names this
    cluster's API server, so the cleaner does not guess among other Rays on the machine.
    """
    import ray

    from deepindex.net import HOST, free_port

    port = free_port()
    os.environ.update({**local_cluster_env(), "RAY_API_SERVER_ADDRESS": f"http://{HOST}:{port}"})
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host=HOST,
             dashboard_port=port, **kwargs)


def reload_ray_auth() -> None:
    """Make an already-imported Ray see the auth variables just set.

    Ray caches the auth mode (RayConfig) and the token (read once, e.g. from
    ``~/.ray/auth_token``) in this process; Ray's own ``_enable_token_auth`` refreshes both the
    same way after changing them.
    """
    try:
        # Not in ray/_raylet.pyi; another Ray version may lack them at run time too (handled below).
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as e:  # another Ray version: the env alone must do
        log.debug("could not refresh Ray's auth settings: %s", e)
