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

# serving.index before any test patches deepindex.index.store.find_index: serving.reads binds it on import, and
# bound to a test's stand-in it answered the next test's local reads (seen in a run).
import serving.index  # noqa: F401
from serving.rollover import OLD_GRACE_S, Rollover
from serving.schemas import ServeArgs


class _IndexServerStandIn:
    """What :class:`serving.rollover.Rollover` reads of ``serving.index.IndexServer``."""

    def __init__(self, index_dir: Path):
        self.args = ServeArgs(model="unused", index_dir=str(index_dir))
        # version 2 just switched to (keyed as the test reads them; each pair names its model)
        self.pairs: dict[object, object] = {v: SimpleNamespace(name="m", version=v) for v in ("1", "2")}
        self.serving = "2"
        self.reports: dict[str, object] = {}  # model replica -> the model it answers with (as pairs are keyed)
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


# ---- a model is its name and version ------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_the_same_version_of_another_model_is_served_beside_the_old_until_no_model_replica_answers_with_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registry versions restart at 1 for every name.  Keyed by version, photos version 1 replaced deepindex
    version 1 at once: a model replica still on deepindex reported "1", so nothing waited for it, and its
    requests were searched in photos' index (found on review).  Pairs and reports are keyed by both now."""
    import json
    import threading

    from deepindex.tracking import registry
    from serving.rollover import STATE_FILE

    deepindex, photos = ("deepindex", "1"), ("photos", "1")  # (name, version): serving.rollover.ModelKey's tuple
    server, clock = _IndexServerStandIn(tmp_path), _Clock()
    server.pairs = {deepindex: SimpleNamespace(name="deepindex", version="1", ref="models:/deepindex/1",
                                               index=_EmptyIndex())}
    server.serving, server._write = deepindex, threading.RLock()
    server.reports = {"a": deepindex}  # a model replica still loading photos: it answers with deepindex 1
    r = Rollover(server, clock=clock)  # type: ignore[arg-type]  # the stand-in
    monkeypatch.setattr(registry, "resolve_model", lambda uri, tracking_uri=None: registry.ResolvedModel(
        "/m/checkpoint.pt", "photos", "1"))
    monkeypatch.setattr(r, "_prepare", lambda target, build: SimpleNamespace(
        name=target["name"], version=target["version"], ref=target["ref"], index=_EmptyIndex(), embed=None))
    monkeypatch.setattr("deepindex.index.catchup.catch_up", lambda *a, **kw: 0)  # nothing changed meanwhile
    collected: list[object] = []
    monkeypatch.setattr(r, "_gc", lambda: collected.append(server.serving))
    r._step()  # the real switch (_activate), under the write lock
    assert server.serving == photos and set(server.pairs) == {deepindex, photos}
    assert [server.pairs[k].name for k in (deepindex, photos)] == ["deepindex", "photos"]
    assert r.phase == "switching" and r.message == "model replicas moving to version 1; 1 of 1 still on an older one"
    assert r.model_target() == {"name": "photos", "version": "1", "ref": "models:/photos/1"}
    st = r.status()
    assert (st["serving"], st["serving_name"]) == ("1", "photos")
    assert json.loads((r.dir / STATE_FILE).read_text()) == {"name": "photos", "version": "1", "ref": "models:/photos/1"}
    clock.now += 3600  # an hour later the replica is still on deepindex: its requests still find their index
    assert r._settle() is True and deepindex in server.pairs and not collected
    server.reports = {"a": photos}  # it moved
    clock.now += OLD_GRACE_S
    assert r._settle() is False and set(server.pairs) == {photos} and collected == [photos]


