"""Synthetic label noise, CV folds and the label filter: properties, no training."""
from __future__ import annotations

import csv
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn.functional import one_hot

from deepindex.config import ConfigError, DataConfig, load_config
from deepindex.data import Splits, build_splits
from deepindex.data.folds import fold_ids, fold_split
from deepindex.data.label_view import AUDIT_FILE, SUSPECTS_FILE, check_label_filter, fingerprint
from deepindex.data.noise import corrupt

SMALL = ["data.train_size=600", "data.val_size=200", "data.test_size=200"]


@functools.cache
def _splits(*over: str) -> Splits:
    """Splits of a small config, built once per module (tests only read them)."""
    return build_splits(load_config(None, [*SMALL, *over]).data)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 1.0])
def test_rate_is_the_fraction_of_items_with_a_wrong_tag_set(rate: float) -> None:
    clean = _splits().train.tensors[1]
    n = corrupt(clean, rate, seed=0)
    assert n.item_rate == pytest.approx(round(rate * len(clean)) / len(clean))
    assert torch.equal(n.flipped, (n.noisy != n.clean))  # the mask is exactly the corrupted pairs
    assert torch.equal(n.clean, clean)
    per_item = n.flipped.sum(1)
    assert set(per_item.unique().tolist()) <= {0, 1, 2}  # drop/add flip one pair, swap two
    for i, kind in enumerate(n.kinds):
        drop = int((n.clean[i] > n.noisy[i]).sum())
        add = int((n.noisy[i] > n.clean[i]).sum())
        assert (drop, add) == {None: (0, 0), "drop": (1, 0), "add": (0, 1), "swap": (1, 1)}[kind]
    if rate == 0.3:  # the three kinds are drawn uniformly: ~60 each of 180
        counts = {k: n.kinds.count(k) for k in ("drop", "add", "swap")}
        assert all(40 <= c <= 80 for c in counts.values()), counts


@pytest.mark.timeout(60)
def test_noise_is_deterministic_in_its_seed_and_split() -> None:
    clean = _splits().train.tensors[1]
    a, b = corrupt(clean, 0.3, seed=0), corrupt(clean, 0.3, seed=0)
    assert torch.equal(a.noisy, b.noisy)
    assert not torch.equal(a.noisy, corrupt(clean, 0.3, seed=1).noisy)
    assert not torch.equal(a.noisy, corrupt(clean, 0.3, seed=0, split="val").noisy)


@pytest.mark.timeout(60)
def test_build_splits_corrupts_train_and_val_keeps_test_and_the_truth() -> None:
    clean = _splits()
    noisy = _splits("data.label_noise=0.3", "data.label_noise_seed=4")
    v = noisy.view
    for split in ("train", "val"):
        y_clean, y_noisy = getattr(clean, split).tensors[1], getattr(noisy, split).tensors[1]
        assert torch.equal(v.clean[split], y_clean)
        assert torch.equal(v.flipped[split], y_clean != y_noisy)
        assert v.flipped[split].any(1).float().mean().item() == pytest.approx(0.3)
        assert torch.equal(getattr(clean, split).tensors[0], getattr(noisy, split).tensors[0])  # same images
    assert torch.equal(clean.test.tensors[1], noisy.test.tensors[1])  # the test split stays clean
    assert clean.stats == noisy.stats
    again = _splits("data.label_noise=0.3", "data.label_noise_seed=4")
    assert torch.equal(again.train.tensors[1], noisy.train.tensors[1])


@pytest.mark.timeout(60)
def test_exclusive_classes_are_relabelled_to_another_class() -> None:
    """digits (one class per image): the noise files p of the items under another class, uniformly;
    as pairs, the true class missing and a wrong one given; test stays clean."""
    clean = _splits("data.dataset=digits")
    noisy = _splits("data.dataset=digits", "data.label_noise=0.3")
    v = noisy.view
    for split in ("train", "val"):
        y, yn = getattr(clean, split).tensors[1], getattr(noisy, split).tensors[1]
        assert y.ndim == 1 and yn.dtype == torch.int64 and torch.equal(v.clean[split], y)
        wrong = yn != y
        assert wrong.float().mean().item() == pytest.approx(0.3)
        assert torch.equal(v.flipped[split], one_hot(y, 10).bool() ^ one_hot(yn, 10).bool())
        assert v.flipped[split].sum(1).tolist() == (2 * wrong.long()).tolist()
    assert torch.equal(clean.test.tensors[1], noisy.test.tensors[1])
    n = corrupt(clean.train.tensors[1], 1.0, seed=0, num_classes=10)
    assert n.kinds == ["relabel"] * 600 and (n.noisy != n.clean).all()
    offsets = torch.bincount((n.noisy - n.clean) % 10, minlength=10)
    assert offsets[0] == 0 and offsets[1:].min() >= 40, offsets  # every other class drawn (~67 each of 600)
    again = corrupt(clean.train.tensors[1], 0.3, seed=0, num_classes=10)  # a pure function of its inputs
    assert torch.equal(again.noisy, noisy.train.tensors[1])


