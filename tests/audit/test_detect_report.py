"""cleanlab's suspects, the report files and the filter reading them back: no Ray, no training.

The out-of-fold probabilities here are those of a good model with a few honest mistakes,
so what is asserted is the plumbing (cleanlab's flags -> suspects.csv -> data.label_filter),
not the audit's quality (tests/audit/test_audit_cluster.py measures that on a real run).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deepindex.audit.detect import detect, detection_scores
from deepindex.audit.report import (
    cleaned,
    summary_table,
    suspects_grid,
    weak_folds_warning,
    weak_model_warning,
    write_report,
)
from deepindex.config import Config, load_config
from deepindex.data import Splits, build_splits
from deepindex.data.label_view import fingerprint
from deepindex.train.metrics import chance_score

# (config, splits, given labels, out-of-fold probabilities, the corrupted pairs)
AuditInputs = tuple[Config, Splits, np.ndarray, np.ndarray, np.ndarray]
CFG = ["data.train_size=600", "data.val_size=100", "data.test_size=100", "data.label_noise=0.3"]


@pytest.fixture(scope="module")
def audit_inputs() -> AuditInputs:
    cfg = load_config(None, CFG)
    splits = build_splits(cfg.data)
    v = splits.view
    clean = v.clean["train"].numpy()
    rng = np.random.default_rng(0)
    # A good model: confident on the truth, plus 2 % of its probabilities plainly wrong.
    probs = np.clip(np.where(clean > 0.5, 0.95, 0.04) + rng.normal(0, 0.03, clean.shape), 0.001, 0.999)
    wrong = rng.random(clean.shape) < 0.02
    probs[wrong] = 1 - probs[wrong]
    return cfg, splits, v.given.numpy(), probs, v.flipped["train"].numpy()


@pytest.mark.timeout(60)
def test_cleanlab_flags_the_corrupted_labels_and_estimates_per_concept_noise(audit_inputs: AuditInputs) -> None:
    _, splits, given, probs, truth = audit_inputs
    det = detect(given, probs, splits.concepts)
    s = detection_scores(det.flagged, truth)
    assert s["precision"] > 0.6 and s["recall"] > 0.8, s
    assert [c["concept"] for c in det.concept_noise] == splits.concepts
    est = sum(c["wrong_tags_est"] + c["missing_tags_est"] for c in det.concept_noise)
    assert 0.5 * truth.sum() < est < 2 * truth.sum()
    worst = det.items[0]
    assert det.flagged[worst].any() and det.quality[worst][det.flagged[worst]].min() == pytest.approx(
        det.quality[det.flagged].min())
    with pytest.raises(ValueError, match=r"^audit: labels"):
        detect(given[:, :9], probs, splits.concepts)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["prune_by_noise_rate", "predicted_neq_given"])
def test_a_concept_on_every_item_or_on_none_gets_no_flags_and_leaves_the_others_as_they_were(
        audit_inputs: AuditInputs, how: str) -> None:
    """cleanlab refuses a binary task with one label ("at least 2 classes"), which used to end an
    audit after all its folds had trained: a concept tagged on every item (a collection-wide tag
    such as "photo"), or on none with some filters.  Such a concept gets no flags; the others get
    exactly the flags they get without it."""
    _, splits, given, probs, _ = audit_inputs
    base = detect(given, probs, splits.concepts, filter_by=how)
    everywhere, nowhere = np.ones((len(given), 1), bool), np.zeros((len(given), 1), bool)
    p = np.full((len(given), 1), 0.9)
    for extra in (everywhere, nowhere):
        det = detect(np.hstack([given, extra]), np.hstack([probs, p]), [*splits.concepts, "photo"], filter_by=how)
        assert not det.flagged[:, -1].any()
        assert np.array_equal(det.flagged[:, :-1], base.flagged)
        assert det.concept_noise[-1]["wrong_tags_est"] == det.concept_noise[-1]["missing_tags_est"] == 0
    one = detect(given[:1], probs[:1], splits.concepts, filter_by=how)  # one item: every concept constant
    assert not one.flagged.any()


@pytest.mark.timeout(60)
def test_exclusive_classes_flag_the_given_class_and_the_predicted_one() -> None:
    """One class per item (softmax probabilities): cleanlab's multiclass filter flags an item, and its
    two pairs are the given class (a wrong tag) and the model's class (a missing one), as the noise
    swaps them; the flip view is then the model's class."""
    cfg = load_config(None, [*CFG, "data.dataset=digits"])
    v = build_splits(cfg.data).view
    y, clean = v.given.numpy(), v.clean["train"].numpy()
    rng = np.random.default_rng(0)
    logits = 4.0 * np.eye(10)[clean] + rng.normal(0, 1.0, (len(y), 10))  # right ~97 % of the time
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = np.eye(10, dtype=bool)[y]
    det = detect(given, probs, [str(d) for d in range(10)], exclusive=True)
    s = detection_scores(det.flagged, v.flipped["train"].numpy())
    assert s["precision"] > 0.85 and s["recall"] > 0.85, s
    items = np.flatnonzero(det.flagged.any(1))
    assert (det.flagged[items].sum(1) <= 2).all() and det.flagged[items, y[items]].all()
    moved = cleaned(given, det.flagged)[items]
    two = det.flagged[items].sum(1) == 2
    assert (moved[two].argmax(1) == probs[items][two].argmax(1)).all() and (moved[two].sum(1) == 1).all()
    assert np.array_equal(det.quality, np.where(given, probs, 1 - probs))
    with pytest.raises(ValueError, match="exactly one class per item"):
        detect(given | np.eye(10, dtype=bool)[(y + 1) % 10], probs, [str(d) for d in range(10)], exclusive=True)