@pytest.mark.timeout(30)
def test_the_old_index_of_the_same_version_of_another_model_is_removed_beyond_keep_indexes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_gc`` kept every folder of the served version, whatever its model: deepindex version 1's index
    stayed on disk for ever once photos version 1 was served (found on review)."""
    import threading

    server = _IndexServerStandIn(tmp_path)
    server.args = ServeArgs(model="unused", index_dir=str(tmp_path), keep_indexes=1)
    server.pairs, server.serving, server._write = {}, None, threading.RLock()
    folders = {name: tmp_path / f"{name}-1" for name in ("deepindex", "photos")}  # oldest first
    for f in folders.values():
        f.mkdir()
    monkeypatch.setattr("deepindex.index.store.list_indexes", lambda d: [
        (f, SimpleNamespace(model=SimpleNamespace(name=name, version="1")))
        for name, f in folders.items() if f.is_dir()])
    monkeypatch.setattr("deepindex.index.catchup.catch_up", lambda *a, **kw: 0)
    r = Rollover(server)  # type: ignore[arg-type]  # the stand-in
    r._activate(SimpleNamespace(name="photos", version="1", ref="models:/photos/1", index=_EmptyIndex(),  # type: ignore[arg-type]
                                embed=None), reason="a test")
    r._gc()
    assert not folders["deepindex"].exists() and folders["photos"].is_dir()


# ---- the service's features decide which index is good enough ------------------------------------------
def _index_folder(root: Path, features: list[str], name: str = "m", version: str = "1") -> Path:
    """A real (empty) index of model ``name`` ``version`` holding ``features``, in the collection's folder."""
    import numpy as np

    from deepindex.index.store import IndexStore, index_dir_name
    from deepindex.index.vectors import VectorConfig

    path = root / index_dir_name(name, version)
    IndexStore.create(model={"uri": f"models:/{name}/{version}", "name": name, "version": version},
                      collection=ServeArgs(model="unused").collection, seq=0, concepts=["a", "b"], ids=[], labels=[],
                      probs=np.zeros((0, 2), np.float32), features={f: np.zeros((0, 4), np.float32) for f in features},
                      vector_cfg=VectorConfig(), default_feature=features[0], image_size=8, channels=1,
                      multilabel=False).save(path)
    return path


class _Built(Exception):
    """The build stand-in's way to stop the rollover once it asked for a build."""


class _Loaded(Exception):
    """The model-loading stand-in's way to stop the rollover once it loads a found index."""


def _no_registry_no_model(monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[str] | None], list[str]]:
    """resolve_model names model m version 1; the builds asked for (their features) and the models loaded
    are recorded, and each stops the rollover there."""
    from deepindex.tracking import registry

    builds: list[list[str] | None] = []
    loads: list[str] = []
    monkeypatch.setattr(registry, "resolve_model", lambda uri, tracking_uri=None: registry.ResolvedModel(
        "/m/checkpoint.pt", "m", "1"))

    def build_index(ref: str, **kw: object) -> None:
        builds.append(kw["features"])  # type: ignore[arg-type]
        raise _Built

    def load_model(path: str) -> None:
        loads.append(path)
        raise _Loaded

    monkeypatch.setattr("deepindex.index.build.build_index", build_index)
    monkeypatch.setattr("deepindex.checkpoint.load_model", load_model)
    return builds, loads


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("held", "features", "built"), [
    (["penultimate"], ["penultimate", "last_but_two"], True),  # last_but_two added to features: built again
    (["penultimate"], ["last_but_two"], True),
    (["last_but_two"], None, True),  # features unset: penultimate, the default
    (["penultimate"], None, False),
    (["penultimate", "last_but_two"], ["last_but_two"], False),  # holds more than asked: good enough
    (["penultimate"], ["probs", "penultimate"], False),  # probs is in every index
])
def test_an_index_that_lacks_a_descriptor_of_features_is_built_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: list[str], features: list[str] | None,
        built: bool) -> None:
    """The 422 ``bad_feature`` and ``serving/config.yaml`` say to add a descriptor (last_but_two) to the
    service's ``features`` to query it; the version's index folder was loaded whatever it held, so the
    change never took effect for a version that had an index (found on review)."""
    server = _IndexServerStandIn(tmp_path)
    server.args = ServeArgs(model="unused", index_dir=str(tmp_path), features=features)
    server.pairs, server.serving = {}, None
    _index_folder(tmp_path, held)
    builds, loads = _no_registry_no_model(monkeypatch)
    r = Rollover(server)  # type: ignore[arg-type]  # the stand-in
    with pytest.raises(_Built if built else _Loaded):
        r._step()
    assert builds == ([server.args.features] if built else [])
    assert loads == ([] if built else ["/m/checkpoint.pt"])


