"""``run_audit``: K trainings of the configured model in parallel (Ray Tune, one trial per fold),
each predicting the fold it did not see, then cleanlab over the out-of-fold probabilities.

Each fold is a Tune trial (``fold`` is the grid-searched key) that trains on
``data.cv_folds=K, data.cv_fold=k`` the way ``deepindex train`` does
(``deepindex.workflows.tracked_train``: the shared ``TorchTrainer``, a rank-0 MLflow tracker
whose run is a child of the audit's parent run, then the best checkpoint scored and logged),
predicts its held-out fold and writes ``<audit>/oof/fold<k>.npz``.  What goes to MLflow, and
how, is :mod:`deepindex.tracking.audit`'s business.  A killed Train worker restarts that
fold's worker group from its last checkpoint (Ray Train's FailureConfig); the other folds
never notice.  Running an audit again with the same name and storage path restores it:
finished folds are kept, each only if it was computed on the train items and given labels of
now (a fold file holds their digest, :func:`data_digest`): a collection that changed meanwhile
is refused (:class:`DataChanged`), not half-predicted.

Layout under ``<ray.storage_path>/<name>/``: Tune's experiment state, ``train/fold<k>/``
(the folds' Train runs), ``oof/`` and ``report/`` (see :mod:`deepindex.audit.report`).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepindex import restore
from deepindex.atomic import write_file
from deepindex.config import GENERATED, Config, ConfigError, from_dict
from deepindex.console import error_line, event, failure_lines, tune_verbosity

if TYPE_CHECKING:
    from ray.tune import Callback

    from deepindex.audit.detect import Detection

log = logging.getLogger(__name__)

FOLD_DRIVER_MEMORY = 512 * 2**20  # bytes reserved by a fold's Tune trial
# GENERATED datasets are made in memory with exactly data.train_size train items: their folds' sizes are known
# before any data is built.


class AuditFailed(ValueError):
    """A fold did not finish: no out-of-fold prediction for its items, so no report."""


class DataChanged(ValueError):
    """A kept fold was computed on other train items or labels than the audit's data now."""

    def __init__(self, audit: str, fold: int) -> None:
        super().__init__(f"audit {audit}: the data changed since the audit started (fold {fold + 1} was computed "
                         "on other items or labels): run the audit under another --name")


@dataclass
class FoldResult:
    fold: int
    items: int
    run_id: str | None
    test_score: float | None  # the fold model's test mAP (multi-label) or top-1 error (exclusive classes)
    node_id: str | None
    checkpoint: str | None


@dataclass
class AuditOutcome:
    name: str
    path: Path  # <storage>/<name>
    report: Path  # <path>/report
    parent_run_id: str | None
    folds: list[FoldResult]
    summary: str
    scores: dict[str, Any] | None  # precision/recall vs the known corruptions (synthetic noise only)
    oof_map: float  # out-of-fold mAP against the given labels
    wall_s: float
    flagged: int
    meta: dict[str, Any] = field(default_factory=dict)


def check_config(cfg: Config) -> None:
    """Refuse, naming the key, what an audit cannot do."""
    if cfg.data.label_filter:
        raise ConfigError("data.label_filter: an audit audits the given labels; drop the filter")
    if cfg.data.cv_folds:
        raise ConfigError("data.cv_folds: the audit sets the folds itself (use audit.folds)")