@pytest.mark.timeout(60)
def test_flags_on_most_items_say_the_fold_models_are_weak(audit_inputs: AuditInputs) -> None:
    """A good model on 30 % corrupted items flags fewer than half of them: no warning.  Out-of-fold
    probabilities at chance flag nearly every item: the table ends with a warning naming the share
    and the out-of-fold mAP, and what to do."""
    _, splits, given, probs, _ = audit_inputs
    good = detect(given, probs, splits.concepts)
    assert good.flagged.any(1).mean() < 0.5 and weak_model_warning(good, 0.95) is None
    assert "warning" not in summary_table(good, warning=weak_model_warning(good, 0.95))
    chance = detect(given, np.random.default_rng(1).random(given.shape), splits.concepts)
    n = int(chance.flagged.any(1).sum())
    w = weak_model_warning(chance, 0.3)
    assert n > 0.9 * len(given) and w is not None
    assert w.startswith(f"{n} of {len(given)} items ({round(100 * n / len(given))} %) have a suspect label")
    assert "out-of-fold mAP 0.3000" in w and "train.epochs" in w
    assert summary_table(chance, warning=w).splitlines()[-1] == f"warning: {w}"


def test_a_fold_model_that_learnt_nothing_is_named_whatever_the_share_flagged() -> None:
    """A 5-fold audit of 255 photos in 3 class folders (clean labels) flagged 19 items, below the weak-model
    share, while folds 1 and 5 had test top-1 errors of 0.72 and 0.53, where always answering the most
    frequent class errs 0.66: their items were judged by a guess.  The warning names them."""
    classes = np.array([0] * 11 + [1] * 11 + [2] * 10)  # a test split of 32
    chance = chance_score(classes, multilabel=False)
    assert chance == pytest.approx(21 / 32)
    w = weak_folds_warning([0.71875, 0.28125, 0.03125, 0.1875, 0.53125], chance, multilabel=False)
    assert w == ("folds 1 and 5 of 5 learnt next to nothing (test top-1 error 0.7188, 0.5312; always answering the "
                 "most frequent class: 0.6562): the items they predicted are judged by a guess, so their flags are "
                 "noise. Train the folds longer (train.epochs), from ImageNet weights (model.pretrained=imagenet) or "
                 "with another train.seed, and audit again")
    assert weak_folds_warning([0.03, 0.1, float("nan")], chance, multilabel=False) is None  # a fold unscored
    # Multi-label: a random ranking's expected AP of each present concept (3 and 1 positives of 4), averaged.
    tags = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    h4 = 1 + 1 / 2 + 1 / 3 + 1 / 4
    assert chance_score(tags, multilabel=True) == pytest.approx(((h4 + 2 / 3 * (4 - h4)) / 4 + h4 / 4) / 2)
    one = weak_folds_warning([0.97, 0.55, 0.99], 0.5, multilabel=True)  # 0.55 < 0.5 + 0.25 * 0.5
    assert one is not None and one.startswith("fold 2 of 3 learnt next to nothing (test mAP 0.5500; a random "
                                              "ranking: 0.5000): the items it predicted")
    assert weak_folds_warning([0.97, 0.63, 0.99], 0.5, multilabel=True) is None


