"""A model replica following the index replica's choice of version (serving/model.py ``_follow``).

The index replica is a stand-in here (it answers ``report_model`` with the version to serve and
records each report): these tests are about the follower, its caller.  Loads are held on an event, so
nothing depends on how long anything takes.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from deepindex.tracking.registry import ResolvedModel
from serving import model as served_model
from serving.model import ServedModel, _Served

pytestmark = pytest.mark.timeout(60)


class StandInIndex:
    """Answers every report with ``want``; ``reports`` holds the versions reported, in order, ``models`` the
    (name, version) pairs."""

    def __init__(self, want: dict[str, Any]) -> None:
        self.want, self.reports, self.models = want, list[str](), list[tuple[str | None, str]]()
        self.report_model = self

    def remote(self, replica: str, version: str, name: str | None = None) -> Any:
        self.reports.append(version)
        self.models.append((name, version))

        async def answer() -> dict[str, Any]:
            return self.want
        return answer()


def _served(version: str, name: str = "m") -> _Served:
    return _Served(ResolvedModel(f"/models/{version}/checkpoint.pt", name, version), None, 8)  # type: ignore[arg-type]


def _replica(index: StandInIndex, version: str) -> ServedModel:
    m = object.__new__(ServedModel)  # no Serve replica around it: the follower's state only
    m._served, m._index, m._replica, m._tracking_uri = _served(version), index, "replica-1", None
    m._max_batch, m._batch_size, m.reloads, m.last_error = 32, 8, 0, None
    m._wanted, m._load_error, m._refused_at = None, None, {}
    return m


async def _until(predicate: Any, what: str) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)
    try:
        await asyncio.wait_for(poll(), 10)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None



def _deepindex_replica_told_photos(monkeypatch: pytest.MonkeyPatch, load: Any) -> tuple[Any, Any]:
    """A model replica serving deepindex version 1, whose index replica names photos version 1 (``load``: what
    loading a model does)."""
    monkeypatch.setattr(served_model, "_load", load)
    monkeypatch.setattr(ServedModel, "infer", type("Batch", (), {"set_max_batch_size": lambda self, n: None})())
    index = StandInIndex({"name": "photos", "version": "1", "ref": "models:/photos/1"})
    m = _replica(index, "1")
    m._served = _served("1", "deepindex")
    return index, m

def test_a_replica_reports_the_version_it_serves_all_through_a_long_load(monkeypatch: pytest.MonkeyPatch):
    """Found on review: the follower awaited the load in its poll loop and reported nothing meanwhile; the
    index replica, hearing from no replica on the old version, unloaded its index while the replica still
    answered with the old model (503s for its searches and item reads, /readyz 503)."""
    monkeypatch.setattr(served_model, "POLL_S", 0.01)
    started, release = threading.Event(), threading.Event()
    loads: list[str] = []

    def load(ref: str, *args: object) -> _Served:
        loads.append(ref)
        started.set()
        assert release.wait(30), "the test never released the load"
        return _served("2")

    monkeypatch.setattr(served_model, "_load", load)
    monkeypatch.setattr(ServedModel, "infer", type("Batch", (), {"set_max_batch_size": lambda self, n: None})())
    index = StandInIndex({"name": "m", "version": "2", "ref": "models:/m/2"})
    m = _replica(index, "1")

    async def scenario() -> None:
        follower = asyncio.get_running_loop().create_task(m._follow())
        try:
            await _until(started.is_set, "the load of version 2 started")
            during = len(index.reports)
            await _until(lambda: len(index.reports) >= during + 20, "reports while version 2 loads")
            assert set(index.reports) == {"1"} and m._served.resolved.version == "1"
            release.set()
            await _until(lambda: m._served.resolved.version == "2", "version 2 swapped in")
            await _until(lambda: index.reports[-1] == "2", "version 2 reported")
            assert loads == ["models:/m/2"] and m.reloads == 1 and m.last_error is None
        finally:
            release.set()
            follower.cancel()

    asyncio.run(scenario())


def test_a_model_file_that_holds_another_version_is_not_swapped_in_nor_loaded_on_every_poll(
        monkeypatch: pytest.MonkeyPatch):
    """Found on review: a checkpoint path replaced since the index was built holds another version; the
    replica loaded it, saw the wrong version and loaded it again on every poll (a full load and batch
    timing each time).  It keeps serving what it serves, says why, and tries again only later."""
    monkeypatch.setattr(served_model, "POLL_S", 0.01)
    loads: list[str] = []

    def load(ref: str, *args: object) -> _Served:
        loads.append(ref)
        return _served("file-b")  # the file was replaced: not the version the index was built with

    monkeypatch.setattr(served_model, "_load", load)
    index = StandInIndex({"name": "m", "version": "file-a", "ref": "/models/m.pt"})
    m = _replica(index, "file-c")

    async def scenario() -> None:
        follower = asyncio.get_running_loop().create_task(m._follow())
        try:
            await _until(lambda: m.last_error is not None, "the refusal said")
            await _until(lambda: len(index.reports) >= 30, "30 polls")
        finally:
            follower.cancel()

    asyncio.run(scenario())
    assert loads == ["/models/m.pt"]
    assert m._served.resolved.version == "file-c" and m.reloads == 0
    assert m.last_error == "model: /models/m.pt holds version file-b, not version file-a that the index serves"


def test_the_same_version_of_another_model_name_is_loaded(monkeypatch: pytest.MonkeyPatch):
    """Registry versions restart at 1 for every name: a replica serving deepindex version 1, told to serve
    photos version 1, compared versions only and never loaded photos (found on review)."""
    monkeypatch.setattr(served_model, "POLL_S", 0.01)
    loads: list[str] = []

    def load(ref: str, *args: object) -> _Served:
        loads.append(ref)
        return _served("1", "photos")

    index, m = _deepindex_replica_told_photos(monkeypatch, load)

    async def scenario() -> None:
        follower = asyncio.get_running_loop().create_task(m._follow())
        try:
            await _until(lambda: m._served.resolved.name == "photos", "photos version 1 swapped in")
            await _until(lambda: len(index.reports) >= 20, "20 polls")
        finally:
            follower.cancel()

    asyncio.run(scenario())
    assert loads == ["models:/photos/1"] and m.reloads == 1 and m.last_error is None


def test_a_replica_reports_the_name_of_the_model_it_serves_not_its_version_alone(monkeypatch: pytest.MonkeyPatch):
    """Registry versions restart at 1 for every name.  A replica reported its version alone: still on
    deepindex version 1 while it loaded photos version 1, it reported "1", which the index replica read as
    photos', unloaded deepindex's index under it, and searched its requests in photos' (found on review)."""
    monkeypatch.setattr(served_model, "POLL_S", 0.01)
    started, release = threading.Event(), threading.Event()

    def load(ref: str, *args: object) -> _Served:
        started.set()
        assert release.wait(30), "the test never released the load"
        return _served("1", "photos")

    index, m = _deepindex_replica_told_photos(monkeypatch, load)

    async def scenario() -> None:
        follower = asyncio.get_running_loop().create_task(m._follow())
        try:
            await _until(started.is_set, "the load of photos version 1 started")
            await _until(lambda: len(index.models) >= 10, "reports while photos loads")
            assert set(index.models) == {("deepindex", "1")}
            release.set()
            await _until(lambda: index.models[-1] == ("photos", "1"), "photos version 1 reported")
        finally:
            release.set()
            follower.cancel()

    asyncio.run(scenario())


def test_the_retrieval_report_of_the_same_version_of_another_model_is_read_again(monkeypatch: pytest.MonkeyPatch):
    """The report was cached per version: after deepindex version 1 -> photos version 1, /v1/about showed
    deepindex's figures as photos' (found on review)."""
    read: list[tuple[str, str]] = []

    def report_for(r: ResolvedModel, tracking_uri: str | None = None) -> dict[str, Any]:
        read.append((r.name, r.version))
        return {"of": r.name}

    monkeypatch.setattr("deepindex.tracking.retrieval.report_for", report_for)
    m = _replica(StandInIndex({}), "1")
    m._served, m._report, m._report_at = _served("1", "deepindex"), None, 0.0
    assert asyncio.run(m.retrieval()) == {"name": "deepindex", "version": "1", "report": {"of": "deepindex"}}
    asyncio.run(m.retrieval())  # read once per model
    m._served = _served("1", "photos")
    assert asyncio.run(m.retrieval()) == {"name": "photos", "version": "1", "report": {"of": "photos"}}
    assert read == [("deepindex", "1"), ("photos", "1")]