@pytest.mark.timeout(60)
def test_a_restart_does_not_restore_an_index_that_lacks_a_descriptor_of_features(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``serving.json`` names the pair served before the restart; an index without a descriptor the
    service's ``features`` now lists is not restored (the loop builds it again, as a first start does)."""
    import json

    from serving.rollover import STATE_FILE

    server = _IndexServerStandIn(tmp_path)
    server.args = ServeArgs(model="unused", index_dir=str(tmp_path), features=["penultimate", "last_but_two"])
    server.pairs, server.serving = {}, None
    _index_folder(tmp_path, ["penultimate"])
    (tmp_path / STATE_FILE).write_text(json.dumps({"name": "m", "version": "1", "ref": "models:/m/1"}))
    builds, loads = _no_registry_no_model(monkeypatch)
    caplog.set_level("WARNING", logger="serving.rollover")
    Rollover(server).restore()  # type: ignore[arg-type]  # the stand-in
    assert server.serving is None and loads == [] and builds == []
    assert [r.getMessage() for r in caplog.records] == [
        "rollover: the saved pair {'name': 'm', 'version': '1', 'ref': 'models:/m/1'} could not be restored "
        f"(no index of m version 1 in {tmp_path} holding last_but_two (the service's features))"]

    server.args = ServeArgs(model="unused", index_dir=str(tmp_path), features=["penultimate"])
    Rollover(server).restore()  # type: ignore[arg-type]  # an index that holds them all is restored
    assert loads == ["/m/checkpoint.pt"] and builds == []


class _OneItemIndex:
    """What the index replica reads of a loaded index to answer ``query_info``, ``info`` and ``get``."""

    def __init__(self, name: str, concepts: list[str]) -> None:
        self.manifest = SimpleNamespace(collection="c", model=SimpleNamespace(name=name, version="1"),
                                        default_feature="penultimate", concepts=concepts, multilabel=False,
                                        features={"penultimate": SimpleNamespace(kind="flat",
                                                                                 default_query_metric="cosine")})
        self.seq, self.path, self.probs = 0, Path(name), [1.0] * len(concepts)

    def __len__(self) -> int:
        return 1

    def query_features(self) -> dict[str, tuple[str, ...]]:
        return {"penultimate": ("cosine",), "probs": ("cosine",)}

    def item(self, item_id: str) -> tuple[int, list[float], list[str]]:
        return 0, self.probs, []

    def memory_bytes(self) -> int:
        return 0


@pytest.mark.timeout(30)
def test_the_index_replica_answers_for_the_model_named_not_for_its_version_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index replica's calls took a version only: the ingress, asking for deepindex version 1's query
    info or item after the switch to photos version 1, got photos' (found on review).  A model replica's
    report, and every call that names a model, now goes by name and version."""
    import threading

    from serving.index import IndexServer, Pair

    digits, colours = [str(d) for d in range(10)], ["red", "green", "blue"]
    deepindex, photos = ("deepindex", "1"), ("photos", "1")  # (name, version): serving.rollover.ModelKey's tuple
    srv = object.__new__(IndexServer.func_or_class)  # no replica: the fields these calls read
    srv.args = ServeArgs(model="unused", index_dir=str(tmp_path))
    srv.pairs, srv.serving, srv.model_reports, srv._write = {}, None, {}, threading.RLock()
    srv.store = SimpleNamespace(head=lambda: 0, count=lambda: 1, get=lambda item_id: SimpleNamespace(
        tags=[], meta={}, source="upload", added_at=0.0, seq=1, content_hash="h", size=3))
    srv.rollover = Rollover(srv)
    monkeypatch.setattr("deepindex.index.catchup.catch_up", lambda *a, **kw: 0)
    for name, concepts in (("deepindex", digits), ("photos", colours)):  # served in turn, as a rollover does
        srv.rollover._activate(Pair(name, "1", f"models:/{name}/1", _OneItemIndex(name, concepts), None),  # type: ignore[arg-type]
                               reason="a test")
    assert set(srv.pairs) == {deepindex, photos} and srv.serving == photos

    # A model replica still on deepindex version 1 says so, and is told to serve photos version 1.
    assert srv.report_model("a", "1", "deepindex") == {"name": "photos", "version": "1", "ref": "models:/photos/1"}
    srv.report_model("b", "1", "photos")
    srv.report_model("c", "1")  # a caller that names no model: the loaded pair of that version, the served first
    assert srv.model_versions() == {"a": deepindex, "b": photos, "c": photos}

    assert srv.query_info("1", "deepindex")["concepts"] == digits
    assert srv.query_info("1", "photos")["concepts"] == colours
    assert srv.query_info("1")["concepts"] == colours and srv.query_info()["concepts"] == colours
    assert srv.get("x", "deepindex", "1")["concepts"] == digits
    assert srv.get("x", "photos", "1")["concepts"] == colours
    assert srv.info("1", "deepindex")["model"] == {"name": "deepindex", "version": "1"}
    info = srv.info()
    assert info["model"] == {"name": "photos", "version": "1"} and (info["serving"], info["serving_name"]) == (
        "1", "photos")
    gone = srv.query_info("1", "other")
    assert gone["status"] == 503 and gone["error"]["message"] == (
        "no index of digit-scenes for model other version 1 is loaded")
