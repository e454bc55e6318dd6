"""Building an index from a collection on a real local Ray cluster (Ray Data actors), catching it up
with the collection's later changes, and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from support import cpus_held

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def gallery():
    """A collection of 700 digit-scenes (test glyphs), as `deepindex collection import` makes it."""
    from deepindex.collection import CollectionStore
    from deepindex.collection.imports import import_digit_scenes

    store = CollectionStore.open("digit-scenes")
    import_digit_scenes(store, size=700, seed=0)
    return store


@pytest.mark.timeout(300)
def test_ray_data_build_matches_local_and_sizes_itself_to_free_cpus(small_model, ray_local, gallery, tmp_path):
    from deepindex.index.build import build_index, size_pool
    from deepindex.index.store import IndexStore
    from deepindex.tracking.registry import resolve_model

    # A service holding most of the CPUs (here: an actor taking all but 0.5 of those free, 3.5 of the
    # session cluster's 4 when nothing else runs): the build still runs.
    with cpus_held(0.5):
        pool = size_pool(None)
        assert pool.actors * pool.cpus <= 0.5 + 1e-6
        seen: list[tuple[int, int]] = []
        r = build_index(str(small_model), out=tmp_path / "ray", batch_size=64,
                        features=["penultimate", "last_but_two"], progress=lambda d, n: seen.append((d, n)))
    local = build_index(str(small_model), out=tmp_path / "local", use_ray=False,
                        features=["last_but_one", "last_but_two"])  # penultimate by the mission's name
    assert seen[0] == (0, 700) and seen[-1] == (700, 700) and r.seq == gallery.head() == 700
    a, b = IndexStore.load(r.path), IndexStore.load(local.path)
    assert a.ids == b.ids == [f"scene-{i:06d}" for i in range(700)]  # row order survives the actor pool
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    for f in ("penultimate", "last_but_two"):
        np.testing.assert_allclose(a.features[f], b.features[f], atol=1e-4)
    m = a.manifest
    assert m.model.version == resolve_model(str(small_model)).version and m.seq == 700
    assert m.features["penultimate"].kind == "flat" and m.features["penultimate"].dim == 64 and m.count == 700
    assert a.labels[0] and set(a.labels[0]) <= set(m.concepts)
    assert not (tmp_path / "ray" / "thumbs.npy").exists()  # no images in an index: the collection has them


@pytest.mark.timeout(300)
def test_catch_up_applies_later_adds_and_deletes(small_model, gallery, tmp_path):
    from deepindex.checkpoint import load_model
    from deepindex.collection.imports import png_bytes
    from deepindex.index.build import build_index
    from deepindex.index.catchup import catch_up
    from deepindex.index.collection import digit_gallery
    from deepindex.index.embed import PixelEmbedder, image_bytes_to_unit
    from deepindex.index.store import IndexStore

    built = build_index(str(small_model), out=tmp_path / "i", use_ray=False)
    index = IndexStore.load(built.path)
    extra = digit_gallery(3, seed=11)
    for j, unit in enumerate(extra.images):
        gallery.add(f"new-{j}", png_bytes(unit), tags=extra.labels[j])
    gallery.delete("scene-000001")
    gallery.add("broken", b"\x89PNG\r\n\x1a\n not really")  # bytes that do not decode: skipped, not fatal
    embed = PixelEmbedder(load_model(small_model), ["penultimate"])

    assert catch_up(index, gallery, embed) == 5
    assert index.seq == gallery.head() and len(index) == 700 + 3 - 1
    assert "scene-000001" not in index.rows and "broken" not in index.rows
    # An added item is found by its own image, first.
    q = embed(image_bytes_to_unit(gallery.image("new-2"), 32, 1)[None])["penultimate"]
    assert index.ids[index.similar(q, 1)[0][0][0]] == "new-2"
    back = IndexStore.load(built.path)  # the delta holds the catch-up: nothing to redo after a restart
    assert back.seq == index.seq and len(back) == len(index) and catch_up(back, gallery, embed) == 0


@pytest.mark.timeout(300)
def test_cli_build_and_info(small_model, gallery, capsys):
    from deepindex.cli import main

    assert main(["index", "build", "--model", str(small_model), "--local", "--kind", "hnsw", "--metric", "l2"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["items"] == 700 and out["kind"] == "hnsw" and out["metric"] == "l2" and out["seq"] == 700
    # Progress for people, on stderr: the total before the workers start, then the share embedded.
    assert captured.err.splitlines()[0] == "embedding: 700 items; starting the embedding workers"
    assert "embedding: 700/700 items (100%)" in captured.err
    # The default location: one folder per (collection, model version).
    assert out["path"].endswith(f"indexes/digit-scenes/local-{out['version']}")
    assert main(["index", "info", out["path"]]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["version"] == out["version"]
    assert main(["index", "info", str(Path(out["path"]).parent)]) == 2  # a folder that is not an index
    assert capsys.readouterr().err.strip() == (f"deepindex index: error: index: no index at "
                                               f"{Path(out['path']).parent} (no manifest.json in it)")
    assert main(["index", "build", "--model", str(small_model), "--local", "--collection", "nope"]) == 2
    assert "no collection named 'nope'" in capsys.readouterr().err  # a clean one-line error
    assert main(["index", "build", "--model", str(small_model), "--local", "--features", "stage9"]) == 2
    assert "features: 'stage9'" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--batch-size", "0", "must be >= 1, not 0"),
                                                  ("--workers", "-2", "must be >= 1, not -2"),
                                                  ("--exact-max", "0", "must be >= 1, not 0"),
                                                  ("--batch-size", "x", "'x' is not a whole number")])
def test_index_build_names_a_bad_number_before_anything_starts(flag: str, value: str, message: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Found on review: --batch-size 0 was a ZeroDivisionError after Ray started and the model downloaded
    (with --local: "range() arg 3 must not be zero"), --exact-max 0 a 4-line pydantic error."""
    from deepindex.cli import main

    with pytest.raises(SystemExit) as e:
        main(["index", "build", flag, value])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"deepindex index build: error: argument {flag}: {message}"


