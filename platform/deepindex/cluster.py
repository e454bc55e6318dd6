"""Connecting to Ray: a remote cluster (``RAY_ADDRESS``), the local platform, or a new local one."""
from __future__ import annotations

import logging
import os
from typing import Any

from deepindex.serve_env import serve_env

log = logging.getLogger(__name__)


def connect(num_cpus: int | None = None, **kwargs: Any) -> None:
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


def _reload_ray_auth() -> None:
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
