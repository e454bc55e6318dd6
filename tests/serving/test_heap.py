"""serving/heap.py: when the ingress freezes its heap out of garbage collection, and unfreezes it.

The scheduler here is a list the test runs by hand (the ingress passes its event loop's
``call_later``), so no test waits on a clock; the garbage collector is this process's own, and each
test leaves it unfrozen as it found it.
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest

from serving.heap import HeapFreezer

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class Later:
    """``call_later`` that only records: ``run()`` fires what is due, in order."""

    def __init__(self) -> None:
        self.due: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, seconds: float, fn: Callable[[], None]) -> None:
        self.due.append((seconds, fn))

    def run(self) -> None:
        due, self.due = self.due, []
        for _, fn in due:
            fn()


def test_a_version_is_frozen_once_warm_and_unfrozen_when_another_comes() -> None:
    later = Later()
    heap = HeapFreezer(later, warm_s=3.0)
    heap.seen("1")
    assert gc.get_freeze_count() == 0 and [s for s, _ in later.due] == [3.0]  # not at once: once warm
    heap.seen("1")  # every spec of the same version: nothing more scheduled
    assert len(later.due) == 1
    later.run()
    assert heap.frozen and gc.get_freeze_count() > 0

    heap.seen("2")  # a new version: what the old one left is collectable at once
    assert gc.get_freeze_count() == 0 and not heap.frozen
    later.run()
    assert heap.frozen and gc.get_freeze_count() > 0


def test_the_freeze_waits_for_the_version_to_be_ready_then_gives_up_waiting() -> None:
    later = Later()
    ready: set[str] = set()
    heap = HeapFreezer(later, ready=lambda version, name: version in ready, warm_s=1.0, tries=2)
    heap.seen("1")
    later.run()
    assert not heap.frozen and len(later.due) == 1  # not loaded yet: asked again later
    ready.add("1")
    later.run()
    assert heap.frozen

    heap.seen("2")  # never ready (its index copy never loads): frozen after the tries anyway
    for _ in range(2):
        later.run()
        assert not heap.frozen
    later.run()
    assert heap.frozen and not later.due


def test_a_freeze_due_for_an_old_version_does_nothing() -> None:
    later = Later()
    heap = HeapFreezer(later)
    heap.seen("1")
    heap.seen("2")  # before "1" was warm
    later.run()  # "1"'s freeze, then "2"'s
    assert heap.version == "2" and heap.frozen and not later.due