@pytest.mark.timeout(60)
def test_the_noise_estimates_are_cleanlabs_counted_in_this_process(audit_inputs: AuditInputs,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-concept estimates are rank_classes_by_multilabel_quality's (which truncates each count
    through a float rate: ours or one more), under any filter, and no process pool is forked (the
    audit runs this in a Ray driver, whose forked children each printed a stack dump at exit)."""
    import multiprocessing.pool

    from cleanlab.multilabel_classification.dataset import rank_classes_by_multilabel_quality

    _, splits, given, probs, _ = audit_inputs
    labels = [np.flatnonzero(row).tolist() for row in given > 0.5]
    table = {int(r["Class Index"]): r for r in rank_classes_by_multilabel_quality(labels, probs).to_dict("records")}

    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("detect forked a process pool")

    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__", no_pool)
    for filter_by in ("prune_by_noise_rate", "both"):
        det = detect(given, probs, splits.concepts, filter_by)
        for k, c in enumerate(det.concept_noise):
            assert c["wrong_tags_est"] - table[k]["Label Issues"] in (0, 1), (k, c, table[k])
            assert c["missing_tags_est"] - table[k]["Inverse Label Issues"] in (0, 1), (k, c, table[k])
            assert c["wrong_tag_rate_est"] == pytest.approx(table[k]["Label Noise"])
    assert sum(c["wrong_tags_est"] + c["missing_tags_est"] for c in det.concept_noise) > 0


@pytest.mark.timeout(60)
def test_report_round_trips_through_the_label_filter(audit_inputs: AuditInputs, tmp_path: Path) -> None:
    cfg, splits, given, probs, truth = audit_inputs
    det = detect(given, probs, splits.concepts)
    out = write_report(tmp_path / "report", det=det, given=given, probs=probs, ids=splits.view.ids,
                       meta={"data": fingerprint(cfg.data)}, truth=truth)
    rows = list(csv.DictReader((out / "suspects.csv").open()))
    assert len(rows) == det.flagged.sum() and rows[0]["rank"] == "1"
    assert {r["issue"] for r in rows} == {"wrong_tag", "missing_tag"}
    assert sum(int(r["corrupted"]) for r in rows) == int((det.flagged & truth).sum())
    lines = [json.loads(line) for line in (out / "cleaned_labels.jsonl").read_text().splitlines()]
    assert len(lines) == len(given) and lines[7]["item"] == "train/7"
    filtered = build_splits(cfg.override({"data.label_filter": str(out)}).data)
    y = filtered.train.tensors[1].numpy() > 0.5
    assert np.array_equal(y, cleaned(given, det.flagged))
    for i in (0, 7, 99):
        assert lines[i]["tags"] == [splits.concepts[k] for k in np.flatnonzero(y[i])]
    table = summary_table(det, detection_scores(det.flagged, truth))
    assert table.splitlines()[2].split()[0] == "0" and "precision" in table.splitlines()[-1]
    fig = suspects_grid(splits.view.full_train, splits.stats, det, given, probs, splits.view.ids, n=8, truth=truth)
    assert sum(ax.has_data() for ax in fig.axes) == min(8, len(det.items))
    import matplotlib.pyplot as plt

    plt.close(fig)
    assert torch.equal(filtered.view.given, torch.from_numpy(given.astype(np.float32)))


@pytest.mark.timeout(60)
def test_a_filter_whose_labels_changed_since_the_audit_is_refused(audit_inputs: AuditInputs, tmp_path: Path) -> None:
    """Found on review: flip toggled the label as it is now.  A tag fixed by hand after the audit was
    toggled back to the wrong one.  A suspect whose label is no longer the one the audit saw is refused."""
    cfg, splits, given, probs, truth = audit_inputs
    det = detect(given, probs, splits.concepts)
    out = write_report(tmp_path / "report", det=det, given=given, probs=probs, ids=splits.view.ids,
                       meta={"data": fingerprint(cfg.data)}, truth=truth)
    lines = (out / "suspects.csv").read_text().splitlines()
    head = lines[0].split(",")
    col = head.index("given")
    row = lines[3].split(",")
    row[col] = str(1 - int(row[col]))  # the audit saw the other label: this one was fixed since
    lines[3] = ",".join(row)
    (out / "suspects.csv").write_text("\n".join(lines) + "\n")
    saw = "untagged" if row[col] == "0" else "tagged"
    with pytest.raises(ValueError, match=rf"^data\.label_filter: .*suspects\.csv:4: item '{row[head.index('item')]}' "
                                         rf"has concept '{row[head.index('concept')]}' .* the audit saw it {saw}: the "
                                         rf"labels changed since the audit; audit them again$"):
        build_splits(cfg.override({"data.label_filter": str(out)}).data)


@pytest.mark.mlflow
@pytest.mark.timeout(120)
def test_a_report_named_by_its_run_is_downloaded_once_and_leaves_no_folder_per_process(
        audit_inputs: AuditInputs, tmp_path: Path, mlflow_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.label_filter=runs:/<id>: one shared copy per machine (driver and workers alike), not a
    temp folder per process that nobody removes; a failed fetch leaves nothing."""
    import tempfile

    from deepindex.data.label_view import resolve_report
    from deepindex.tracking.audit import REPORT_ARTIFACTS
    from deepindex.tracking.tracker import mlflow_client

    cfg, splits, given, probs, truth = audit_inputs
    det = detect(given, probs, splits.concepts)
    folder = write_report(tmp_path / "report", det=det, given=given, probs=probs, ids=splits.view.ids,
                          meta={"data": fingerprint(cfg.data)}, truth=truth)
    client = mlflow_client(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment(f"audit-{tmp_path.name}")).info.run_id
    client.log_artifacts(run_id, str(folder), REPORT_ARTIFACTS)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # this test's own temp root
    (tmp_path / "tmp").mkdir()

    first = resolve_report(f"runs:/{run_id}")
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in folder.iterdir())
    by_run = build_splits(cfg.override({"data.label_filter": f"runs:/{run_id}"}).data)
    assert np.array_equal(by_run.train.tensors[1].numpy() > 0.5, cleaned(given, det.flagged))
    # Fetched once: a later resolution (another process on the node, another worker) reads the copy.
    (tmp_path / "late.txt").write_text("logged after the first download")
    client.log_artifact(run_id, str(tmp_path / "late.txt"), REPORT_ARTIFACTS)
    assert resolve_report(f"runs:/{run_id}") == first and not (first / "late.txt").exists()
    roots = list((tmp_path / "tmp").iterdir())
    assert len(roots) == 1 and [p.name for p in roots[0].iterdir() if not p.name.startswith(".")] == [first.parent.name]

    with pytest.raises(ValueError, match=f"data.label_filter: cannot fetch the audit report of run {'0' * 32}"):
        resolve_report(f"runs:/{'0' * 32}")
    assert [p.name for p in roots[0].iterdir()] == [first.parent.name]  # the failed fetch left nothing

    # A folder of that name that others can write (made first by another user, say) is refused, not used.
    shared = tmp_path / "shared" / f"deepindex-audit-{os.getuid()}"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared.parent))
    with pytest.raises(ValueError, match="only this user owns and can write"):
        resolve_report(f"runs:/{run_id}")
    assert list(shared.iterdir()) == []


