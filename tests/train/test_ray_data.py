"""data.pipeline=ray on a real local cluster: a manifest decoded once into the cache, sharded across two
Train workers, read again from the cache by the next run, with the local path's pixels, stats and labels."""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deepindex.config import ConfigError, load_config
from deepindex.data import build_splits
from deepindex.data import ingest as ingest_module
from deepindex.data.cache import COMPLETE, cache_key, cache_root, prepare_cache, read_images
from deepindex.data.ingest import labelled_splits, pipeline_for, prepare_ingest
from deepindex.data.inspect import resolve_config
from deepindex.data.label_view import AUDIT_FILE, SUSPECTS_FILE, fingerprint
from deepindex.data.photos import make_photo_collection
from deepindex.data.transforms import decode_file
from deepindex.train.trainer import build_trainer
from support import TWO_WORKERS, ConsoleEvents, ensure_ray

# 60 example photos (42 train, 9 val, 9 test by their split column) read at 32 px; a 2-block ConvNet.
SMALL = ["data.dataset=manifest", "data.image_size=32", "data.augment=flip,crop", "model.channels=[8,16]",
         "model.embed_dim=32", "train.batch_size=8", "train.epochs=1", *TWO_WORKERS]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-worker training run through Ray Data (it decodes the collection into the cache)."""
    ensure_ray()
    root = make_photo_collection(tmp_path_factory.mktemp("photos"), n=60, size=128, seed=0).root
    storage = tmp_path_factory.mktemp("storage")
    cfg = load_config(None, [*SMALL, f"data.root={root}", f"ray.storage_path={storage}"])
    with ConsoleEvents() as events:
        result = build_trainer(cfg, name="first").fit()
    return {"cfg": cfg, "storage": storage, "result": result, "events": events.lines}


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_batch_larger_than_each_workers_share_is_refused_before_training(first_run):
    """42 train items on 2 workers, 21 each: a global batch of 64 (32 a worker) would run no step with the
    last partial batch dropped, every epoch, and report a loss of 0 at 0 images/s (seen by hand)."""
    cfg = first_run["cfg"].override(["train.batch_size=64"])
    with pytest.raises(ConfigError) as e:
        build_trainer(cfg, name="too-big-a-batch")
    assert str(e.value) == ("train.batch_size: 64 is more than the train split fills (32 a worker; each worker "
                            "holds 21 of the 42 items): no training step would run; set train.batch_size <= 42")
    build_trainer(first_run["cfg"].override(["train.batch_size=42"]), name="just-fits")  # 21 a worker: fits


def test_a_generated_split_too_small_for_a_batch_or_for_the_workers_is_refused(tmp_path):
    from deepindex.train.trainer import check_batches

    cfg = load_config(None, ["data.train_size=100", "train.batch_size=128", "ray.num_workers=1",
                             f"ray.storage_path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^train.batch_size: 128 is more than the train split fills: no training "
                                          r"step would run; set train.batch_size <= 100$"):
        build_trainer(cfg, name="too-big-a-batch")  # digit-scenes: exactly data.train_size items
    with pytest.raises(ConfigError, match=r"^ray.num_workers: 4 workers share a train split of 3 items"):
        check_batches(cfg.override(["ray.num_workers=4"]), 3)
    check_batches(cfg.override(["train.batch_size=100"]), 100)  # one full batch: fits


def test_a_batch_that_leaves_much_of_the_split_out_of_each_epoch_is_warned_about(caplog):
    """255 train items (a small image folder's) at the default batch of 128 on 2 workers: each worker's
    127 items fill one batch of 64, so each epoch trains 128.  The warning names the batch that takes most."""
    from deepindex.train.trainer import check_batches

    cfg = load_config(None, ["ray.num_workers=2", "train.batch_size=128"])
    caplog.set_level("WARNING", logger="deepindex.train.trainer")
    check_batches(cfg, 255)
    assert [r.getMessage() for r in caplog.records] == [
        "train.batch_size: 128 trains 128 of the 255 train items each epoch (each worker leaves out its last partial "
        "batch, a different one every epoch); train.batch_size=126 would train 252"]
    caplog.clear()
    check_batches(cfg, 20000)  # 32 of 20,000 left out: nothing to say
    check_batches(cfg.override(["ray.num_workers=1", "train.batch_size=16"]), 420)  # 4 of 420
    check_batches(cfg.override(["ray.num_workers=1", "train.batch_size=100"]), 100)
    assert not caplog.records


def _caches(storage: Path) -> list[Path]:
    return sorted(p for p in (storage / "data_cache").iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_train_on_disjoint_shards_of_the_decoded_cache(first_run):
    result, storage = first_run["result"], first_run["storage"]
    assert result.error is None and result.metrics["epoch"] == 0
    events = first_run["events"]
    # The console says what was inferred (channels, preset) and what the import found, then the decode.
    assert [e.split(" (")[0] for e in events[:1]] == ["data: inferred data.channels=3"], events
    assert any(e.startswith("data: decoded 60 images in ") for e in events), events
    assert any(e.startswith("data: ") and "tags.csv: 60 items" in e for e in events), events
    [cache] = _caches(storage)
    meta = json.loads((cache / COMPLETE).read_text())
    assert meta["counts"] == {"train": 42, "val": 9, "test": 9} and meta["channels"] == 3
    workers = storage / "first" / "workers"
    status = {r: json.loads((workers / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert all(s["pipeline"] == "ray" and s["done"] for s in status.values())
    shards = [set(np.load(workers / f"rank{r}.shard.npy").tolist()) for r in (0, 1)]
    # 21 train items per worker (equal split), 5 batches of 4 each (drop_last): 20 trained on.
    assert [len(s) for s in shards] == [20, 20] and [status[r]["train_rows"] for r in (0, 1)] == [20, 20]
    assert not shards[0] & shards[1]  # no image read by both workers
    assert shards[0] | shards[1] <= set(range(42))


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_next_run_reads_the_cache_and_another_size_decodes_again(first_run, caplog):
    cfg, storage = first_run["cfg"], first_run["storage"]
    [cache] = _caches(storage)
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    caplog.set_level(logging.INFO, logger="deepindex.events")
    build_trainer(cfg, name="second")  # a second trial, or the same run resumed: same data keys
    assert f"data: cache hit {cache} (60 items)" in caplog.messages
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before  # nothing decoded or rewritten
    # What does not change the pixels or the items shares the cache; the image size does not.
    d = resolve_config(cfg).data
    assert cache_key(d.model_copy(update={"augment": (), "label_noise": 0.2, "pipeline": "ray"})) == cache.name
    bigger = d.model_copy(update={"image_size": 40})
    found = prepare_cache(bigger, storage)
    assert not found.hit and found.path != cache and found.path.name == cache_key(bigger)
    assert read_images(found.split_dir("val"))[1].shape == (9, 3, 40, 40)
    assert len(_caches(storage)) == 2


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_cache_holds_the_local_paths_pixels_stats_and_labels(first_run):
    """Quality unchanged: the model gets the same inputs either way (the floor is in test_photo_floor.py)."""
    d = resolve_config(first_run["cfg"]).data
    cache = prepare_cache(d, first_run["storage"])
    local = build_splits(d, train_augment=False)
    index, images = read_images(cache.split_dir("test"))
    assert index.tolist() == list(range(9))
    for i, path in enumerate(local.test.paths):  # type: ignore[attr-defined]
        assert np.array_equal(images[i], decode_file(path, 32, 3, "fit"))
    assert np.allclose(cache.stats.mean, local.stats.mean, atol=1e-9)
    assert np.allclose(cache.stats.std, local.stats.std, atol=1e-9)
    labels = cache.labels()
    for split in ("train", "val", "test"):
        assert np.array_equal(labels[split], getattr(local, split).targets.numpy())
        assert cache.paths()[split] == getattr(local, split).paths


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scoring_the_checkpoint_reads_the_cache_not_the_images(first_run, monkeypatch):
    """The test split of the run's own data comes from the decode cache (build_splits never runs), with
    the checkpoint's stats: the same logits as the local path, which decodes the images again."""
    from deepindex.train import evaluation

    path = first_run["result"].checkpoint.path
    local_data = resolve_config(first_run["cfg"]).data.model_copy(update={"pipeline": "local"})
    local = evaluation.score_checkpoint(path, data=local_data)
    with monkeypatch.context() as m:
        m.setattr("deepindex.data.build_splits", lambda *a, **k: pytest.fail("decoded the images again"))
        cached = evaluation.score_checkpoint(path)
    assert torch.equal(cached.targets, local.targets) and len(cached.targets) == 9
    assert torch.allclose(cached.logits, local.logits, atol=1e-4)
    assert cached.metrics["test_map"] == pytest.approx(local.metrics["test_map"], abs=1e-6)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_sweep_on_the_recipe_reads_the_cache_the_run_decoded(first_run, tmp_path):
    """`deepindex tune --space smoke --config RECIPE` on the storage path a training run decoded the collection
    into: the shipped space, the recipe's data and model (not the space's base), and the trial reads that cache
    (each trial's run is one folder down, <storage>/<sweep>/train: it decoded there again before)."""
    import yaml

    from deepindex.checkpoint import load_model
    from deepindex.tune.driver import run_sweep, trial_checkpoints
    from deepindex.tune.space import load_space

    storage = first_run["storage"]
    caches = _caches(storage)
    cache = caches[0]
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    recipe = tmp_path / "train.yaml"  # the run's config as a user's recipe file, on one half-CPU worker
    recipe.write_text(yaml.safe_dump(first_run["cfg"].override(
        {"ray.num_workers": 1, "ray.cpus_per_worker": 0.5, "tracking.enabled": False}).to_dict()))
    spec = load_space("smoke", settings={"num_samples": 1}, config=recipe)
    assert spec.base.data.dataset == "manifest" and spec.base.train.epochs == 1  # not smoke's digit-scenes, 5 epochs
    out = run_sweep(spec, name="sweep", promote=False)
    assert out.best is not None and out.best.epochs_done == 1, out.trials
    assert not (storage / "sweep" / "train" / "data_cache").exists()
    assert _caches(storage) == caches and {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before
    best, _ = trial_checkpoints(storage / "sweep" / "train", out.best.trial_id, out.metric, out.mode)
    assert best is not None and load_model(best).config.data.cache_dir == str(storage / "data_cache")


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluate_prints_the_checkpoints_metrics_with_each_concepts_ap_by_name(first_run, capsys):
    """`deepindex evaluate CHECKPOINT [--split val]`: JSON on stdout, the per-concept AP keyed by concept
    (it was a bare list in the checkpoint's concept order), mAP their mean."""
    from deepindex.cli import main
    from deepindex.train import evaluation

    path = first_run["result"].checkpoint.path
    for split in ("test", "val"):
        assert main(["evaluate", path, "--split", split]) == 0
        out = json.loads(capsys.readouterr().out)
        scored = evaluation.score_checkpoint(path, split)
        assert set(out) == {f"{split}_loss", f"{split}_map", f"{split}_ap"}
        assert out[f"{split}_ap"] == dict(zip(scored.concepts, scored.metrics[f"{split}_ap"], strict=True))
        assert list(out[f"{split}_ap"]) == ["red", "green", "blue", "circle", "square", "triangle", "red_circle",
                                            "blue_square"]
        aps = [a for a in out[f"{split}_ap"].values() if a is not None]
        assert out[f"{split}_map"] == pytest.approx(sum(aps) / len(aps), abs=1e-6)


def test_evaluate_reads_a_collection_that_moved_where_it_is_now(first_run, tmp_path, capsys):
    """`deepindex evaluate CHECKPOINT data.root=NEW`: the checkpoint names the folder it trained on; a copy
    elsewhere scores the same (decoded from its files, not the run's cache); only data.* keys change."""
    import shutil

    from deepindex.cli import main

    path = first_run["result"].checkpoint.path
    assert main(["evaluate", path]) == 0
    before = json.loads(capsys.readouterr().out)
    moved = tmp_path / "moved"
    shutil.copytree(first_run["cfg"].data.root, moved)
    assert main(["evaluate", path, f"data.root={moved}"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["test_map"] == pytest.approx(before["test_map"], abs=1e-4), (before, after)
    for args, message in [([f"data.root={tmp_path / 'nowhere'}"], f"data.root: no such folder {tmp_path / 'nowhere'}"),
                          (["model.dropout=0.5"], "model.dropout: evaluate changes only data.* keys")]:
        assert main(["evaluate", path, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"deepindex evaluate: error: {message}"), err


def _write_report(folder: Path, d, rows: list[tuple[int, str]], splits) -> Path:
    """An audit report flagging ``rows`` (train index, concept) of ``splits``, each with the label it has."""
    ids = [os.path.relpath(p, d.root) for p in splits.train.paths]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / SUSPECTS_FILE).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "index", "item", "concept", "issue", "given", "pred_prob", "quality"])
        for r, (i, c) in enumerate(rows, 1):
            w.writerow([r, i, ids[i], c, "x", int(splits.view.given[i, splits.concepts.index(c)]), 0.5, 0.1])
    (folder / AUDIT_FILE).write_text(json.dumps({"data": fingerprint(d)}))
    return folder


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("view", ["noise+fold", "noise+filter-flip", "noise+filter-drop"])
def test_label_views_give_the_ray_path_the_local_paths_labels(first_run, tmp_path, monkeypatch, view):
    """label_noise, label_filter (flip, drop) and CV folds, applied to the cached labels: the train items
    and labels (and the noisy val labels) are the ones build_splits' local path gives.  For the drop
    filter and the fold, the rows the Ray dataset hands the workers are checked too (items left out,
    labels attached), held in the object store and streamed from the cache respectively."""
    cfg = resolve_config(first_run["cfg"]).override({"data.label_noise": 0.3})
    if view == "noise+fold":
        cfg = cfg.override({"data.cv_folds": 3, "data.cv_fold": 1})
    else:
        report = _write_report(tmp_path / "audit", cfg.data, [(3, "red"), (3, "circle"), (10, "blue")],
                               build_splits(cfg.data))
        cfg = cfg.override({"data.label_filter": str(report), "data.label_filter_mode": view.split("-")[-1]})
    local = build_splits(cfg.data)
    cache = prepare_cache(cfg.data, first_run["storage"])
    assert cache.hit
    paths = cache.paths()["train"]
    keep, labels = labelled_splits(cfg, cache)
    assert {str(labels["train"][i].tolist()) + str(paths[i]) for i in keep} == _labelled(local.train)
    assert len(keep) == len(local.train) and (len(keep) < 42) == (view != "noise+filter-flip")
    assert torch.equal(labels["val"], local.val.targets)  # type: ignore[attr-defined]
    assert not torch.equal(labels["val"], torch.from_numpy(cache.labels()["val"]))  # the noise reached val
    if view != "noise+filter-flip":  # the rows themselves: held in the object store, or streamed from the cache
        if view == "noise+fold":
            monkeypatch.setattr(ingest_module, "HOLD_FRACTION", 0.0)
        ingest = prepare_ingest(cfg, str(first_run["storage"]))
        assert ingest.plan["held_in_object_store"] == (view == "noise+filter-drop")
        rows = ingest.datasets["train"].take_all()
        assert {str(r["label"].tolist()) + str(paths[r["index"]]) for r in rows} == _labelled(local.train)
        assert len(rows) == len(local.train) == ingest.plan["train_rows"]


def _labelled(ds) -> set[str]:
    """{labels + image path} of each item of a local train split (through a label view's Subset)."""
    from torch.utils.data import Subset

    base, rows = (ds.dataset, ds.indices) if isinstance(ds, Subset) else (ds, range(len(ds)))
    return {str(base.targets[j].tolist()) + str(base.paths[j]) for j in rows}


def test_pipeline_switch():
    photos = ["data.dataset=manifest", "data.root=/nowhere"]
    assert pipeline_for(load_config(None, photos), "/tmp/x") == "ray"  # auto: ray for a file collection
    assert pipeline_for(load_config(None, [*photos, "data.pipeline=local"]), "/tmp/x") == "local"
    assert pipeline_for(load_config(None, photos), "s3://bucket/runs") == "local"  # the cache needs a filesystem
    assert pipeline_for(load_config(None, []), "/tmp/x") == "local"  # digit-scenes: tensors in memory
    # data.cache_dir moves the cache (a sweep's trials get their storage path's): a relative one is the driver's.
    moved = load_config(None, [*photos, "data.cache_dir=decoded"]).data
    assert cache_root(moved, "/tmp/x") == str(Path("decoded").resolve())
    assert cache_root(load_config(None, photos).data, "/tmp/x") == "/tmp/x/data_cache"
    assert pipeline_for(load_config(None, [*photos, "data.cache_dir=s3://bucket/cache"]), "/tmp/x") == "local"
    with pytest.raises(ConfigError, match=r"^data\.pipeline: ray reads image files"):
        load_config(None, ["data.pipeline=ray"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("view", ["plain", "fold", "filter-drop", "duplicates"])
def test_the_local_path_counts_the_train_split_its_workers_build(tmp_path, view):
    """data.pipeline=local: the driver counts the train split from the listing (no image decoded) as
    build_splits in each worker makes it (fold, filter, a duplicate merged), and a batch it cannot fill
    is refused before a worker starts, as on the Ray Data path."""
    from deepindex.data import split_len
    from deepindex.data.ingest import listed_train_rows

    root = make_photo_collection(tmp_path / "photos", n=60, size=128, seed=0).root
    storage = tmp_path / "storage"
    cfg = resolve_config(load_config(None, [*SMALL, f"data.root={root}", f"ray.storage_path={storage}",
                                            "data.pipeline=local"]))
    if view == "fold":
        cfg = cfg.override({"data.cv_folds": 3, "data.cv_fold": 1})
    elif view == "filter-drop":
        report = _write_report(tmp_path / "audit", cfg.data, [(3, "red"), (10, "blue")], build_splits(cfg.data))
        cfg = cfg.override({"data.label_filter": str(report), "data.label_filter_mode": "drop"})
    elif view == "duplicates":  # a train row naming another train row's bytes: one item in the worker
        manifest = next(p for p in Path(root).iterdir() if p.suffix == ".csv")
        rows = list(csv.reader(manifest.open()))
        first = next(r for r in rows[1:] if r[-1] == "train")
        copy = Path(root) / f"copy-{Path(first[0]).name}"
        copy.write_bytes((Path(root) / first[0]).read_bytes())
        with manifest.open("a", newline="") as f:
            csv.writer(f).writerow([copy.name, *first[1:]])
    built = split_len(build_splits(cfg.data).train)
    assert listed_train_rows(cfg.data) == built
    assert built == {"plain": 42, "fold": 28, "filter-drop": 40, "duplicates": 42}[view]
    with pytest.raises(ConfigError, match=rf"^train.batch_size: {built + 2} is more than the train split fills"):
        build_trainer(cfg.override({"train.batch_size": built + 2}), name="too-big-a-batch")


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_the_cache_takes_its_stats_from_the_local_paths_sample_of_a_split_column(tmp_path, monkeypatch):
    """More train items than the stats sample, in a split column's order: both pipelines take the stats from
    the same items drawn by id (data.splits.stats_sample), not from the column's first rows."""
    from deepindex.data import cache as cache_module
    from deepindex.data import splits as splits_module

    ensure_ray()
    monkeypatch.setattr(splits_module, "_STATS_SAMPLE", 10)
    monkeypatch.setattr(cache_module, "STATS_SAMPLE", 10)
    root = make_photo_collection(tmp_path / "photos", n=40, size=128, seed=3).root
    d = resolve_config(load_config(None, [*SMALL, f"data.root={root}", "data.seed=5"])).data
    cache = prepare_cache(d, tmp_path / "storage")
    local = build_splits(d, train_augment=False)
    assert len(local.train) > 10
    assert np.allclose(cache.stats.mean, local.stats.mean, atol=1e-6)
    assert np.allclose(cache.stats.std, local.stats.std, atol=1e-6)
    firsts = torch.stack([torch.from_numpy(decode_file(p, 32, 3, "fit")) for p in local.train.paths[:10]])
    assert not np.allclose(local.stats.mean, (firsts.float() / 255).mean((0, 2, 3)).numpy(), atol=1e-6)
