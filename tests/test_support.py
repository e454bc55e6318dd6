"""The suite's own helpers that a wrong answer would hide a defect with."""
from __future__ import annotations

import os
import subprocess

import pytest

from support import pid_alive, processes_of, stop_leftovers


@pytest.mark.timeout(60)
def test_processes_left_under_the_sessions_folder_are_found_and_stopped_by_pid(tmp_path):
    """What a test started (its DEEPINDEX_HOME under the folder) is found and killed, with the test
    named; a process whose state folder only shares the folder's name as a prefix is left alone."""
    mine = subprocess.Popen(["sleep", "60"], env={**os.environ, "DEEPINDEX_HOME": str(tmp_path / "t1" / "state"),
                                                  "PYTEST_CURRENT_TEST": "tests/x.py::test_y (call)"})
    other = subprocess.Popen(["sleep", "60"], env={**os.environ, "DEEPINDEX_HOME": f"{tmp_path}-other/state"})
    try:
        assert processes_of(tmp_path) == [mine.pid]
        assert stop_leftovers(tmp_path, grace=0.3) == [f"pid {mine.pid} sleep (started in tests/x.py::test_y (call))"]
        mine.wait(timeout=10)
        assert processes_of(tmp_path) == [] and pid_alive(other.pid)
    finally:
        for p in (mine, other):
            p.kill()
            p.wait(timeout=10)