def test_a_folds_held_out_items_are_predicted_once_each_without_augmentation(small_model, tmp_path):
    """Found on review: the held-out fold was read through the train split's random augmentation
    (data.augment, the photos recipe's crop and flip), so every out-of-fold probability cleanlab ranks
    came from a random crop, and two runs of the same audit flagged different items."""
    from deepindex.audit.run import fold_config, predict_holdout
    from deepindex.checkpoint import load_model

    base = load_model(small_model).config.override({"data.train_size": 400})
    plain = fold_config(base, 4, 1, str(tmp_path))
    augmented = plain.override({"data.augment": "crop,flip,jitter"})
    held, probs, computed_on = predict_holdout(str(small_model), plain)
    for _ in range(2):
        again, p, digest = predict_holdout(str(small_model), augmented)
        assert np.array_equal(again, held) and len(held) == 100
        assert np.allclose(p, probs, atol=1e-6) and digest == computed_on
    # The data a fold file says it was computed on is the audit driver's data (no fold, no augmentation):
    # a fold just trained is never refused as computed on other items.
    from deepindex.audit.run import data_digest
    from deepindex.data.noise import multi_hot

    driver = build_splits(base.data, train_augment=False)
    assert computed_on == data_digest(driver.view.ids, multi_hot(driver.view.given, len(driver.concepts)).numpy())


