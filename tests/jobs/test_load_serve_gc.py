"""jobs/load_serve.py's own garbage collections: frozen out of the clients' way, and the ones that still
run reported as pauses of the load process (so a pause of the client is not read as the service's)."""
from __future__ import annotations

import gc
import time

import pytest

from tests.serving.conftest import load_job

pytestmark = pytest.mark.timeout(30)


def test_the_collections_that_run_are_reported_with_their_start_and_length() -> None:
    job = load_job()
    t0 = time.monotonic()
    garbage = [[i] for i in range(50_000)]
    with job._frozen_gc() as pauses:
        assert gc.get_freeze_count() > 0  # what existed is out of every collection meanwhile
        del garbage
        gc.collect()
        gc.collect()
    assert len(pauses) >= 2, pauses
    assert all(t0 <= at <= time.monotonic() and 0 <= s < 5 for at, s in pauses), pauses
    assert gc.get_freeze_count() == 0  # unfrozen after
    n = len(pauses)
    gc.collect()
    assert len(pauses) == n  # no longer listening