def check_folds_fit(cfg: Config, items: int) -> None:
    """Refuse, naming the key, an audit whose folds cannot train on its ``items`` train items: fewer items
    than folds, or a fold's share (every item but its own fold's) that fills no batch of
    ``train.batch_size`` on its workers: the check each fold's training makes
    (:func:`deepindex.train.trainer.check_batches`), made once before Ray starts.  Made in the folds,
    every fold failed on it after the cluster started, and the audit's name was taken by a definition
    that could never train (the same name with another batch size is refused)."""
    from deepindex.train.trainer import check_batches

    folds = cfg.audit.folds
    if items < folds:
        raise ConfigError(f"audit.folds: {folds} folds need at least {folds} train items, there are {items}")
    trained = items - -(-items // folds)  # the smallest share: every item but the largest fold's
    try:
        check_batches(cfg, trained)
    except ConfigError as e:
        raise ConfigError(f"{e} (each of the audit's {folds} folds trains on about {trained} of the {items} "
                          "train items: every item but its own fold's)") from None


def fold_config(base: Config | dict[str, Any], folds: int, fold: int, train_storage: str) -> Config:
    cfg = base if isinstance(base, Config) else from_dict(base)
    return cfg.override({"data.cv_folds": folds, "data.cv_fold": fold, "ray.storage_path": train_storage})


def oof_path(audit_dir: str | Path, fold: int) -> Path:
    return Path(audit_dir) / "oof" / f"fold{fold}.npz"


def data_digest(ids: list[str], given: np.ndarray) -> str:
    """A short digest of the train items (their ids, in order) and their given labels ((N, K), multi-hot
    or one-hot): what a fold file's positional indices refer to."""
    h = hashlib.sha256()
    h.update(json.dumps(list(ids)).encode())
    labels = np.ascontiguousarray(np.asarray(given) > 0.5)
    h.update(repr(labels.shape).encode())
    h.update(labels.tobytes())
    return h.hexdigest()[:32]


def predict_holdout(checkpoint: str, cfg: Config, threads: int = 1) -> tuple[np.ndarray, np.ndarray, str]:
    """(held-out train indices, (n, K) probabilities: sigmoid per concept, or softmax over exclusive
    classes, and the :func:`data_digest` of the train items the indices refer to) of a fold's checkpoint."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from deepindex.checkpoint import load_model
    from deepindex.data.noise import multi_hot
    from deepindex.train.engine import predict
    from deepindex.train.evaluation import model_splits

    torch.set_num_threads(max(1, threads))
    lm = load_model(checkpoint)
    # Each held-out item once, as the fold's model sees an image: no random augmentation (data.augment),
    # its own input keys and stats (model.pretrained's ImageNet normalisation, resolved only in training).
    splits = model_splits(lm, cfg.data)
    view = splits.view
    held = view.holdout_index
    if held is None:
        raise ValueError(f"audit: fold {cfg.data.cv_fold} of {cfg.data.cv_folds} holds no item out")
    logits, _ = predict(lm.model, DataLoader(Subset(view.full_train, held.tolist()), batch_size=512))
    probs = (torch.sigmoid(logits) if lm.multilabel else torch.softmax(logits, dim=1)).numpy()
    return held, probs, data_digest(view.ids, multi_hot(view.given, len(splits.concepts)).numpy())


def _worker_node(train_storage: str, name: str) -> str | None:
    try:
        return json.loads((Path(train_storage) / name / "workers" / "rank0.json").read_text()).get("node_id")
    except (OSError, json.JSONDecodeError):
        return None


def fold_driver(params: dict[str, Any], *, base: dict[str, Any], audit: str, audit_dir: str, folds: int,
                tracking_uri: str | None, parent_run_id: str | None, threads: int, digest: str | None = None) -> None:
    """One Tune trial: train on every fold but ``params["fold"]``, then predict that fold.
    ``digest``: the :func:`data_digest` of the audit's data now, which a kept fold must match."""
    import ray.tune

    from deepindex.tracking.audit import fold_tags, tag_fold_node
    from deepindex.workflows import tracked_train

    k = int(params["fold"])
    train_storage = str(Path(audit_dir) / "train")
    cfg = fold_config(base, folds, k, train_storage)
    out = oof_path(audit_dir, k)
    if not _finished(out, k):  # a restored audit keeps the folds it finished
        name = f"fold{k}"
        # Trained and tracked as `deepindex train` is: one MLflow run, here a child of the audit's.
        outcome, run_id = tracked_train(cfg, name=name, parent_run_id=parent_run_id, tags=fold_tags(audit, k),
                                        tracking_uri=tracking_uri)
        held, probs, computed_on = predict_holdout(outcome.checkpoint, cfg, threads)
        check_finite(probs, k)  # the trial fails with the cause; no file: the fold is not done
        node = _worker_node(train_storage, name)
        if run_id and node and tracking_uri:
            tag_fold_node(run_id, node, tracking_uri)
        write_fold(out, held=held, probs=probs, digest=computed_on, run_id=run_id,
                   test_score=float(outcome.test_metrics.get(fold_metric(cfg), np.nan)), node_id=node,
                   checkpoint=str(outcome.checkpoint))
    res, held, _ = read_fold(out, k, digest, audit)
    ray.tune.report({"fold": k, "done": 1, "held_out": len(held), "fold_test_score": res.test_score})


def check_finite(probs: np.ndarray, fold: int) -> None:
    """A fold whose model diverged predicts NaN: that is its error, not a result.  Kept as one, it was read as
    done, then failed the audit as "the folds do not cover every train item", on every run again."""
    if not np.isfinite(probs).all():
        raise ValueError(f"fold {fold + 1}'s model diverged: its predictions are NaN or infinite (lower optim.lr, "
                         "or add schedule.warmup_epochs)")


def write_fold(path: Path, *, held: np.ndarray, probs: np.ndarray, digest: str, run_id: str | None,
               test_score: float, node_id: str | None, checkpoint: str) -> None:
    """A finished fold's file: its held-out indices and their probabilities, with the :func:`data_digest`
    of the train items the indices refer to."""
    npz = io.BytesIO()
    np.savez(npz, index=held, probs=np.asarray(probs, dtype=np.float32), run_id=np.array(run_id or ""),
             test_score=np.array(float(test_score)), node_id=np.array(node_id or ""),
             checkpoint=np.array(checkpoint), data_digest=np.array(digest))
    write_file(path, npz.getvalue())  # a fold is done exactly when its file exists, whole and synced


def read_fold(path: Path, fold: int, digest: str | None, audit: str) -> tuple[FoldResult, np.ndarray, np.ndarray]:
    """A finished fold's file, refused (:class:`DataChanged`) when it was computed on other train items or
    labels than those of digest ``digest`` (its indices would name other items).  A file an older
    version wrote holds no digest and is read as before."""
    res, held, probs, computed_on = _read_fold(path, fold)
    _same_data(computed_on, digest, audit, fold)
    return res, held, probs


def _same_data(computed_on: str | None, digest: str | None, audit: str, fold: int) -> None:
    if digest is not None and computed_on is not None and computed_on != digest:
        raise DataChanged(audit, fold)


def kept_folds(audit_dir: str | Path, folds: int, digest: str, audit: str) -> list[int]:
    """The folds an earlier run of the audit finished (their files read), each checked against the data now:
    refused before anything trains when one was computed on other items or labels."""
    kept = []
    for k in range(folds):
        got = _readable(oof_path(audit_dir, k), k)
        if got is not None:
            _same_data(got[3], digest, audit, k)
            kept.append(k)
    return kept


def _finished(path: Path, fold: int) -> bool:
    """Whether fold ``fold`` is done: its file is there and reads (one a crash or a full disk left
    unreadable is trained again, rather than every restore failing on it)."""
    return _readable(path, fold) is not None


def _readable(path: Path, fold: int) -> tuple[FoldResult, np.ndarray, np.ndarray, str | None] | None:
    """:func:`_read_fold` of a fold's file, or None when there is none or it does not read (said)."""
    if not path.is_file():
        return None
    try:
        return _read_fold(path, fold)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("audit: fold %d's file %s is unreadable (%s): training the fold again", fold, path, e)
        return None


def _read_fold(path: Path, fold: int) -> tuple[FoldResult, np.ndarray, np.ndarray, str | None]:
    """(the fold's result, held-out indices, probabilities, the digest of the data it was computed on:
    None in a file an older version wrote)."""
    with np.load(path, allow_pickle=False) as z:
        held, probs = z["index"], z["probs"]
        score = z["test_score"] if "test_score" in z.files else z["test_map"]  # a fold an older version wrote
        check_finite(probs, fold)  # written by an older version, which kept a diverged fold
        res = FoldResult(fold, len(held), str(z["run_id"]) or None, float(score),
                         str(z["node_id"]) or None, str(z["checkpoint"]) or None)
        computed_on = str(z["data_digest"]) if "data_digest" in z.files else None
    return res, held, probs, computed_on


def _parent_run(cfg: Config, name: str, audit_dir: Path, uri: str | None) -> str | None:
    """The audit's MLflow parent run: created once, found again when the audit is restored (its
    id is kept in ``deepindex_audit.json`` in the audit folder)."""
    from deepindex.tracking.audit import open_audit_run

    recorded = restore.read_state(audit_dir, restore.AUDIT_STATE)
    rid = open_audit_run(cfg, name, uri, recorded=recorded.get("parent_run_id"))
    if rid is not None and rid != recorded.get("parent_run_id"):
        restore.update_state(audit_dir, restore.AUDIT_STATE, parent_run_id=rid, tracking_uri=uri)
    return rid


def _per_concept(flagged: np.ndarray, truth: np.ndarray) -> list[dict[str, Any]]:
    from deepindex.audit.detect import detection_scores

    out = []
    for k in range(truth.shape[1]):
        s = detection_scores(flagged[:, k], truth[:, k])
        out.append({"corrupted": s["corrupted"], "precision": s["precision"], "recall": s["recall"]})
    return out


def fold_metric(cfg: Config) -> str:
    """The fold models' test score: what ``deepindex train`` ranks by, on the test split."""
    from deepindex.train.engine import primary_metric

    return primary_metric(cfg.multilabel, "test_")[0]


def _fold_lines(folds: int, metric: str) -> Callback:
    """A Tune callback (it runs in this driver) that puts one console line per finished or failed fold."""
    what = {"test_map": "test mAP", "test_top1_error": "test top-1 error"}.get(metric, metric)

    def failed(trial: Any) -> str:
        return f"fold {int(trial.config['fold']) + 1} of {folds} failed"

    class FoldLines(failure_lines(failed, log)):  # type: ignore[misc]  # a class made at run time
        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            r = trial.last_result or {}
            if "held_out" in r:
                event("fold %d of %d: its model (%s %.4f) predicted the %d items it did not see",
                      int(r["fold"]) + 1, folds, what, float(r["fold_test_score"]), int(r["held_out"]))

    return FoldLines()


def run_audit(cfg: Config, *, name: str | None = None, tracking_uri: str | None = None) -> AuditOutcome:
    """Audit the train labels of ``cfg`` on the connected cluster; write the report, log MLflow.
    One process at a time runs an audit (:func:`deepindex.restore.running`)."""
    from deepindex.train.trainer import folder_storage

    check_config(cfg)
    if cfg.data.dataset in GENERATED:  # before a folder is made or Ray starts (other data: once it is read)
        check_folds_fit(cfg, cfg.data.train_size)
    storage = folder_storage(cfg, "audit")
    name = name or cfg.ray.name or restore.fresh_name("audit", storage)
    with restore.running("audit", name, storage):
        return _run_audit(cfg, name, storage, tracking_uri)


def _run_audit(cfg: Config, name: str, storage: str, tracking_uri: str | None) -> AuditOutcome:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from deepindex.audit.detect import detect, detection_scores
    from deepindex.audit.report import (
        GRID_FILE,
        combine_warnings,
        held_splits,
        summary_table,
        suspects_grid,
        weak_folds_warning,
        weak_model_warning,
        write_report,
    )
    from deepindex.cluster import connect, wait_for_resources
    from deepindex.data import build_splits
    from deepindex.data.cache import share_cache
    from deepindex.data.label_view import fingerprint, targets_of
    from deepindex.data.noise import multi_hot
    from deepindex.tracking.uri import resolve_tracking_uri
    from deepindex.train.metrics import chance_score, mean_ap

    start = time.monotonic()
    cfg = share_cache(cfg, storage)  # each fold's run is under <storage>/<name>/train: one decode for all
    audit_dir = Path(storage) / name
    restoring = tune.Tuner.can_restore(str(audit_dir))
    # The detection runs after the folds: a restored audit may filter them another way.
    definition = restore.config_definition(cfg, free=("audit.filter_by", "audit.grid_items", "audit.max_concurrent",
                                              "audit.fold_driver_cpus"))
    if restoring:  # before anything is written: a changed audit is refused as it was
        restore.check_unchanged(name, audit_dir, restore.AUDIT_STATE, definition)
    else:  # a folder of a sweep or training run of this name: refused before the data is read
        restore.check_kind(name, audit_dir, restore.AUDIT_STATE)
    splits = build_splits(cfg.data, train_augment=False)  # the given labels, ids and images; fails early on bad data
    view, concepts = splits.view, splits.concepts
    given = multi_hot(view.given, len(concepts)).numpy()  # exclusive classes one-hot
    folds = cfg.audit.folds
    if cfg.data.dataset not in GENERATED:  # (generated data was checked before its folder was made)
        check_folds_fit(cfg, len(given))
    elif len(given) < folds:
        raise ConfigError(f"audit.folds: {folds} folds need at least {folds} train items, there are {len(given)}")
    if not restoring:  # a new audit's definition, once its folds are known to fit: a refused one takes no name
        restore.record_definition(audit_dir, restore.AUDIT_STATE, definition)
    digest = data_digest(view.ids, given)
    kept_folds(audit_dir, folds, digest, name)  # a restored audit whose data changed: refused before any training
    connect()
    fold_need = cfg.ray.worker_group()
    fold_need["CPU"] += cfg.audit.fold_driver_cpus
    wait_for_resources(fold_need, f"an audit fold ({cfg.ray.num_workers} worker(s) x {cfg.ray.cpus_per_worker:g} "
                                  f"CPU, {cfg.audit.fold_driver_cpus:g} for its driver)")
    uri = (tracking_uri or resolve_tracking_uri()) if cfg.tracking.enabled else None
    parent = _parent_run(cfg, name, audit_dir, uri)

    threads = max(1, int(cfg.audit.fold_driver_cpus))
    trainable = tune.with_resources(
        functools.partial(fold_driver, base=cfg.to_dict(), audit=name, audit_dir=str(audit_dir), folds=folds,
                          tracking_uri=uri, parent_run_id=parent, threads=threads, digest=digest),
        # Tune refuses a trial of no resources: the driver holds memory (it builds the splits
        # and predicts a fold), not CPU, which would keep a fold's Train worker waiting.
        {"CPU": cfg.audit.fold_driver_cpus, "memory": FOLD_DRIVER_MEMORY})
    if restoring:
        event("audit %s exists at %s: restoring it (finished folds kept)", name, audit_dir)
        tuner = tune.Tuner.restore(str(audit_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        concurrent = cfg.audit.max_concurrent or folds
        event("audit %s: %d folds of %d train items, %d at a time", name, folds, len(given), concurrent)
        tuner = tune.Tuner(
            trainable,
            param_space={"fold": tune.grid_search(list(range(folds)))},
            tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=concurrent)),
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[_fold_lines(folds, fold_metric(cfg))],
                                      failure_config=tune.FailureConfig(max_failures=1), verbose=tune_verbosity()),
        )
    try:
        grid = tuner.fit()
    except BaseException:
        _end_parent(uri, parent, "FAILED")  # never leave the parent RUNNING for a dead audit
        raise
    errors = grid.errors
    missing = [k for k in range(folds) if not oof_path(audit_dir, k).is_file()]
    if missing:
        _end_parent(uri, parent, "FAILED")
        raise AuditFailed(failed_folds(name, missing, folds, errors))

    probs = np.full(given.shape, np.nan, dtype=np.float32)
    results: list[FoldResult] = []
    try:
        for k in range(folds):
            res, held, p = read_fold(oof_path(audit_dir, k), k, digest, name)
            if p.shape[1:] != probs.shape[1:] or (len(held) and (held.min() < 0 or held.max() >= len(probs))):
                # a fold an older version wrote (no digest) on other data: its indices name no item of now
                raise DataChanged(name, k)
            probs[held] = p
            results.append(res)
    except DataChanged:
        _end_parent(uri, parent, "FAILED")
        raise
    if np.isnan(probs).any():
        _end_parent(uri, parent, "FAILED")  # never leave the parent RUNNING for a dead audit
        raise RuntimeError(f"audit {name}: the folds do not cover every train item")
    det = detect(given, probs, concepts, cfg.audit.filter_by, exclusive=not cfg.multilabel)
    truth = view.flipped["train"].numpy() if "train" in view.flipped else None
    scores = detection_scores(det.flagged, truth) if truth is not None else None
    per_concept = _per_concept(det.flagged, truth) if truth is not None else None
    import torch

    oof_map = mean_ap(torch.from_numpy(probs), torch.from_numpy(given.astype(np.float32)))
    chance = chance_score(targets_of(splits.test), cfg.multilabel)
    warnings = [weak_folds_warning([r.test_score if r.test_score is not None else np.nan for r in results], chance,
                                   cfg.multilabel), weak_model_warning(det, oof_map)]
    warning = combine_warnings(*warnings)
    wall = time.monotonic() - start
    meta: dict[str, Any] = {
        "name": name, "folds": folds, "filter_by": cfg.audit.filter_by, "items": len(given), "concepts": concepts,
        "flagged_labels": int(det.flagged.sum()), "flagged_items": int(det.flagged.any(1).sum()),
        "oof_map_given": oof_map, "detection": scores, "wall_s": wall, "parent_run_id": parent, "tracking_uri": uri,
        "fold_runs": [vars(r) for r in results], "data": fingerprint(cfg.data), "config": cfg.to_dict(),
        "warning": warning}
    if truth is not None:
        meta["oof_map_clean"] = mean_ap(torch.from_numpy(probs), multi_hot(view.clean["train"], len(concepts)).float())
    manifest = cfg.data.dataset == "manifest"
    report = write_report(audit_dir / "report", det=det, given=given, probs=probs, ids=view.ids, meta=meta,
                          truth=truth, per_concept=per_concept, manifest=manifest,
                          held=held_splits(splits, cfg.data.root) if manifest else None)
    fig = suspects_grid(view.full_train, splits.stats, det, given, probs, view.ids, n=cfg.audit.grid_items,
                        truth=truth, exclusive=not cfg.multilabel)
    fig.savefig(report / GRID_FILE, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    summary = summary_table(det, scores, per_concept, warning)
    if parent and uri:
        _log_parent(uri, parent, report, det, scores, meta)
    return AuditOutcome(name, audit_dir, report, parent, results, summary, scores, oof_map, wall,
                        int(det.flagged.sum()), meta)


def is_config_error(error: object) -> bool:
    """Whether a fold's error (a Tune trial's: a Ray task error wrapping what the fold raised) is a
    ``ConfigError``, which the same config meets again however often it runs."""
    if isinstance(error, ConfigError) or isinstance(getattr(error, "cause", None), ConfigError):
        return True
    last = error_line(error)  # an error Tune kept as text: its last line names the exception's type
    return "ConfigError" in last or "ChangedOnRestore" in last


def failed_folds(name: str, missing: list[int], folds: int, errors: list[Any]) -> str:
    """Why the audit ``name`` has no report, and what to do: a fold that failed on its config fails again
    under this name (its definition is kept, and another one refused), so another --name; any other
    failure, the same name resumes it (finished folds kept)."""
    why = f" ({error_line(errors[0])[:300]})" if errors else ""
    if any(is_config_error(e) for e in errors):
        advice = "fix the config and run it under another --name (this name keeps the config it started with)"
    else:
        advice = "run it again with the same name to resume"
    return f"audit {name}: folds {[k + 1 for k in missing]} of {folds} did not finish{why}; {advice}"


def _log_parent(uri: str, run_id: str, report: Path, det: Detection, scores: dict[str, Any] | None,
                meta: dict[str, Any]) -> None:
    """The audit's numbers and report on its MLflow parent run, which then ends FINISHED.  A server that
    fails now is a warning (:func:`deepindex.tracking.audit.log_audit`): the audit is done, its report written."""
    from deepindex.tracking.audit import log_audit

    values = {"flagged_labels": meta["flagged_labels"], "flagged_items": meta["flagged_items"],
              "oof_map_given": meta["oof_map_given"], "audit_wall_s": meta["wall_s"]}
    if "oof_map_clean" in meta:
        values["oof_map_clean"] = meta["oof_map_clean"]
    if scores:
        values.update({"detection_precision": scores["precision"], "detection_recall": scores["recall"]})
    for c in det.concept_noise:  # the per-concept noise estimates, one metric each
        n = c["concept"]
        values.update({f"wrong_tag_rate_est.{n}": c["wrong_tag_rate_est"],
                       f"missing_tag_rate_est.{n}": c["missing_tag_rate_est"],
                       f"flagged_wrong.{n}": c["flagged_wrong"], f"flagged_missing.{n}": c["flagged_missing"]})
    log_audit(run_id, uri, metrics=values, report=report)


def _end_parent(uri: str | None, run_id: str | None, status: str) -> None:
    if uri and run_id:
        from deepindex.tracking.audit import end_audit_run

        end_audit_run(run_id, status, uri)
