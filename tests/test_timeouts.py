"""The suite's timeouts reach a test blocked in Ray (tests/timeouts.py): one test fails, the rest run."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

INNER = '''
import time

import pytest
import ray


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.timeout(3, func_only=True)  # the test's body: starting Ray may take longer
def test_waits_for_cpus_that_never_come(cluster):
    @ray.remote(num_cpus=2)
    class Greedy:
        def ping(self):
            return 1

    ray.get(Greedy.remote().ping.remote())  # a deadlock: the cluster has 1 CPU


@pytest.mark.timeout(3, func_only=True)  # the test's body: starting Ray may take longer
def test_sleeps_in_python():
    time.sleep(600)


def test_the_session_goes_on(cluster):
    assert ray.get(ray.put(41)) + 1 == 42
'''


def test_a_test_blocked_in_ray_get_fails_at_its_timeout_and_the_session_goes_on(pytester: pytest.Pytester,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    # pytest-timeout alone raises from its SIGALRM handler, which Ray's wait swallows: this inner
    # session would hang until the 150 s below.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    pytester.makeconftest('pytest_plugins = ["timeouts"]\n')
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rf", timeout=150)
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["FAILED *::test_waits_for_cpus_that_never_come - Failed: Timeout*",
                                 "FAILED *::test_sleeps_in_python - Failed: Timeout*"])