def test_a_fold_file_a_crash_left_unreadable_is_trained_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A fold is done when its file exists: one cut short (a crash before its bytes reached the disk)
    made every restore of the audit fail on it.  It is now written whole and synced, and one that does
    not read counts as not done."""
    import io

    from deepindex.audit.run import _finished, oof_path

    path = oof_path(tmp_path, 2)
    assert not _finished(path, 2)
    npz = io.BytesIO()
    np.savez(npz, index=np.arange(3), probs=np.zeros((3, 2), np.float32), run_id=np.array(""),
             test_score=np.array(0.5), node_id=np.array(""), checkpoint=np.array(""))
    path.parent.mkdir(parents=True)
    for cut in (0, len(npz.getvalue()) // 2):
        path.write_bytes(npz.getvalue()[:cut])
        assert not _finished(path, 2)
    assert "fold 2's file" in caplog.text and "training the fold again" in caplog.text
    path.write_bytes(npz.getvalue())
    assert _finished(path, 2)


def test_a_diverged_fold_is_its_error_not_a_finished_fold(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A fold whose model diverged (NaN predictions) was kept as finished; the audit then failed with "the
    folds do not cover every train item", left its MLflow parent RUNNING, and every run again did the same
    (found on review).  Its trial now fails naming the cause, and such a file (an older version's) is not done."""
    from deepindex.audit.run import _finished, check_finite, oof_path, write_fold

    probs = np.array([[0.2, 0.9], [np.nan, np.nan]], np.float32)
    with pytest.raises(ValueError, match=r"^fold 3's model diverged: its predictions are NaN or infinite \(lower"):
        check_finite(probs, 2)
    check_finite(np.zeros((2, 2), np.float32), 2)
    path = oof_path(tmp_path, 2)
    path.parent.mkdir(parents=True)
    write_fold(path, held=np.arange(2), probs=probs, digest="d", run_id="r", test_score=float("nan"), node_id=None,
               checkpoint="c")
    assert not _finished(path, 2)
    assert "fold 3's model diverged" in caplog.text and "training the fold again" in caplog.text


