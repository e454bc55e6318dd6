"""pytest-timeout's signal method, made to reach a test blocked in Ray.

pytest-timeout fails a test by raising ``Failed`` from its SIGALRM handler.  A test waiting in
``ray.get`` (a Ray deadlock: an actor that never gets its CPUs, say) is inside Ray's C++ core,
which runs Python's signal handlers itself and lets only ``KeyboardInterrupt`` and ``SystemExit``
out (``check_signals`` in ``_raylet.pyx``); any other exception is printed as "ignored" and the
wait goes on, so the timeout never ends the test and the whole suite hangs until CI kills it.

Here the handler dumps the stacks as pytest-timeout does, then raises ``KeyboardInterrupt``, which
leaves Ray's wait as one; the wrapper around the test's setup, call and teardown turns it back into
the timeout's failure of that one test, and the session goes on.  Should something swallow it
anyway, the alarm rings again every ``AGAIN_S``.  A real Ctrl-C, before the timeout, still stops
the session.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Generator
from typing import Any

import pytest
import pytest_timeout

AGAIN_S = 30.0
TIMED_OUT = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own way

    def handler(signum: int, frame: Any) -> None:
        __tracebackhide__ = True
        if not settings.disable_debugger_detection and pytest_timeout.is_debugging():
            return  # as pytest-timeout: no timeout under a debugger
        first = TIMED_OUT not in item.stash
        item.stash[TIMED_OUT] = settings.timeout
        signal.setitimer(signal.ITIMER_REAL, AGAIN_S)
        if first:
            with contextlib.suppress(pytest.fail.Exception):
                pytest_timeout.timeout_sigalrm(item, settings)  # the stacks, then its Failed (not Ray-proof)
        raise KeyboardInterrupt

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # what pytest-timeout's cancel hook calls
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


def _timed_out(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    except KeyboardInterrupt:
        if TIMED_OUT not in item.stash:
            raise  # a real Ctrl-C
    # The alarm stays set (AGAIN_S): a teardown that hangs as well is ended the same way.
    pytest.fail(pytest_timeout.PYTEST_FAILURE_MESSAGE % item.stash[TIMED_OUT], pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _timed_out(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _timed_out(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _timed_out(item))
