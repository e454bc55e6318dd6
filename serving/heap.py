"""The ingress's long-lived objects kept out of Python's full garbage collections once it is warm.

Ray Serve freezes the garbage collector's view of a replica when the replica has started
(``gc.freeze()``: what exists then is never scanned again).  What an ingress loads afterwards stays
in the scan: the served index's copy (``serving/reads.py``), FAISS's and the vocabulary's modules,
the handles' routers.  Under search load, requests alive across young collections promote enough
objects that a full collection runs every 1-2 s, and each one walked those ~27,000 long-lived
objects for 8-14 ms with every request in flight waiting (measured with ``gc.callbacks`` in the
ingress under ``jobs/bench_search.py``'s 32 clients; 0.6-1.2 ms once they were frozen).

So, a few seconds after a model version is first served (once its local index copy is loaded,
where the ingress answers searches itself), what exists is frozen.  When another version comes,
everything is unfrozen first, so that what the old version leaves behind can be collected (one
full collection then walks the whole heap once), and the new version's objects are frozen when it
is warm in turn.  Frozen objects are still freed when their last reference goes; only a reference
cycle among them waits for the next version.
"""
from __future__ import annotations

import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

WARM_S = 3.0  # after a version is first served, how long until its objects are frozen
TRIES = 20  # how many times the freeze waits another WARM_S for the version to be ready


class HeapFreezer:
    """``seen(version, name)`` on every spec of the served model (a model is its name and version: registry
    versions restart at 1 for every name); ``call_later(seconds, fn)`` schedules (the event loop's),
    ``ready(version, name)`` says whether that model's long-lived objects are loaded (None: nothing more to
    load)."""

    def __init__(self, call_later: Callable[[float, Callable[[], None]], object],
                 ready: Callable[[str, str | None], bool] | None = None, warm_s: float = WARM_S,
                 tries: int = TRIES) -> None:
        self._call_later = call_later
        self._ready = ready
        self.warm_s, self.tries = warm_s, tries
        self.version: str | None = None
        self.name: str | None = None  # the model's name (None: not said)
        self.frozen = False  # whether this freezer froze the heap (for the current version)

    def seen(self, version: str, name: str | None = None) -> None:
        if (name, version) == (self.name, self.version):
            return
        if self.frozen:
            gc.unfreeze()  # the old version's objects become collectable again
            self.frozen = False
        self.version, self.name = version, name
        self._later(version, name, self.tries)

    def _later(self, version: str, name: str | None, tries: int) -> None:
        self._call_later(self.warm_s, lambda: self._freeze(version, name, tries))

    def _freeze(self, version: str, name: str | None, tries: int) -> None:
        if (name, version) != (self.name, self.version) or self.frozen:
            return  # another version came meanwhile: its own freeze is scheduled
        if self._ready is not None and not self._ready(version, name) and tries > 0:
            self._later(version, name, tries - 1)
            return
        gc.freeze()
        self.frozen = True
        log.info("model version %s warm: %d objects kept out of garbage collection", version, gc.get_freeze_count())
