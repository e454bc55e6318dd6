"""deepindex.atomic under faults: a failed or killed writer never leaves a half-written file or
folder in place of the old one, a live writer's temp folder is never swept, a dead one's is."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deepindex.atomic import recover_all, swap_dir, write_file

pytestmark = pytest.mark.timeout(60)

DONE = "DONE"  # the file a complete folder holds, written last


def _fill(n: int):
    def write(tmp: Path) -> None:
        (tmp / "data").write_text("x" * n)
        (tmp / DONE).write_text(str(n))
    return write


class Boom(Exception):
    pass


def test_write_file_replaces_whole_or_not_at_all(tmp_path):
    f = tmp_path / "state.json"
    write_file(f, "old")
    write_file(f, b"new")
    assert f.read_text() == "new"

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise Boom()

    with pytest.raises(Boom):
        write_file(f, broken)
    assert f.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["state.json"]


def test_swap_dir_replaces_and_keeps_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "idx"
    swap_dir(target, _fill(1), DONE)
    swap_dir(target, _fill(2), DONE)
    assert (target / DONE).read_text() == "2" and sorted(os.listdir(tmp_path)) == ["idx"]

    def broken(tmp: Path) -> None:
        (tmp / "partial").write_text("x")
        raise Boom()

    with pytest.raises(Boom):
        swap_dir(target, broken, DONE)
    assert (target / DONE).read_text() == "2" and sorted(os.listdir(tmp_path)) == ["idx"]


def _script(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


def _sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.stdout is not None
    proc.stdout.close()


HOLDER = """
    import sys, threading
    from deepindex.atomic import swap_dir

    def write(tmp):
        print("writing", tmp, flush=True)
        threading.Event().wait()  # a slow writer, alive until the test kills it

    swap_dir(sys.argv[1], write, "DONE")
"""


def test_a_live_writers_temp_folder_is_kept_a_dead_ones_is_removed(tmp_path):
    target = tmp_path / "idx"
    swap_dir(target, _fill(1), DONE)
    proc = _script(HOLDER, str(target))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[0] == "writing", line
        tmp = Path(line[1])
        assert tmp.is_dir() and ".tmp-" in tmp.name
        swap_dir(target, _fill(2), DONE)  # another writer meanwhile: the live one's folder stays
        assert tmp.is_dir()
    finally:
        _sigkill(proc)
    assert tmp.is_dir()  # nothing runs on a kill: the folder is left...
    swap_dir(target, _fill(3), DONE)  # ...until the next write (or load) sweeps it
    assert not tmp.exists() and sorted(os.listdir(tmp_path)) == ["idx"]


MOVER = """
    import os, sys, threading
    from deepindex import atomic

    # The fallback swap (no renameat2): stop right after the old version was moved aside.
    atomic._exchange = lambda a, b: False
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if str(dst).endswith("/x"):
            print("moved", flush=True)
            threading.Event().wait()  # the test kills us here

    os.rename = rename
    atomic.swap_dir(sys.argv[1], lambda tmp: (tmp / "DONE").write_text("new"), "DONE")
"""


def test_writer_killed_between_the_two_renames_the_previous_folder_is_put_back(tmp_path):
    target = tmp_path / "coll" / "m-v1"
    swap_dir(target, _fill(1), DONE)
    proc = _script(MOVER, str(target))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "moved"
    _sigkill(proc)
    assert not target.exists()  # the window this test is about: the old version sits under .old-*/x
    recover_all(target.parent, DONE)  # what a lookup in the collection folder runs first
    assert (target / DONE).read_text() == "1"
    assert sorted(os.listdir(target.parent)) == ["m-v1"]


def test_the_rename_itself_is_synced_after_the_new_bytes(tmp_path, monkeypatch):
    """Found on review: the new bytes were synced, but not the folder that the rename changed, so after a
    power cut (not a kill) the old version could come back.  Each write syncs the folder after its rename,
    and a swapped-in folder's own entries before it."""
    synced: list[tuple[str, int]] = []  # ("file" | "dir", inode) in the order they were synced
    real = os.fsync

    def record(fd: int) -> None:
        st = os.fstat(fd)
        synced.append(("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file", st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    target = write_file(tmp_path / "state.json", "{}")
    assert synced == [("file", target.stat().st_ino), ("dir", tmp_path.stat().st_ino)]

    synced.clear()

    def fill(d: Path) -> None:
        (d / "sub").mkdir()
        (d / "sub" / "a").write_text("a")
        (d / "DONE").write_text("")

    folder = swap_dir(tmp_path / "idx", fill, "DONE")
    dirs = [ino for kind, ino in synced if kind == "dir"]
    assert dirs[-1] == tmp_path.stat().st_ino  # the swap, last
    assert folder.stat().st_ino in dirs and (folder / "sub").stat().st_ino in dirs  # their entries, before it
    assert {ino for kind, ino in synced if kind == "file"} == {(folder / "sub" / "a").stat().st_ino,
                                                              (folder / "DONE").stat().st_ino}
