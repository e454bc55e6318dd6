"""An index folder swapped under its writer (``deepindex index build`` of the served version, into the
folder a running service writes): the service goes on appending its changes to the new base's delta,
after a gap.  A reload applies the delta up to the gap and catches up from the catalogue: nothing is
lost and nothing deleted comes back.

The embedder is a stand-in (fixed descriptors): the test is about which changes the index holds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepindex.collection import CollectionStore
from deepindex.index.catchup import catch_up
from deepindex.index.store import DELTA, DeltaUnreadable, IndexStore
from deepindex.index.vectors import VectorConfig
from support import png_bytes

pytestmark = pytest.mark.timeout(60)


def _embed(pixels: np.ndarray) -> dict[str, np.ndarray]:
    n = len(pixels)
    return {"probs": np.full((n, 1), 0.5, np.float32), "penultimate": np.ones((n, 4), np.float32)}


def _base(store: CollectionStore, seq: int, source: dict | None = None) -> IndexStore:
    """What a build writes: the collection's snapshot at ``seq``, embedded (``source``: its manifest's)."""
    items = list(store.snapshot(seq))
    n = len(items)
    return IndexStore.create(model={"uri": "m", "name": "m", "version": "1"}, collection=store.name, seq=seq,
                             concepts=["a"], ids=[i.id for i in items], labels=[i.tags for i in items],
                             probs=np.full((n, 1), 0.5, np.float32),
                             features={"penultimate": np.ones((n, 4), np.float32)},
                             vector_cfg=VectorConfig(kind="flat"), default_feature="penultimate", image_size=8,
                             channels=1, multilabel=True, source=source)


def test_a_base_swapped_under_the_writer_loses_no_change_on_reload(tmp_path: Path) -> None:
    store = CollectionStore.open("c")
    for i in range(3):
        store.add(f"old-{i}", png_bytes(np.full((8, 8), i / 10)))
    folder = tmp_path / "m-1"
    _base(store, store.head()).save(folder)
    service = IndexStore.load(folder)  # the serving index replica: the folder's writer

    built_at = store.head()  # a build starts from this snapshot; it embeds for minutes...
    store.add("during-build", png_bytes(np.full((8, 8), 0.5)))
    store.delete("old-0")
    catch_up(service, store, _embed)  # ...while the service applies what comes in
    _base(store, built_at).save(folder)  # the build's base swapped in: it holds old-0, not during-build
    store.add("after-build", png_bytes(np.full((8, 8), 0.6)))
    catch_up(service, store, _embed)  # appended to the new base's delta, after a gap

    live = sorted(i.id for i in store.snapshot())
    assert live == ["after-build", "during-build", "old-1", "old-2"] and sorted(service.rows) == live
    # A reader's copy (the ingress's local reads) stops at the gap too, and its follow() refuses what lies
    # past it (it applied the other writer's batch: old-0 back, during-build missing, its seq at the head).
    reader = IndexStore.load(folder, recover=False)
    assert reader.seq == built_at and sorted(reader.rows) == ["old-0", "old-1", "old-2"]
    with pytest.raises(DeltaUnreadable, match="skips seqs"):
        reader.follow()
    assert reader.seq == built_at
    reloaded = IndexStore.load(folder)  # a restart: the delta up to the gap (none of it), then the catalogue
    assert reloaded.seq == built_at and sorted(reloaded.rows) == ["old-0", "old-1", "old-2"]
    assert (folder / DELTA).stat().st_size == 0  # the writer's load cut what followed the gap
    assert catch_up(reloaded, store, _embed) == store.head() - built_at
    assert sorted(reloaded.rows) == live and reloaded.seq == store.head()
    again = IndexStore.load(folder)  # and the next load needs no catalogue
    assert sorted(again.rows) == live and again.seq == store.head()


def test_an_index_of_another_catalogue_is_refused_not_served(tmp_path: Path) -> None:
    """A collection folder holds an index built from another catalogue of the collection's name (a move to
    PostgreSQL, one restored from a backup): past this catalogue's last change, catching up did nothing and
    the service answered with the other catalogue's items.  And an index folder shared by collections
    finds each one's own index of a model version."""
    from deepindex.index.store import find_index

    other = CollectionStore.open("c", catalogue_url=f"sqlite:///{tmp_path / 'other.db'}",
                                 blobs_url=str(tmp_path / "other-blobs"))
    for i in range(5):
        other.add(f"a-{i}", png_bytes(np.full((8, 8), i / 10)))
    _base(other, other.head()).save(tmp_path / "shared" / "m-1")
    store = CollectionStore.open("c")
    for i in range(3):
        store.add(f"b-{i}", png_bytes(np.full((8, 8), i / 10)))
    index = IndexStore.load(tmp_path / "shared" / "m-1")
    with pytest.raises(ValueError, match=r"built up to change 5 of c, but c has 3 changes: it was built from "
                                         r"another catalogue; build it again \(deepindex index build\)$"):
        catch_up(index, store, _embed)

    d = CollectionStore.open("d")
    d.add("d-0", png_bytes(np.full((8, 8), 0.3)))
    _base(d, d.head()).save(tmp_path / "shared" / "n-1")  # the same model version, another collection
    assert find_index(tmp_path / "shared", "m", "1", collection="d") == tmp_path / "shared" / "n-1"
    assert find_index(tmp_path / "shared", "m", "1", collection="c") == tmp_path / "shared" / "m-1"
    assert find_index(tmp_path / "shared", "m", "1", collection="e") is None


def test_an_index_of_another_collection_of_the_name_behind_this_ones_head_is_refused(tmp_path: Path) -> None:
    """The same, with this catalogue's head at or past the index's seq (the catalogue deleted and the images
    imported again, more of them): it was caught up as if it were this collection, serving the old items and
    never indexing this one's first changes (found on review).  A build records which collection it read."""
    other = CollectionStore.open("c", catalogue_url=f"sqlite:///{tmp_path / 'other.db'}",
                                 blobs_url=str(tmp_path / "other-blobs"))
    for i in range(3):
        other.add(f"old-{i}", png_bytes(np.full((8, 8), i / 10)))
    made = {"collection": "c", "catalogue_seq": other.head(), "collection_created_at": other.created_at}
    _base(other, other.head(), made).save(tmp_path / "m-1")
    store = CollectionStore.open("c")
    for i in range(5):
        store.add(f"new-{i}", png_bytes(np.full((8, 8), i / 10)))
    assert store.created_at != other.created_at and store.head() >= other.head()
    index = IndexStore.load(tmp_path / "m-1")
    with pytest.raises(ValueError, match=r"built from another collection named c \(created .* UTC; this one .* "
                                         r"UTC\): build it again \(deepindex index build\)$"):
        catch_up(index, store, _embed)
    assert sorted(index.rows) == ["old-0", "old-1", "old-2"]  # nothing of the other collection applied
    own = {"collection": "c", "catalogue_seq": 2, "collection_created_at": store.created_at}
    _base(store, 2, own).save(tmp_path / "m-2")
    mine = IndexStore.load(tmp_path / "m-2")
    assert catch_up(mine, store, _embed) == 3 and mine.seq == store.head()  # this collection's: caught up
