"""The index folder under faults and hostile files: a writer SIGKILLed at random points leaves the
previous complete index loadable; a pickled array in an index folder is refused, never unpickled.
(The folder swap itself, a live writer's temp folder and a kill between two renames:
``tests/test_atomic.py``.)"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow]

N, DIM, K = 20_000, 64, 10  # large enough that a save takes tens of ms: most kills land mid-write
ADD = 500

# The writer: load the index, then add items and save again, forever; a line after each save.
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from deepindex.index.store import IndexStore

    path, start = sys.argv[1], int(sys.argv[2])
    ADD, K, DIM = (int(a) for a in sys.argv[3:6])
    store = IndexStore.load(path)
    rng = np.random.default_rng(start)
    print("ready", len(store), flush=True)
    i = start
    while True:
        ids = [f"w{start}-{i}-{j}" for j in range(ADD)]
        store.add(ids, rng.random((len(ids), K), dtype=np.float32), rng.random((len(ids), DIM), dtype=np.float32),
                  rng.integers(0, 255, (len(ids), 1, 8, 8), dtype=np.uint8))
        store.save(path)
        print("saved", len(store), flush=True)
        i += 1
""")


def _make_index(path: Path, n: int = N):
    from deepindex.index.store import IndexStore
    from deepindex.index.vectors import VectorConfig

    rng = np.random.default_rng(0)
    store = IndexStore.create(model={"uri": "test", "name": "m", "version": "v1"}, collection="c",
                              concepts=[str(i) for i in range(K)], ids=[f"i{j}" for j in range(n)],
                              meta=[{} for _ in range(n)], probs=rng.random((n, K), dtype=np.float32),
                              embeddings=rng.random((n, DIM), dtype=np.float32),
                              thumbs=rng.integers(0, 255, (n, 1, 8, 8), dtype=np.uint8),
                              cfg=VectorConfig(kind="flat"), image_size=8, channels=1, multilabel=True)
    store.save(path)
    return store


@contextlib.contextmanager
def _script(code: str, *args: str):
    """``python -c code args...`` with its stdout piped; SIGKILLed on the way out if still running."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stdout.close()


def _sigkill(proc) -> int:
    os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(30)


def _check_complete(store) -> None:
    n = len(store)
    assert store.vectors.ntotal == n == len(store.probs) == len(store.embeddings) == len(store.thumbs)
    assert store.manifest.count == n
    # The last item is searchable: FAISS rows and ids agree.
    row = n - 1
    hit = store.similar(store.embeddings[row][None, :], 1)[0][0]
    assert store.ids[hit[0]] == store.ids[row] or hit[1] >= 0.999


@pytest.mark.timeout(240)
def test_writer_sigkilled_at_random_points_previous_index_stays_loadable(tmp_path):
    from deepindex.index.store import IndexStore

    path = tmp_path / "coll" / "m-v1"
    _make_index(path)
    rng = random.Random(0)
    expected = N
    outcomes = []
    for round_ in range(8):
        with _script(WRITER, str(path), str(round_), str(ADD), str(K), str(DIM)) as proc:
            ready = proc.stdout.readline().split()
            assert ready == ["ready", str(expected)], ready  # it starts from the last complete save
            time.sleep(rng.uniform(0.0, 1.0))
            assert _sigkill(proc) == -signal.SIGKILL  # it was still writing, not dead of an error
            saved = [int(line.split()[1]) for line in proc.stdout.read().splitlines() if line.startswith("saved")]
        store = IndexStore.load(path)
        _check_complete(store)
        last = saved[-1] if saved else expected
        # Every save that reported success is kept; the one in flight is there entirely or not at all.
        assert len(store) in (last, last + ADD), (len(store), saved)
        outcomes.append((len(saved), len(store) - last))
        expected = len(store)
    leftovers = sorted(q.name for q in path.parent.iterdir() if q.name.startswith("."))
    print(f"8 writers SIGKILLed: (saves completed, in-flight save landed) per round {outcomes}; "
          f"final {expected} items; temp folders left after the last load: {leftovers}")
    assert expected > N  # the writers did make progress between kills
    # Each load removed what the killed writer before it left (a partial copy of the whole index).
    assert not [q for q in leftovers if ".tmp-" in q or ".old-" in q], leftovers


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: proof of code execution if it ever happens."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["probs.npy", "embeddings.npy", "thumbs.npy"])
def test_pickled_array_in_an_index_folder_is_refused_not_executed(tmp_path, name):
    from deepindex.index.store import IndexStore

    path = tmp_path / "m-v1"
    _make_index(path, n=50)
    marker = tmp_path / "pwned"
    np.save(path / name, np.array([_Payload(str(marker))] * 50, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        IndexStore.load(path)
    assert not marker.exists()
