"""The index folder under faults and hostile files: a writer SIGKILLed at random points (appending to
the delta, or compacting it into a new base) leaves every applied change loadable; a pickled array in
an index folder is refused, never unpickled.
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

N, DIM, K = 20_000, 64, 10  # large enough that a compaction takes tens of ms: some kills land mid-write
ADD = 200

# The writer: load the index, then apply batches of adds (and a delete) forever, compacting now and then;
# a line after each batch is applied (its delta synced) and after each compaction.
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from deepindex.index import store as st
    from deepindex.index.store import IndexChange, IndexStore

    st.COMPACT_MIN, st.COMPACT_FRACTION = 600, 0.0  # compact every third batch: kills land in both kinds
    path, start = sys.argv[1], int(sys.argv[2])
    ADD, K, DIM = (int(a) for a in sys.argv[3:6])
    store = IndexStore.load(path)
    rng = np.random.default_rng(start)
    print("ready", len(store), store.seq, flush=True)
    i = 0
    while True:
        seq = store.seq
        changes = [IndexChange(seq + 1 + j, "add", f"w{start}-{i}-{j}", ["1"], rng.random(K, dtype=np.float32),
                               {"penultimate": rng.random(DIM, dtype=np.float32)}) for j in range(ADD)]
        changes.append(IndexChange(seq + ADD + 1, "delete", store.ids[int(store.live_rows()[0])]))
        store.apply(changes)
        print("applied", len(store), store.seq, flush=True)
        if store.compact():
            print("compacted", len(store), store.seq, flush=True)
        i += 1
""")


def _make_index(path: Path, n: int = N):
    from deepindex.index.store import IndexStore
    from deepindex.index.vectors import VectorConfig

    rng = np.random.default_rng(0)
    store = IndexStore.create(model={"uri": "test", "name": "m", "version": "v1"}, collection="c", seq=n,
                              concepts=[str(i) for i in range(K)], ids=[f"i{j}" for j in range(n)],
                              labels=[[] for _ in range(n)], probs=rng.random((n, K), dtype=np.float32),
                              features={"penultimate": rng.random((n, DIM), dtype=np.float32)},
                              vector_cfg=VectorConfig(kind="flat"), default_feature="penultimate", image_size=8,
                              channels=1, multilabel=True)
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
    n = len(store.ids)
    assert store.vectors["penultimate"].ntotal == n == len(store.probs) == len(store.features["penultimate"])
    assert len(store) == int(store.alive.sum())
    # The last item is searchable: FAISS rows and ids agree.
    row = int(store.live_rows()[-1])
    hit = store.similar(store.features["penultimate"][row][None, :], 1)[0][0]
    assert store.ids[hit[0]] == store.ids[row] or hit[1] >= 0.999


@pytest.mark.timeout(240)
def test_writer_sigkilled_at_random_points_keeps_every_applied_change(tmp_path):
    from deepindex.index.store import IndexStore

    path = tmp_path / "coll" / "m-v1"
    _make_index(path)
    rng = random.Random(0)
    expected = (N, N)  # (live items, seq) the next writer must start from
    outcomes = []
    for round_ in range(8):
        with _script(WRITER, str(path), str(round_), str(ADD), str(K), str(DIM)) as proc:
            ready = proc.stdout.readline().split()
            assert ready == ["ready", str(expected[0]), str(expected[1])], ready  # every applied change survived
            time.sleep(rng.uniform(0.0, 1.0))
            assert _sigkill(proc) == -signal.SIGKILL  # it was still writing, not dead of an error
            lines = [line.split() for line in proc.stdout.read().splitlines()]
        store = IndexStore.load(path)
        _check_complete(store)
        applied = [(int(n), int(q)) for w, n, q in lines if w in ("applied", "compacted")]
        last = applied[-1] if applied else expected
        # Every batch whose apply returned is kept; the one in flight is there entirely or not at all.
        assert (len(store), store.seq) in (last, (last[0] + ADD - 1, last[1] + ADD + 1)), (len(store), store.seq, last)
        outcomes.append((sum(w == "applied" for w, *_ in lines), sum(w == "compacted" for w, *_ in lines)))
        expected = (len(store), store.seq)
    leftovers = sorted(q.name for q in path.parent.iterdir() if q.name.startswith("."))
    print(f"8 writers SIGKILLed: (batches applied, compactions) per round {outcomes}; final {expected}; "
          f"temp folders left after the last load: {leftovers}")
    assert expected[1] > N  # the writers did make progress between kills
    assert any(c for _, c in outcomes)  # and compacted: kills could land in a swap
    # Each load removed what the killed writer before it left (a partial copy of the whole index).
    assert not [q for q in leftovers if ".tmp-" in q or ".old-" in q], leftovers


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: proof of code execution if it ever happens."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["probs.npy", "penultimate.npy"])
def test_pickled_array_in_an_index_folder_is_refused_not_executed(tmp_path, name):
    from deepindex.index.store import IndexStore

    path = tmp_path / "m-v1"
    _make_index(path, n=50)
    marker = tmp_path / "pwned"
    np.save(path / name, np.array([_Payload(str(marker))] * 50, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        IndexStore.load(path)
    assert not marker.exists()
