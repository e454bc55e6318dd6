"""After a switch, the rollover keeps the old pair loaded for as long as a model replica answers with
its version, however long that is, and unloads it ``OLD_GRACE_S`` after the last one moved.

The index replica here is a stand-in holding only what the rollover reads of it (its pairs, the
served version, the model replicas' reports): the test is about the rollover's rule, on a clock it
controls.  ``test_serving_rollover.py`` checks the same rule in the real service, with a model
replica that lags.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.rollover import OLD_GRACE_S, Rollover
from serving.schemas import ServeArgs


class _IndexServerStandIn:
    """What :class:`serving.rollover.Rollover` reads of ``serving.index.IndexServer``."""

    def __init__(self, index_dir: Path):
        self.args = ServeArgs(model="unused", index_dir=str(index_dir))
        self.pairs: dict[str, object] = {"1": object(), "2": object()}  # version 2 just switched to
        self.serving = "2"
        self.reports: dict[str, str] = {}  # model replica -> the version it answers with
        self.store = SimpleNamespace(head=lambda: 0)  # the collection: no change since any index's snapshot

    def model_versions(self) -> dict[str, str]:
        return dict(self.reports)


class _EmptyIndex(list):
    """An index of no item at the collection's start (what the rollover reads of one: its length, its seq)."""

    seq = 0


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(30)
def test_the_old_pair_stays_while_a_model_replica_is_on_it_and_goes_after_the_grace(tmp_path: Path) -> None:
    server, clock = _IndexServerStandIn(tmp_path), _Clock()
    roll = Rollover(server, clock=clock)  # type: ignore[arg-type]  # the stand-in
    server.reports = {"a": "2", "b": "1"}  # replica b still loads version 2 and answers with 1

    assert roll._settle() is True
    assert set(server.pairs) == {"1", "2"} and roll.phase == "switching"
    assert roll.message == "model replicas moving to version 2; 1 of 2 still on an older one"
    clock.now += 3600  # an hour later, b is still on version 1: its requests still find their index
    assert roll._settle() is True and set(server.pairs) == {"1", "2"}

    server.reports = {"a": "2", "b": "2"}  # b moved
    clock.now += OLD_GRACE_S - 0.1
    assert roll._settle() is True and "1" in server.pairs  # within the grace (ingress caches)
    assert roll.message == "model replicas moving to version 2"
    clock.now += 0.1
    assert roll._settle() is False and set(server.pairs) == {"2"}


@pytest.mark.timeout(30)
def test_a_model_replica_that_stopped_reporting_holds_nothing(tmp_path: Path) -> None:
    """Reports drop out of ``model_versions`` when a replica stops (dies, scales down): no replica
    answering with the old version means the old pair goes after the grace."""
    server, clock = _IndexServerStandIn(tmp_path), _Clock()
    roll = Rollover(server, clock=clock)  # type: ignore[arg-type]  # the stand-in
    assert roll._settle() is True and "1" in server.pairs  # the grace starts when first seen unused
    clock.now += OLD_GRACE_S
    assert roll._settle() is False and set(server.pairs) == {"2"}
    assert roll._settle() is False  # nothing left to settle


@pytest.mark.timeout(30)
def test_reload_interval_zero_never_looks_at_the_model_uri_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``reload_interval_s: 0`` is "never" (serving.schemas); the loop looked again every hour, so a
    benchmark that pins its model with it switched models mid-run after a promotion."""
    server = _IndexServerStandIn(tmp_path)
    server.args = ServeArgs(model="unused", index_dir=str(tmp_path), reload_interval_s=0)
    r = Rollover(server)  # type: ignore[arg-type]
    steps: list[int] = []
    waits: list[float | None] = []
    monkeypatch.setattr(r, "_step", lambda: steps.append(1))

    class Poke:  # the loop's wake-up event: records how long the loop would sleep, ends it at the second
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout)
            if len(waits) == 2:
                r._stop.set()
            return True

        def clear(self) -> None:
            pass

    r._poke = Poke()  # type: ignore[assignment]
    r._run()
    assert steps == [1, 1] and waits == [None, None]


@pytest.mark.timeout(30)
def test_the_same_version_of_another_model_name_is_a_new_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registry versions restart at 1 for every name.  A service started again with --model
    models:/photos@champion on a collection whose index served deepindex version 1 stayed idle (version
    1 is served), tagging with photos' model and searching deepindex's index (found on review)."""
    from types import SimpleNamespace

    from deepindex.tracking import registry

    server = _IndexServerStandIn(tmp_path)
    server.pairs = {"1": SimpleNamespace(name="deepindex", version="1", index=_EmptyIndex())}
    server.serving = "1"
    r = Rollover(server)  # type: ignore[arg-type]
    prepared: list[dict[str, str]] = []
    monkeypatch.setattr(registry, "resolve_model", lambda uri, tracking_uri=None: registry.ResolvedModel(
        "/m/checkpoint.pt", "photos", "1"))
    monkeypatch.setattr(r, "_prepare", lambda target, build: prepared.append(dict(target)) or SimpleNamespace(
        name=target["name"], version=target["version"], index=_EmptyIndex()))
    monkeypatch.setattr(r, "_activate", lambda pair, reason: server.pairs.update({pair.version: pair}))
    monkeypatch.setattr(r, "_gc", lambda: None)
    r._step()
    assert prepared == [{"name": "photos", "version": "1", "ref": "models:/photos/1"}]
    assert server.pairs["1"].name == "photos"
    r._step()  # now served: nothing more to do
    assert len(prepared) == 1 and r.phase == "idle"


