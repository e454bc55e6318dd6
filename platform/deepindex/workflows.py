"""The steps that span training and tracking: train-then-log, promotion, and their CLI/job entry points.

``deepindex train`` / ``jobs/train.py`` call :func:`train_main`; ``deepindex promote`` /
``jobs/promote.py`` call :func:`promote_main`; the Tune driver finalises each trial with
:func:`finalize_run` and promotes with :func:`promote`.  This module sits above both
``deepindex.train`` (training, scoring) and ``deepindex.tracking`` (MLflow), so neither of those
imports the other.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepindex.config import GENERATED, Config, load_config
from deepindex.tracking.registry import PromotionDecision
from deepindex.tracking.tracker import RUN_ID_KEY, Tracker
from deepindex.train.trainer import TrainOutcome, storage_path

if TYPE_CHECKING:
    from ray.train import UserCallback

    from deepindex.checkpoint import LoadedModel
    from deepindex.index.collection import Collection
    from deepindex.train.evaluation import Scored

log = logging.getLogger(__name__)


def _summary(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not isinstance(v, list)}  # the test's per-concept AP is a dict: kept


def train_main(config_path: str | None, overrides: list[str], name: str | None = None) -> dict[str, Any]:
    """Validate the config first (a bad key fails before Ray starts), train, print the results."""
    from deepindex.restore import running
    from deepindex.train.trainer import check_batches, run_name

    started = time.monotonic()
    cfg = load_config(config_path, overrides)
    check_data(cfg)
    if cfg.data.dataset in GENERATED:  # exactly data.train_size items: a batch they cannot fill fails before Ray
        check_batches(cfg, cfg.data.train_size, warn=False)  # (its warning comes once, where the trainer checks)
    name = name or run_name(cfg)
    with running("train", name, storage_path(cfg)):  # one process at a time trains a run
        return _train_main(cfg, name, started)


def _train_main(cfg: Config, name: str, started: float) -> dict[str, Any]:
    from deepindex.cluster import connect, wait_for_resources
    from deepindex.console import event
    from deepindex.train.trainer import claim_run, epoch_lines

    resumed = claim_run(cfg, name)  # a changed resume fails here, before Ray starts
    connect()
    wait_for_resources(cfg.ray.worker_group(), f"training ({cfg.ray.num_workers} worker(s) x "
                                                f"{cfg.ray.cpus_per_worker:g} CPU)")
    sync_pending(storage_path(cfg))
    event("training %s on %d worker(s), %d epochs (%s)", cfg.model.name, cfg.ray.num_workers, cfg.train.epochs,
          cfg.data.dataset)
    if resumed is not None:
        event("train %s exists at %s: resuming it from its last checkpoint", name, resumed)
    # One MLflow run per training run (when a tracking server is configured or up).
    try:
        out, run_id = tracked_train(cfg, name=name, callbacks=[epoch_lines(cfg.train.epochs)], warn_unlearnt=True)
    except KeyboardInterrupt:
        event("train %s interrupted; the same command with --name %s resumes it from its last checkpoint", name, name)
        raise
    test = ", ".join(f"{k} {v:.4f}" for k, v in _summary(out.test_metrics).items() if isinstance(v, float))
    event("trained %s in %.0f s: best checkpoint %s; test: %s", out.name, time.monotonic() - started, out.checkpoint,
          test)
    if run_id:
        event("MLflow run %s; to serve this model: deepindex promote --run %s", run_id, run_id)
    result = {"name": out.name, "checkpoint": out.checkpoint, "last_epoch": _summary(out.metrics),
              "test": _summary(out.test_metrics), "mlflow_run_id": run_id}
    print(json.dumps(result, indent=2))
    return result


def check_data(cfg: Config) -> None:
    """What a driver checks of the data before it starts Ray: the files are there (a missing folder,
    manifest or file, a manifest without its root), whatever else the config says of them, and an
    audit report given as ``data.label_filter`` fits them.  Otherwise a training's workers, or every
    trial of a sweep, would each fail on it after the cluster started."""
    from deepindex.config import FILE_DATASETS
    from deepindex.data.inspect import data_files
    from deepindex.data.label_view import check_label_filter

    if cfg.data.dataset in FILE_DATASETS:
        data_files(cfg.data)
    elif cfg.data.dataset in ("cifar10", "cifar100"):
        _check_cifar(cfg.data.root, cfg.data.dataset)
    check_label_filter(cfg.data)


def _check_cifar(root: str | None, which: str) -> None:
    """CIFAR's files are there: the same check the workers make (:func:`deepindex.data.files.read_cifar`,
    torchvision's integrity check of every file), on the smaller test file."""
    from deepindex.data.files import read_cifar

    if not root:  # the workers' own words (deepindex.data.splits)
        raise ValueError("data.root: required for CIFAR (the folder holding torchvision's files)")
    read_cifar(root, which, train=False)