@pytest.mark.timeout(60)
def test_label_filter_on_exclusive_classes_moves_an_item_to_the_suggested_class(tmp_path: Path) -> None:
    cfg = load_config(None, [*SMALL, "data.dataset=digits", "data.label_noise=0.3"])
    y = _splits("data.dataset=digits", "data.label_noise=0.3").train.tensors[1]
    given = [int(y[i]) for i in (3, 10, 20)]
    other = [(g + 1) % 10 for g in given]
    # item 3: given class wrong, another suggested; item 10: only the given class suspect; 20: both kinds twice
    rows = [(3, str(given[0])), (3, str(other[0])), (10, str(given[1])),
            (20, str(given[2])), (20, str(other[2])), (20, str((other[2] + 1) % 10))]
    report = _write_report(tmp_path / "r", cfg.data, rows)
    flipped = build_splits(cfg.override({"data.label_filter": str(report)}).data)
    assert int(flipped.view.full_train.tensors[1][3]) == other[0]  # the full train split, relabelled
    assert sorted(set(range(600)) - set(flipped.view.train_index.tolist())) == [10, 20]  # no class, or two: left out
    assert len(flipped.train) == 598 and torch.equal(flipped.view.given, y)
    assert flipped.view.filtered is not None and int(flipped.view.filtered.sum()) == 6
    dropped = build_splits(cfg.override({"data.label_filter": str(report), "data.label_filter_mode": "drop"}).data)
    assert sorted(set(range(600)) - set(dropped.view.train_index.tolist())) == [3, 10, 20]
    assert torch.equal(dropped.view.full_train.tensors[1], y)  # dropping relabels nothing


@pytest.mark.timeout(30)
def test_folds_partition_the_items_deterministically() -> None:
    ids = fold_ids(103, 5, seed=0)
    assert np.array_equal(ids, fold_ids(103, 5, seed=0)) and not np.array_equal(ids, fold_ids(103, 5, seed=1))
    assert sorted(np.bincount(ids).tolist()) == [20, 20, 21, 21, 21]
    held = [fold_split(103, 5, k)[1] for k in range(5)]
    assert np.array_equal(np.sort(np.concatenate(held)), np.arange(103))
    trained, h = fold_split(103, 5, 2)
    assert not set(trained) & set(h) and len(trained) + len(h) == 103
    # The setting a plain `deepindex train data.cv_folds=5` run names (it named audit.folds, which that run
    # never set; the audit checks its audit.folds itself before it sets data.cv_folds).
    with pytest.raises(ValueError, match=r"^data\.cv_folds: 5 folds need at least 5 train items, there are 3"):
        fold_ids(3, 5)


@pytest.mark.timeout(60)
def test_cv_fold_trains_on_the_other_folds_with_the_full_splits_stats() -> None:
    full = _splits("data.label_noise=0.3")
    fold = _splits("data.label_noise=0.3", "data.cv_folds=3", "data.cv_fold=1")
    trained, held = fold_split(600, 3, 1, seed=0)
    assert len(fold.train) == len(trained) and np.array_equal(fold.view.holdout_index, held)
    x, y = fold.train[5]
    assert torch.equal(x, full.train.tensors[0][trained[5]]) and torch.equal(y, full.train.tensors[1][trained[5]])
    assert fold.stats == full.stats  # the held-out fold is normalised as the model's inputs were


def _write_report(folder: Path, d: DataConfig, rows: list[tuple[int, str]], **meta_over: Any) -> Path:
    """An audit report flagging ``rows`` (train index, concept), each with the label the data gives it
    (the label filter checks that it has not changed since)."""
    from deepindex.data.noise import multi_hot

    sp = build_splits(d)
    given, index = multi_hot(sp.view.given, len(sp.concepts)), {c: k for k, c in enumerate(sp.concepts)}
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / SUSPECTS_FILE).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "index", "item", "concept", "issue", "given", "pred_prob", "quality"])
        for r, (i, c) in enumerate(rows, 1):
            w.writerow([r, i, f"train/{i}", c, "x", int(given[i, index[c]]) if c in index else 0, 0.5, 0.1])
    (folder / AUDIT_FILE).write_text(json.dumps({"data": {**fingerprint(d), **meta_over}}))
    return folder


@pytest.mark.timeout(60)
def test_label_filter_flips_or_drops_the_suspect_labels(tmp_path: Path) -> None:
    cfg = load_config(None, [*SMALL, "data.label_noise=0.3"])
    base = _splits("data.label_noise=0.3")
    y = base.train.tensors[1]
    report = _write_report(tmp_path / "r", cfg.data, [(3, "7"), (3, "2"), (10, "0")])
    flipped = build_splits(cfg.override({"data.label_filter": str(report)}).data)
    yf = flipped.train.tensors[1]
    changed = (yf != y).nonzero().tolist()
    assert changed == [[3, 2], [3, 7], [10, 0]]
    assert yf[3, 7] == 1 - y[3, 7] and yf[10, 0] == 1 - y[10, 0]
    assert torch.equal(flipped.view.given, y)  # the audited labels stay available
    dropped = build_splits(cfg.override({"data.label_filter": str(report / SUSPECTS_FILE),
                                         "data.label_filter_mode": "drop"}).data)
    assert len(dropped.train) == 598 and 3 not in dropped.view.train_index and 10 not in dropped.view.train_index
    assert len(dropped.val) == len(base.val)  # only the audited train split is filtered