def _collection(root: Path, split_column: list[str] | None) -> None:
    """16 small images (PNG and JPEG, some in a subfolder), each of its own colour (no two the same
    bytes, so none is merged as a duplicate), and tags.csv beside them."""
    from PIL import Image

    rels = []
    for i in range(16):
        rel = f"{'sub/' if i % 4 == 0 else ''}p{i:02}.{'png' if i % 2 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 16), (15 * i, 200 - 10 * i, 90 if i % 2 else 30)).save(root / rel)
        rels.append(rel)
    tags = [f"{'sky' if i % 2 else 'sea'}{';boat' if i % 3 == 0 else ''}" for i in range(16)]
    if split_column is None:
        (root / "tags.csv").write_text("path,tags\n" + "".join(f"{r},{t}\n" for r, t in zip(rels, tags, strict=True)))
    else:
        (root / "tags.csv").write_text("path,tags,split\n" + "".join(
            f"{r},{t},{s}\n" for r, t, s in zip(rels, tags, split_column, strict=True)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("split_column", [
    ["train"] * 8 + [""] * 2 + ["val"] * 3 + ["test"] * 3,  # every split named (empty cells: train)
    ["test"] * 3 + ["train"] * 10 + [""] * 3,  # no val rows: val carved from train
    None,  # no split column: every split drawn
], ids=["train-val-test", "no-val-rows", "no-column"])
def test_the_cleaned_manifest_keeps_every_item_in_its_split_with_only_the_train_labels_cleaned(
        tmp_path: Path, split_column: list[str] | None) -> None:
    """Found on review: cleaned_manifest.jsonl held the train items alone, with no split column, so
    training on it (as the README says) carved new val and test splits out of the audited train items
    and the collection's own val and test items were gone.  It now lists every item in the split it
    was in: trained on, it gives the same train, val and test items, in the same order, the train
    items with the cleaned tags and the others with the tags they were given."""
    from deepindex.audit.detect import Detection
    from deepindex.audit.report import CLEANED_MANIFEST, held_splits
    from deepindex.data.files import read_collection
    from deepindex.data.noise import multi_hot

    root = tmp_path / "photos"
    _collection(root, split_column)
    cfg = load_config(None, ["data.dataset=manifest", f"data.root={root}", "data.image_size=16"])
    splits = build_splits(cfg.data, train_augment=False)
    v = splits.view
    given = multi_hot(v.given, len(splits.concepts)).numpy()
    flagged = np.zeros_like(given)
    flagged[0, int(np.flatnonzero(given[0])[0])] = True  # a wrong tag
    flagged[2, int(np.flatnonzero(~given[2])[0])] = True  # a missing one
    det = Detection(flagged, np.where(flagged, 0.1, 0.9), splits.concepts,
                    [{"concept": c, "wrong_tags_est": 0, "missing_tags_est": 0} for c in splits.concepts])
    held = held_splits(splits, cfg.data.root)
    assert [len(held["val"][0]), len(held["test"][0])] == [len(splits.val), len(splits.test)]
    with pytest.raises(ValueError, match="needs the val and test items"):
        write_report(tmp_path / "no", det=det, given=given, probs=given.astype(float), ids=v.ids,
                     meta={"data": fingerprint(cfg.data)}, manifest=True)
    out = write_report(tmp_path / "report", det=det, given=given, probs=given.astype(float), ids=v.ids,
                       meta={"data": fingerprint(cfg.data)}, manifest=True, held=held)

    manifest = out / CLEANED_MANIFEST
    items = read_collection(root, manifest)
    assert len(items.paths) == 16 and items.splits is not None and None not in items.splits
    assert items.report is not None and items.report.duplicates == 0
    again = build_splits(cfg.override({"data.manifest": str(manifest)}).data, train_augment=False)
    assert again.concepts == splits.concepts
    assert again.view.ids == v.ids  # the same train items, in the audit's order
    for split in ("val", "test"):  # the same val and test items with the tags they were given
        ids, tags = held_splits(again, cfg.data.root)[split]
        assert ids == held[split][0] and np.array_equal(tags, held[split][1])
    cleaned_train = multi_hot(again.view.given, len(again.concepts)).numpy()
    assert np.array_equal(cleaned_train, cleaned(given, flagged))
    assert not cleaned_train[0, flagged[0]].any() and cleaned_train[2, flagged[2]].all()
    assert (cleaned_train != given).sum() == 2
    assert set(v.ids).isdisjoint(held["val"][0] + held["test"][0])  # no audited train item in val or test
    # The label filter on the collection as it was trains on the same labels as the cleaned manifest.
    filtered = build_splits(cfg.override({"data.label_filter": str(out)}).data, train_augment=False)
    assert np.array_equal(multi_hot(filtered.train.targets, len(splits.concepts)).numpy(), cleaned_train)


def test_a_kept_fold_computed_on_other_items_or_labels_is_refused(tmp_path: Path) -> None:
    """Found on review: a fold file held positional indices alone and a resumed audit kept it whatever
    the data now was, so after items were added, reordered or re-tagged its probabilities went to other
    items (or the resume failed with a bare IndexError).  A fold file now holds the digest of the
    train items and labels it was computed on; one computed on others is refused, in one line."""
    from deepindex.audit.run import DataChanged, data_digest, kept_folds, oof_path, read_fold, write_fold

    ids = [f"p{i}.jpg" for i in range(6)]
    given = np.eye(3, dtype=bool)[[0, 1, 2, 0, 1, 2]]
    now = data_digest(ids, given)
    assert data_digest(list(ids), given.astype(np.float32)) == now  # bool or float labels: the same data
    retagged = given.copy()
    retagged[4] = ~retagged[4]
    before = {"reordered": data_digest(ids[::-1], given[::-1]),
              "added": data_digest([*ids, "p6.jpg"], np.vstack([given, given[:1]])),
              "re-tagged": data_digest(ids, retagged),
              "renamed": data_digest([*ids[:5], "q5.jpg"], given)}
    assert now not in before.values() and len(set(before.values())) == 4

    path = oof_path(tmp_path, 1)
    path.parent.mkdir(parents=True)

    def write(digest: str) -> None:
        write_fold(path, held=np.array([1, 4]), probs=np.full((2, 3), 0.25), digest=digest, run_id="r1",
                   test_score=0.875, node_id=None, checkpoint="/ckpt")

    refused = (r"^audit a1: the data changed since the audit started \(fold 2 was computed on other items or "
               r"labels\): run the audit under another --name$")
    for digest in before.values():
        write(digest)
        with pytest.raises(DataChanged, match=refused):
            read_fold(path, 1, now, "a1")
        with pytest.raises(DataChanged, match=refused):  # refused before a restored audit trains anything
            kept_folds(tmp_path, 3, now, "a1")
    write(now)
    res, held, probs = read_fold(path, 1, now, "a1")
    assert held.tolist() == [1, 4] and probs.dtype == np.float32 and np.allclose(probs, 0.25)
    assert (res.fold, res.items, res.run_id, res.test_score, res.node_id, res.checkpoint) == (1, 2, "r1", 0.875,
                                                                                               None, "/ckpt")
    assert kept_folds(tmp_path, 3, now, "a1") == [1]
    # A fold file an older version wrote holds no digest: read as before.
    np.savez(path, index=np.array([1, 4]), probs=np.zeros((2, 3), np.float32), run_id=np.array(""),
             test_score=np.array(0.5), node_id=np.array(""), checkpoint=np.array(""))
    assert read_fold(path, 1, now, "a1")[1].tolist() == [1, 4] and kept_folds(tmp_path, 3, now, "a1") == [1]
    path.write_bytes(b"cut")  # one a crash left unreadable is trained again, not refused
    assert kept_folds(tmp_path, 3, now, "a1") == []
