"""Connecting to Ray: a remote cluster (``RAY_ADDRESS``), the local platform, or a new local one."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect(num_cpus: int | None = None, **kwargs) -> None:
    """``ray.init`` once: ``RAY_ADDRESS`` if set, else a fresh local cluster.

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
    n = num_cpus or int(os.environ.get("DEEPINDEX_NUM_CPUS", "0")) or max(4, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=n, include_dashboard=False, **kwargs)