def tracked_train(cfg: Config, *, name: str | None = None, callbacks: list[UserCallback] | None = None,
                  parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                  tracking_uri: str | None = None, warn_unlearnt: bool = False) -> tuple[TrainOutcome, str | None]:
    """Train on the connected cluster with MLflow tracking; returns (outcome, MLflow run id).

    After Ray Train returns, the best checkpoint (by the validation metric) is scored on the test
    split and the run gets the test metrics, reports and the checkpoint (:func:`finalize_run`;
    ``warn_unlearnt``: a model hardly better than a guess is said to be, as `deepindex train` does;
    an audit's folds are judged together by the audit).
    """
    from deepindex.tracking.run import make_tracker, mark_failed
    from deepindex.train.trainer import journal_path, run_name, train

    name = name or run_name(cfg)
    tracker = make_tracker(cfg, name, journal=journal_path(cfg, name), tracking_uri=tracking_uri,
                           parent_run_id=parent_run_id, tags=tags)
    try:
        outcome = train(cfg, name=name, evaluate_test=False, tracker=tracker, callbacks=callbacks)
    except BaseException as e:
        mark_failed(tracker, name, status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    outcome.test_metrics, run_id = finalize_run(tracker, outcome.checkpoint, outcome.latest_checkpoint, name,
                                                warn_unlearnt=warn_unlearnt)
    return outcome, run_id


def finalize_run(tracker: Tracker | None, best_checkpoint: str, latest_checkpoint: str | None, name: str,
                 status: str = "FINISHED", warn_unlearnt: bool = False) -> tuple[dict[str, Any], str | None]:
    """Score ``best_checkpoint`` on the test split and hand the report to tracking; ends the run with
    ``status`` (a Tune trial that ASHA stopped ends KILLED).  Returns (test metrics, run id).
    ``warn_unlearnt``: say so when the model scores hardly better than a guess (a training run; a
    sweep's trials are compared by the sweep, an audit's folds by the audit)."""
    import matplotlib.pyplot as plt

    from deepindex.checkpoint import checkpoint_file
    from deepindex.tracking.run import FinalReport, log_final
    from deepindex.tracking.tracker import numeric_metrics
    from deepindex.train.evaluation import ap_table, curve_figure, learnt_little_warning, score_checkpoint

    scored = score_checkpoint(best_checkpoint)
    warning = learnt_little_warning(scored) if warn_unlearnt else None
    if warning:
        log.warning("%s: %s", name, warning)
    if tracker is None:
        return scored.named(), None
    fig = curve_figure(scored)
    try:
        figure = "test_pr_curve.png" if scored.multilabel else "test_confusion_matrix.png"
        report = FinalReport(numeric_metrics(scored.metrics), str(checkpoint_file(best_checkpoint)),
                             texts={"test_ap.csv": ap_table(scored)}, figures={figure: fig})
        run_id = log_final(tracker, report, latest_checkpoint, name, status)
    finally:
        plt.close(fig)
    return scored.named(), run_id


def promote(run_id: str, name: str | None, tracking_uri: str | None = None, *, parent_run_id: str | None = None,
            alias: str = "champion", min_qbe_map: float | None = None) -> PromotionDecision:
    """Score the candidate run and the current champion on the candidate's test split; move the
    alias to the candidate only when it is strictly better, and, when a retrieval floor is set
    (``min_qbe_map``, else the candidate's ``tracking.promote_min_qbe_map``), when its query-by-example
    mAP@10 reaches it (:func:`retrieval_floor`).  The candidate is registered either way, under
    ``name``, else its own ``tracking.registered_model``."""
    from deepindex.checkpoint import read_checkpoint
    from deepindex.config import from_dict
    from deepindex.tracking import registry
    from deepindex.train.engine import primary_metric
    from deepindex.train.evaluation import learnt_little_finding, score_checkpoint

    with tempfile.TemporaryDirectory(prefix="deepindex-candidate-") as tmp:
        cand_dir = registry.download_run_checkpoint(run_id, tmp, tracking_uri)
        cand_cfg = from_dict(read_checkpoint(cand_dir)["config"])
        cand = score_checkpoint(cand_dir)
        metric, mode = primary_metric(cand.multilabel, prefix="test_")
        if cand.metrics[metric] != cand.metrics[metric]:  # NaN: no comparison holds; with no champion it was promoted
            raise ValueError(f"promote: run {run_id}'s model has no {metric} (NaN: its training diverged); "
                             "nothing registered")
        floor = cand_cfg.tracking.promote_min_qbe_map if min_qbe_map is None else min_qbe_map
        name = name or cand_cfg.tracking.registered_model
        qbe = retrieval_floor(cand_dir, cand_cfg, run_id, tracking_uri) if floor is not None else None
    cand_value = float(cand.metrics[metric])
    champ_version = registry.alias_version(name, alias, tracking_uri)
    version: str | None = None
    scores: dict[str, float] = {}  # champion version -> its score on the candidate's test split
    while True:
        champ, unloadable = None, None
        if champ_version is not None:
            # A champion that no longer loads (its artifacts deleted, a checkpoint of an older format) is no
            # champion: it blocked every promotion, and a sweep's summary, for good (found on review).
            # Only a lasting failure: an outage or a full disk (OSError, a server error) fails the promotion
            # as before, rather than hand the alias to a candidate no one compared (found on review).
            try:
                champ = registry.resolve_model(f"models:/{name}/{champ_version}", tracking_uri)
                try:
                    champ_state = read_checkpoint(champ.checkpoint_path)
                except ValueError as e:  # present, but no checkpoint this code reads (corrupt, another format)
                    raise registry.ModelGone(str(e)) from None
            except registry.ModelGone as e:
                champ, unloadable = None, str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("promotion: the %s of %s (version %s) cannot be loaded: %s", alias, name, champ_version,
                            unloadable)
        if champ is not None:  # before anything is registered: a model of another collection is refused whole
            _check_comparable(champ_state, cand, name, alias, champ_version)
        if version is None:
            version = registry.register_run(run_id, name, tracking_uri)
        champ_value: float | None = None
        if champ_version == version:
            champ_value = cand_value
            promoted, reason = False, f"version {version} is already the {alias}"
        elif champ is not None and champ_version is not None:
            if champ_version not in scores:
                scores[champ_version] = float(
                    score_checkpoint(champ.checkpoint_path, data=cand_cfg.data).metrics[metric])
            champ_value = scores[champ_version]
            promoted = cand_value > champ_value if mode == "max" else cand_value < champ_value
            reason = (f"{metric} {cand_value:.4f} {'beats' if promoted else 'does not beat'} the {alias} "
                      f"(version {champ_version}) {champ_value:.4f}")
        elif unloadable is not None:
            promoted, reason = True, (f"the {alias} (version {champ_version}) cannot be loaded ({unloadable}); "
                                      f"{metric} {cand_value:.4f}")
        else:
            promoted, reason = True, f"no {alias} yet; {metric} {cand_value:.4f}"
        # Another promotion may have moved the alias while this one scored (two sweeps ending together):
        # decide again against the new champion rather than overwrite it.  MLflow has no compare-and-set
        # for aliases; what is left is the one call between this read and set_alias below.
        now = registry.alias_version(name, alias, tracking_uri)
        if now == champ_version:
            break
        log.info("promotion: the %s of %s moved to version %s meanwhile; comparing with it", alias, name, now)
        champ_version = now
    unlearnt = learnt_little_finding(cand)
    if unlearnt:  # said, not refused: a score a little above a guess's can be real (a skewed split)
        reason += f"; the candidate {unlearnt}"
    if qbe is not None and floor is not None:
        below = qbe["map"] < floor
        reason += (f"; query-by-example mAP@10 {qbe['map']:.4f} ({qbe['descriptor']}/{qbe['metric']}, "
                   f"{qbe['gallery']}) is {'below' if below else 'at or above'} the floor "
                   f"tracking.promote_min_qbe_map={floor:g}")
        if below and promoted:
            promoted = False
            reason = "refused: " + reason
    if promoted:
        registry.set_alias(name, version, alias, tracking_uri)
    decision = PromotionDecision(promoted, name, version, metric, mode, cand_value, champ_value, champ_version,
                                 run_id, reason, qbe_floor=floor, qbe_map=None if qbe is None else qbe["map"])
    from deepindex.console import event

    event("promotion: %s -> %s (run %s)", reason,
          f"{name}@{alias} = version {version}" if promoted else f"{name}@{alias} unchanged", run_id)
    if champ_version == version:
        # Promoted earlier (`promote --run` twice, `promote --sweep` after the sweep promoted at its end): its
        # record, on the run, the sweep's run and the version, stays the one of that promotion, not "not promoted".
        return decision
    registry.log_decision(decision, parent_run_id, tracking_uri)
    return decision


class NotComparable(ValueError):
    """The candidate and the champion tag different concepts: nothing was registered."""


def _check_comparable(champion: dict[str, Any], cand: Scored, name: str, alias: str, version: str | None) -> None:
    """A candidate whose concepts (or label kind) are not the champion's is a model of another collection:
    no test split scores both, and serving it would change what the service tags.  One line on what to do."""
    def few(concepts: list[str]) -> str:
        return f"{len(concepts)} concepts ({', '.join(concepts[:4])}{', ...' if len(concepts) > 4 else ''})"

    theirs, ours = list(champion["concepts"]), list(cand.concepts)
    if theirs == ours and bool(champion["multilabel"]) == cand.multilabel:
        return
    kind = {True: "multi-label", False: "single-label"}
    raise NotComparable(
        f"model: the {alias} of {name} (version {version}) tags {few(theirs)}, {kind[bool(champion['multilabel'])]}; "
        f"this candidate {few(ours)}, {kind[cand.multilabel]}: a model of another collection. Register it under a "
        f"name of its own (--model NAME, or tracking.registered_model=NAME for a sweep) and serve it with "
        f"--model models:/NAME@champion")


def retrieval_floor(checkpoint: str | Path, cfg: Config, run_id: str | None = None,
                    tracking_uri: str | None = None, k: int = 10) -> dict[str, Any]:
    """The candidate's query-by-example mAP@k for the promotion floor: ``deepindex.index.evaluate`` on a
    held-out gallery (digit-scenes: ``tracking.promote_qbe_gallery`` scenes from the test glyphs; any
    other dataset: its own test split), every descriptor x metric, the best one counting.  With
    ``run_id`` the whole report is logged to that MLflow run (``retrieval.*``)."""
    from deepindex.checkpoint import load_model
    from deepindex.index.evaluate import evaluate_retrieval

    lm = load_model(checkpoint)
    coll = _held_out_gallery(lm, cfg)
    descriptors = [d for d in ("probs", "penultimate", "last_but_two") if d in lm.model.feature_points()]
    report = evaluate_retrieval(lm, coll, descriptors=descriptors, k=min(k, len(coll) - 1), seed=cfg.data.seed)
    best = report["qbe_best"]
    if run_id is not None:
        from deepindex.tracking.retrieval import log_retrieval_report

        log_retrieval_report(report, run_id, tracking_uri)
    return {"map": float(best[f"map_at_{report['k']}"]), "descriptor": best["descriptor"], "metric": best["metric"],
            "gallery": f"{len(coll)} held-out {coll.name} items", "report": report}


def _held_out_gallery(lm: LoadedModel, cfg: Config) -> Collection:
    import numpy as np

    from deepindex.data import build_splits, split_len
    from deepindex.index.collection import Collection, digit_gallery

    if cfg.data.dataset == "digit-scenes":
        return digit_gallery(cfg.tracking.promote_qbe_gallery, lm.image_size, cfg.data.max_digits, cfg.data.seed)
    # The candidate's own test split, back from normalised tensors to the [0, 1] images a collection holds.
    splits = build_splits(cfg.data, train_augment=False)
    n = min(split_len(splits.test), cfg.tracking.promote_qbe_gallery)
    xs, labels = [], []
    for i in range(n):
        x, t = splits.test[i][:2]
        xs.append(x.numpy())
        hot = np.flatnonzero(t.numpy()) if lm.multilabel else [int(t)]
        labels.append([splits.concepts[j] for j in hot])
    mean = np.asarray(splits.stats.mean, np.float32)[:, None, None]
    std = np.asarray(splits.stats.std, np.float32)[:, None, None]
    images = np.clip(np.stack(xs) * std + mean, 0, 1).astype(np.float32)  # (N, C, S, S)
    return Collection(f"{cfg.data.dataset}-test", [f"test-{i:06d}" for i in range(n)], splits.image_size,
                      splits.channels, images=images, labels=labels, meta={"split": "test"}, preset=splits.preset)


def check_model_name(model: str) -> None:
    """A registered model name MLflow takes, before anything is scored or registered: ``bad/name`` failed in MLflow
    (``RestException: INVALID_PARAMETER_VALUE``) after the scoring, and ``""`` fell back to the run's own name."""
    if not model.strip() or "/" in model or ":" in model:
        raise ValueError(f"--model: {model!r} is no registered model name: give a name that is not empty and holds "
                         "no '/' or ':' (or leave --model out for the run's own tracking.registered_model)")


def promote_main(*, sweep: str | None = None, run_id: str | None = None, model: str | None = None,
                 experiment: str = "deepindex", tracking_uri: str | None = None, show: bool = True,
                 min_qbe_map: float | None = None) -> dict[str, Any]:
    """Promote a sweep's best trial (or a given run): register it as ``model`` (default: the run's own
    ``tracking.registered_model``), move ``champion`` if better (and at or above the retrieval floor,
    when one is set); ``show`` prints the decision as JSON on stdout."""
    from deepindex.tracking.sweep import find_sweep_best

    if (sweep is None) == (run_id is None):
        raise ValueError("promote: give exactly one of --sweep NAME or --run RUN_ID")
    if min_qbe_map is not None and not 0.0 <= min_qbe_map <= 1.0:
        raise ValueError(f"--min-qbe-map: a mAP within [0, 1], got {min_qbe_map}")
    if model is not None:
        check_model_name(model)
    sync_pending(None, tracking_uri)  # a sweep that ended while MLflow was down has its best trial logged first
    parent = None
    if sweep is not None:
        run_id, parent = find_sweep_best(sweep, experiment, tracking_uri)
    assert run_id is not None
    out = asdict(promote(run_id, model, tracking_uri, parent_run_id=parent, min_qbe_map=min_qbe_map))
    if show:
        print(json.dumps(out, indent=2))
    return out


@dataclass
class SyncedRun:
    journal: str
    run_id: str | None
    epochs: int  # journaled epochs replayed into the run
    status: str  # "synced" | "waiting" (the run has not ended: left for its own end or a resume)


def sync_journals(storage: str | Path | None = None, tracking_uri: str | None = None) -> list[SyncedRun]:
    """Replay every ended run's pending tracking journal under ``storage`` into MLflow.

    A run that ended while its tracking server was down has its last epochs and its end (the
    best checkpoint, the final status) in ``tracking_journal.jsonl`` and stays RUNNING in MLflow.
    With the server back, this logs the journaled epochs at their steps, scores the best checkpoint
    again for the test metrics and reports, logs the checkpoint, and ends the run with the status
    it ended with; a run that never reached the server is created first.  A journal without an
    end is left alone (the run still goes on, or resumes later and finishes it).  Idempotent:
    each journal is set aside once replayed.
    """
    from deepindex.checkpoint import read_checkpoint
    from deepindex.config import from_dict
    from deepindex.tracking.run import get_or_create_experiment, run_tags
    from deepindex.tracking.tracker import mlflow_client, pending_journals, read_journal
    from deepindex.tracking.uri import reachable, resolve_tracking_uri

    root = Path(storage) if storage else Path(storage_path(load_config(None, [])))
    uri = tracking_uri or resolve_tracking_uri(warn=False)
    out: list[SyncedRun] = []
    journals = pending_journals(root)
    if not journals or uri is None or not reachable(uri):
        return [SyncedRun(str(j), None, 0, "waiting") for j in journals]
    client = mlflow_client(uri)
    for j in journals:
        records = read_journal(j)
        end = next((r for r in reversed(records) if r.get("kind") == "test"), None)
        if end is None:
            out.append(SyncedRun(str(j), None, 0, "waiting"))
            continue
        start = next((r for r in records if r.get("kind") == "start"), None)
        run_id = end.get("run_id") or next((r["run_id"] for r in records if r.get("run_id")), None)
        name = str(end.get("run_name") or j.parent.name)
        cfg = from_dict(start["config"] if start else read_checkpoint(end["checkpoint"])["config"])
        exp_id = get_or_create_experiment(client, cfg.tracking.experiment)
        # A sweep's trial is created under the sweep's parent run with its trial tags (named_run finds it
        # there if the sweep, run again, made it first): created on its own, it was an orphan, and the
        # sweep run again made a second run of the trial without its epochs (found on review).
        parent = end.get("parent_run_id") or next((r["parent_run_id"] for r in records if r.get("parent_run_id")),
                                                  None)
        own_tags: dict[str, str] = next((r["tags"] for r in records if r.get("parent_run_id") and r.get("tags")), {})
        tracker = Tracker(uri, exp_id, name, tags={**run_tags(cfg), **own_tags}, parent_run_id=parent,
                          offline_path=str(j))
        if run_id is None:  # the server was down from the start: the run is created now
            run_id = tracker.start(cfg, {}).get(RUN_ID_KEY)
        tracker.run_id = run_id
        epochs = sum(1 for r in records if r.get("kind") == "epoch")
        finalize_run(tracker, end["checkpoint"], None, name, status=str(end.get("status") or "FINISHED"))
        log.info("tracking: run %s (%s) synced from %s: %d journaled epochs", run_id, name, j, epochs)
        out.append(SyncedRun(str(j), run_id, epochs, "synced"))
    return out



def sync_pending(storage: str | Path | None, tracking_uri: str | None = None) -> None:
    """:func:`sync_journals` as every command that reaches the tracking server runs it first: a
    problem here is a warning, never the command's failure."""
    try:
        synced = [r for r in sync_journals(storage, tracking_uri) if r.status == "synced"]
    except Exception as e:  # noqa: BLE001 - housekeeping must not stop the command the user asked for
        log.warning("tracking: pending journals not synced (%s: %s); `deepindex tracking sync` retries",
                    type(e).__name__, e)
        return
    if synced:
        log.info("tracking: synced %d run(s) that ended while MLflow was down", len(synced))


def audit_main(config_path: str | None, overrides: list[str], name: str | None = None,
               tracking_uri: str | None = None) -> dict[str, Any]:
    """Validate, audit the train labels on the cluster, print the summary table and the results."""
    from deepindex.audit.run import check_config, run_audit

    cfg = load_config(config_path, overrides)
    check_config(cfg)  # before Ray starts: a bad audit config costs nothing
    out = run_audit(cfg, name=name, tracking_uri=tracking_uri)
    print(out.summary)
    result = {"name": out.name, "report": str(out.report), "flagged_labels": out.flagged,
              "oof_map_given": round(out.oof_map, 4), "detection": out.scores,
              "mlflow_parent_run_id": out.parent_run_id,
              "fold_runs": [f.run_id for f in out.folds], "wall_s": round(out.wall_s, 1),
              "train_on_cleaned_labels": f"data.label_filter={out.report}"}
    if out.meta.get("warning"):
        result["warning"] = out.meta["warning"]
    print(json.dumps(result, indent=2))
    return result