@pytest.mark.timeout(60)
def test_label_filter_refuses_a_report_of_other_data_or_other_items(tmp_path: Path) -> None:
    cfg = load_config(None, [*SMALL, "data.label_noise=0.3"])
    other = _write_report(tmp_path / "other", cfg.data, [(1, "1")], train_size=5000)
    with pytest.raises(ValueError, match=r"^data\.label_filter: .*data\.train_size=5000.*data\.train_size=600"):
        build_splits(cfg.override({"data.label_filter": str(other)}).data)
    bad = _write_report(tmp_path / "bad", cfg.data, [(1, "eleven")])
    with pytest.raises(ValueError, match=r"^data\.label_filter: .*suspects\.csv:2: unknown concept 'eleven'"):
        build_splits(cfg.override({"data.label_filter": str(bad)}).data)
    with pytest.raises(FileNotFoundError, match=r"^data\.label_filter: no audit report at"):
        build_splits(cfg.override({"data.label_filter": str(tmp_path / "nowhere")}).data)
    # How pixels reach the model is not which items and labels the audit saw: a pretrained backbone's run
    # fills in normalize after the audit took its fingerprint (found on review: every such run refused).
    report = _write_report(tmp_path / "r", cfg.data, [(1, "1")])
    check_label_filter(cfg.override({"data.label_filter": str(report), "data.normalize": "imagenet"}).data)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("override, key", [
    (["data.label_noise=1.5"], "data.label_noise"),
    (["data.label_filter_mode=mask"], "data.label_filter_mode"),
    (["data.cv_folds=3", "data.cv_fold=3"], "data.cv_fold"),
    (["audit.folds=1"], "audit.folds"),
    (["audit.filter_by=vibes"], "audit.filter_by"),
    (["train.bootstrap=maybe"], "train.bootstrap"),
    (["train.bootstrap=soft", "data.dataset=digits"], "train.bootstrap"),
    (["train.label_smoothing=0.7"], "train.label_smoothing"),
])
def test_bad_noise_and_audit_keys_name_the_key(override: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert str(e.value).startswith(f"{key}:"), str(e.value)


@pytest.mark.timeout(60)
def test_a_file_audit_filters_a_run_that_reads_its_images_at_another_size(tmp_path: Path) -> None:
    """The README's transfer recipe (``data.preset=photo``: 224 px, 3 channels) on an image folder audited at
    its own 48 px: the audit's fingerprint differed in ``image_size`` only and the filter was refused (found on
    review).  A generated dataset draws its items at its size: there the size still counts."""
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(3):
            img = Image.new("RGB", (48, 48), (40 * i, 90 if c == "cat" else 200, 7))
            img.save(tmp_path / "photos" / c / f"{i}.png")
    audited = load_config(None, ["data.dataset=image-folder", f"data.root={tmp_path / 'photos'}"]).data
    photo = load_config(None, ["data.dataset=image-folder", f"data.root={tmp_path / 'photos'}", "data.preset=photo",
                               "data.image_size=224"]).data
    assert fingerprint(audited) == fingerprint(photo)
    digits = load_config(None, [*SMALL]).data
    assert fingerprint(digits) != fingerprint(digits.model_copy(update={"image_size": 48}))


@pytest.mark.timeout(60)
def test_item_ids_of_a_root_reached_through_a_symlink_are_paths_under_it(tmp_path: Path) -> None:
    """``data.root`` through a link (``/data`` -> ``/mnt/disk1/x/data``): the ids were relative to the root as
    typed, of paths with the link resolved (``../../mnt/disk1/x/data/photos/cat/0.png``), and the audit's
    ``cleaned_manifest.jsonl`` was refused line by line as escaping the root (found on review)."""
    from PIL import Image

    from deepindex.data import build_splits
    from deepindex.data.label_view import item_ids

    real = tmp_path / "disk" / "x" / "y" / "photos"
    for c in ("cat", "dog"):
        (real / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (60 * i, 90 if c == "cat" else 200, 7)).save(real / c / f"{i}.png")
    (tmp_path / "link").symlink_to(real)
    cfg = load_config(None, ["data.dataset=image-folder", f"data.root={tmp_path / 'link'}", "data.val_size=1",
                             "data.test_size=1"])
    every = {f"{c}/{i}.png" for c in ("cat", "dog") for i in range(4)}
    ids = item_ids(build_splits(cfg.data).train, "train", str(tmp_path / "link"))
    assert len(ids) == 6 and set(ids) < every, ids
    manifest = tmp_path / "tags.jsonl"
    manifest.write_text("".join(json.dumps({"path": p, "tags": [p.split("/")[0]]}) + "\n" for p in sorted(every)))
    cfg = cfg.override({"data.dataset": "manifest", "data.manifest": str(manifest)})
    ids = item_ids(build_splits(cfg.data).train, "train", str(tmp_path / "link"))
    assert len(ids) == 6 and set(ids) < every, ids
