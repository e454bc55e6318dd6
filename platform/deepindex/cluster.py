"""Connecting to Ray: a remote cluster (``RAY_ADDRESS``), the local platform, or a new local one."""
from __future__ import annotations

import contextlib
import logging
import os
import time
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


def own_cluster(num_cpus: int | None = None, **kwargs: Any) -> None:
    """``ray.init`` of a fresh local cluster whatever runs already: a benchmark's.  Joining the local
    platform's head (what :func:`connect` does), a benchmark measured beside `make demo`'s service, found
    the route it deploys at taken, and its ``serve.shutdown()`` deleted that service (found on review)."""
    import ray

    from deepindex.console import route_worker_output

    if ray.is_initialized():
        return
    start_local_cluster(num_cpus or default_num_cpus(), **kwargs)
    route_worker_output()


def _init(num_cpus: int | None, **kwargs: Any) -> None:
    import ray

    from deepindex.localplatform import running_service, use_local_head_auth

    address = os.environ.get("RAY_ADDRESS")
    head = running_service("ray")
    if address and (head is None or head.address != address):
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
        _fixed_size(False)
        return
    if head is not None:
        # `deepindex up` runs a head with token auth: present its token (not a RAY_AUTH_TOKEN the shell
        # holds for another cluster, which Ray would present first), never turn auth off.
        log.info("connecting to the local platform's Ray head at %s", head.address)
        use_local_head_auth()
        # Ray Train reads its settings in the driver and hands them to its controller and workers.
        os.environ.update({k: os.environ.get(k, v) for k, v in _LOCAL_TRAIN_ENV.items()})
        reload_ray_auth()
        ray.init(address=head.address, **kwargs)
        _fixed_size(True)
        return
    start_local_cluster(num_cpus or default_num_cpus(), **kwargs)


def lasting_cluster() -> str | None:
    """The address of the cluster ``connect()`` would join that outlives the command
    (``RAY_ADDRESS``; the one this process is connected to already, as a caller of the command's
    function is; else the local platform's head), or None: ``connect()`` would start a cluster of
    the command's own, gone when it exits."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        return address
    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    from deepindex.localplatform import running_service

    head = running_service("ray")
    return head.address if head is not None else None


def default_num_cpus() -> int:
    """Logical CPUs of a cluster this machine starts (``deepindex up``, or a fresh local one):
    ``DEEPINDEX_NUM_CPUS``, else at least 4.  A trial's driver, its Train workers and a running
    service each hold CPUs: with one logical CPU per core, 2 cores fit a service or one trial, not both."""
    return num_cpus_from_env() or max(4, os.cpu_count() or 1)


NUM_CPUS_ENV = "DEEPINDEX_NUM_CPUS"


def num_cpus_from_env() -> int | None:
    """``DEEPINDEX_NUM_CPUS`` as a local cluster's CPU count; None when it is unset or empty (the default).
    Anything but a whole number >= 1 is a ValueError naming the variable."""
    raw = os.environ.get(NUM_CPUS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{NUM_CPUS_ENV}: must be a whole number >= 1 (the head's logical CPUs), not {raw[:40]!r}")
    return n


# The GCS address of the cluster this process connected to when that cluster is one of this
# machine's (a fresh local cluster, the local platform's head): it never grows, so a job that does
# not fit in what is free would wait forever.
_fixed_cluster: str | None = None
# How long a job waits on such a cluster for the CPUs it needs before it says why it cannot start.
RESOURCE_WAIT_S = 60.0


class ClusterBusy(ValueError):
    """The connected cluster cannot give a job the CPUs/GPUs it needs: a one-line error for the CLI."""


def wait_for_resources(need: dict[str, float], what: str, wait_s: float | None = None) -> dict[str, float]:
    """The cluster's free resources once they hold ``need`` (e.g. ``{"CPU": 1.0}``).

    Ray queues work that does not fit, without a word, until something frees up or the autoscaler
    adds a node.  On a cluster of this machine nothing is added: a job behind a running service
    would hang.  So: say once what the job waits for; on such a cluster give up after ``wait_s``
    (default ``RESOURCE_WAIT_S``) with the numbers and what to do, at once if the cluster could not
    hold the job even when idle.  A remote cluster may grow: Ray's wait goes on after the line.
    """
    import ray

    from deepindex.console import event

    need = {k: v for k, v in need.items() if v > 0}
    wait_s = RESOURCE_WAIT_S if wait_s is None else wait_s
    fixed = fixed_size()
    deadline, said = time.monotonic() + wait_s, False
    while True:
        free = ray.available_resources()
        missing = {k: v for k, v in need.items() if free.get(k, 0.0) + 1e-9 < v}
        if not missing:
            return dict(free)
        total = ray.cluster_resources()
        have = ", ".join(f"{free.get(k, 0.0):g} of {total.get(k, 0.0):g} {k}s free" for k in missing)
        wants = ", ".join(f"{v:g} {k}" for k, v in missing.items())
        if fixed and any(total.get(k, 0.0) + 1e-9 < v for k, v in missing.items()):
            held = ", ".join(f"{total.get(k, 0.0):g} {k}s in all" for k in missing)
            raise ClusterBusy(f"{what} needs {wants} and this machine's cluster has {held}: ask for less "
                              "(ray.num_workers, ray.cpus_per_worker) or start it with more "
                              "(deepindex down; deepindex up --num-cpus N)")
        if not said:
            event("%s waits for %s (the cluster has %s; a running service, training or sweep holds the rest)",
                  what, wants, have)
            said = True
            if not fixed:
                return dict(free)  # the autoscaler may add a node: Ray's own queue waits for it
        if time.monotonic() > deadline:
            raise ClusterBusy(f"{what} needs {wants} and this machine's cluster still has {have} after "
                              f"{wait_s:.0f}s: stop what holds them (`deepindex status` lists a running service), "
                              "start the platform with more (deepindex down; deepindex up --num-cpus N), or ask for "
                              "less (ray.num_workers, ray.cpus_per_worker)")
        time.sleep(0.5)


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

    for attempt in range(1, _START_ATTEMPTS + 1):
        port = free_port()
        os.environ.update({**local_cluster_env(), "RAY_API_SERVER_ADDRESS": f"http://{HOST}:{port}"})
        before = _children()
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host=HOST,
                     dashboard_port=port, **kwargs)
            break
        except Exception as e:
            if attempt == _START_ATTEMPTS or _START_TIMEOUT not in str(e):
                raise
            log.warning("the local Ray cluster did not start (%s); starting it again", e)
            _stop_failed_start(before)
    _fixed_size(True)


# Ray gives a new node's raylet a fixed 30 s to register with its GCS, then raises out of
# ``ray.init``.  On a loaded 2-core machine that wait was seen to run out (about one start in a
# few hundred): once more, after stopping what the failed start left running.
_START_TIMEOUT = "timed out during startup"
_START_ATTEMPTS = 2


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _stop_failed_start(before: set[int]) -> None:
    """Stop the processes a failed ``ray.init`` started (its GCS, raylet, dashboard, workers).

    Ray raised before recording its node, so ``ray.shutdown`` knows none of them: they are this
    process's children that were not there before the start."""
    import psutil
    import ray

    ray.shutdown()
    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def _fixed_size(fixed: bool) -> None:
    import ray

    global _fixed_cluster
    _fixed_cluster = ray.get_runtime_context().gcs_address if fixed else None


def fixed_size() -> bool:
    """Whether the connected cluster is one of this machine's, which no autoscaler grows."""
    import ray

    return (ray.is_initialized() and _fixed_cluster is not None
            and ray.get_runtime_context().gcs_address == _fixed_cluster)


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