@pytest.mark.timeout(120)
def test_build_out_refuses_a_folder_that_is_not_an_index(small_model, tmp_path, capsys):
    """`index build --out DIR` replaced DIR whole: given the collection's folder of indexes (or any folder of
    the user's), it removed every version's index and the service's state, or the user's files (found on
    review).  A folder that holds files and no index is refused before anything is embedded; an index is
    replaced; a new or empty folder takes it."""
    from deepindex.cli import main

    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "holiday.jpg").write_bytes(b"the user's photo")
    assert main(["index", "build", "--model", str(small_model), "--local", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"deepindex index: error: --out: {mine} holds files and is not an index "
                                            "(no manifest.json); writing the index there would replace them: give a "
                                            "new or empty folder"), err
    assert sorted(p.name for p in mine.iterdir()) == ["holiday.jpg", "sub"]  # untouched
    from deepindex.index.store import MANIFEST, check_index_target

    (tmp_path / "empty").mkdir()
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / MANIFEST).write_text("{}")
    for fine in ("new", "empty", "index"):  # (building into them: test_cli_build_and_info, the lifecycle tests)
        check_index_target(tmp_path / fine)


@pytest.mark.timeout(120)
def test_probs_listed_among_the_features_is_the_index_probs_not_an_error(small_model, tmp_path):
    """The README's `index build --features penultimate,probs` and a service's `features: [output]` were
    refused ("'probs' is not a descriptor"), and a service listing it retried its build forever (found on
    review).  probs is in every index: listed, it is not stored twice; listed alone, it is one line."""
    from deepindex.collection import CollectionStore
    from deepindex.collection.imports import png_bytes
    from deepindex.index.build import build_index
    from deepindex.index.store import IndexStore

    store = CollectionStore.open("few", blobs_url=str(tmp_path / "blobs"))
    for i in range(4):
        store.add(f"x{i}", png_bytes(np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)))
    r = build_index(str(small_model), collection="few", out=tmp_path / "ix", features=["output", "penultimate"],
                    use_ray=False)
    assert r.features == ["penultimate"] and r.count == 4
    index = IndexStore.load(r.path)
    assert set(index.manifest.features) == {"penultimate"} and index.probs.shape[0] == 4
    with pytest.raises(ValueError, match=r"^features: probs \(output\) is in every index; list the descriptors"):
        build_index(str(small_model), collection="few", out=tmp_path / "ix2", features=["probs"], use_ray=False)