@pytest.mark.timeout(30)
def test_a_restart_does_not_restore_a_checkpoint_path_replaced_in_place(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """``serving.json`` names the version a checkpoint path held; if the file now holds another, the old
    version's index is not loaded with the new file's weights (every item added since, and every uploaded
    example, would be embedded in another space than the index's): the loop picks the new version."""
    import json

    from deepindex.checkpoint import checkpoint_version
    from deepindex.tracking.registry import LOCAL
    from serving.rollover import STATE_FILE

    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"the weights the index was built with")
    old = checkpoint_version(ckpt)
    server = _IndexServerStandIn(tmp_path / "indexes")
    server.pairs, server.serving = {}, None  # a replica that just started
    (tmp_path / "indexes").mkdir()
    (tmp_path / "indexes" / STATE_FILE).write_text(json.dumps({"name": LOCAL, "version": old, "ref": str(ckpt)}))
    ckpt.write_bytes(b"other weights, written over the same file")

    def no_lookup(*a: object) -> None:
        raise AssertionError("the replaced version's index was looked up")

    monkeypatch.setattr("deepindex.index.store.find_index", no_lookup)
    caplog.set_level("WARNING", logger="serving.rollover")
    Rollover(server).restore()  # type: ignore[arg-type]  # the stand-in
    assert server.serving is None and server.pairs == {}
    new = checkpoint_version(ckpt)
    assert [r.getMessage() for r in caplog.records] == [
        f"rollover: the saved pair {{'name': '{LOCAL}', 'version': '{old}', 'ref': '{ckpt}'}} could not be restored "
        f"({ckpt} now holds version {new} of {LOCAL}, not {old} (replaced in place))"]


@pytest.mark.timeout(60)
def test_changes_made_outside_the_service_reach_the_served_index(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`deepindex collection rm` (or add, import, the k8s import Job) changes the catalogue behind the
    service's back: only its own HTTP writes caught the served index up, so a deleted item stayed in search
    results until the next HTTP write (found on review).  Each step of the rollover applies them now, under
    the write lock, before it looks at the model URI (a registry that does not answer must not hold it up).
    The collection is real; the index replica is the stand-in, recording the catch-ups it is asked for."""
    import threading

    import numpy as np

    from deepindex.collection import CollectionStore
    from deepindex.collection.imports import png_bytes
    from deepindex.tracking import registry

    store = CollectionStore.open("photos", blobs_url=str(tmp_path / "blobs"))
    for i in range(3):
        store.add(f"p{i}", png_bytes(np.full((8, 8), 40 * i, np.uint8)), tags=["a"])
    server = _IndexServerStandIn(tmp_path)
    index = SimpleNamespace(seq=store.head())
    server.pairs, server.serving = {"1": SimpleNamespace(name="m", version="1", index=index)}, "1"
    server.store, server._write = store, threading.RLock()
    synced: list[tuple[int, bool]] = []

    def sync_all(upto: int) -> None:
        synced.append((upto, server._write._is_owned()))  # type: ignore[attr-defined]
        index.seq = upto

    server._sync_all = sync_all
    r = Rollover(server)  # type: ignore[arg-type]
    monkeypatch.setattr(registry, "resolve_model", lambda uri, tracking_uri=None: registry.ResolvedModel(
        "/m/checkpoint.pt", "m", "1"))
    r._step()
    assert synced == []  # nothing changed since the index's snapshot
    store.delete("p1")  # what `deepindex collection rm photos p1` does, in another process
    r._step()
    assert synced == [(store.head(), True)] and r.phase == "idle"
    r._step()
    assert len(synced) == 1  # caught up: nothing more
    monkeypatch.setattr("serving.rollover.FOLLOW_BATCH", 2)  # an import: a few changes at a time, the lock let go
    start = store.head()
    for i in (10, 11, 12):
        store.add(f"p{i}", png_bytes(np.full((8, 8), i, np.uint8)))
    r._step()
    assert synced[1:] == [(start + 2, True), (start + 3, True)]

    def registry_down(uri: str, tracking_uri: str | None = None) -> None:
        raise OSError("the registry does not answer")

    monkeypatch.setattr(registry, "resolve_model", registry_down)
    store.add("p3", png_bytes(np.full((8, 8), 200, np.uint8)))
    with pytest.raises(OSError):
        r._step()
    assert synced[-1] == (store.head(), True)  # applied before the model URI was looked at
