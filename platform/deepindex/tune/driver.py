"""A sweep: ``tune.Tuner`` over a trial driver that runs one ``TorchTrainer`` per trial (Train V2).

Each trial is a Tune function trainable that runs the shared trainer
(``deepindex.train.trainer.train`` -> ``build_trainer``) with a rank-0 MLflow tracker (so
trial == training run == MLflow child run) and a ``TuneReportCallback`` that forwards every
epoch's report to Tune; the sweep driver then scores every finished or stopped trial on the
test split and logs its artifacts.  ASHA stops weak
trials on ``epochs_done``; random/grid search or Optuna (TPE) propose configs.  Tune does
not see the Train workers' resources (they are another placement group), so trial
concurrency is sized here from the cluster's free CPUs/GPUs.

The sweep is one MLflow parent run; trials nest under it (``mlflow.parentRunId``).  The
sweep's name and storage path identify it: running it again with the same name restores
it (``Tuner.restore``): finished trials are kept, unfinished ones resume from their Train
checkpoints and continue their MLflow runs, and the parent run id is read back from
``deepindex_sweep.json`` in the sweep folder.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from deepindex import restore
from deepindex.tracking.registry import PromotionDecision
from deepindex.tune.space import SweepSpec

if TYPE_CHECKING:
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.context import TrainRunContext
    from ray.tune import Callback, ResultGrid
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import SearchAlgorithm, Searcher

log = logging.getLogger(__name__)

EPOCHS_DONE = "epochs_done"  # the ASHA time attribute: survives trial restarts, unlike training_iteration
# Settings a restored sweep may change: they act after its trials, or say how many run at once (which
# Tune keeps as the sweep started: said, not refused).
SETTINGS_AFTER_TRIALS = ("promote", "name", "max_concurrent_trials", "trial_driver_cpus")


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    metric: float | None
    epochs_done: int
    stopped_early: bool
    status: str
    run_id: str | None = None
    error: str | None = None  # a failed trial's error, its last line

    @property
    def end_status(self) -> str:
        """How its MLflow run ends: ASHA ends a trial by killing its actor (KILLED), else FINISHED."""
        return "KILLED" if self.stopped_early else "FINISHED"


class SweepFailed(ValueError):
    """Every trial of a sweep failed: nothing to rank or promote."""


@dataclass
class SweepOutcome:
    name: str
    path: str
    metric: str
    mode: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    parent_run_id: str | None
    wall_s: float
    interrupted: bool
    promotion: PromotionDecision | None = None
    best_test: dict[str, Any] = field(default_factory=dict)
    experiment_id: str | None = None  # the MLflow experiment of the parent run

    @property
    def stopped_early(self) -> int:
        return sum(t.stopped_early for t in self.trials)

    @property
    def failed(self) -> bool:
        """It ended, and no trial ended without an error."""
        return bool(self.trials) and not self.interrupted and all(t.status == "ERROR" for t in self.trials)


# What Tune sees of an epoch whose primary metric is NaN (a model that diverged: train.engine scores it
# NaN): the worst score.  ASHA compares NaN as never below its cutoff, so a diverged trial was never
# stopped and held its slot to the end, and a first trial's NaN stayed "best" (found on review).
DIVERGED = "diverged"  # 1 on an epoch whose primary metric was replaced by train.engine.WORST


def tune_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """An epoch's report as Tune gets it: ``epochs_done`` (1-based, the ASHA time attribute) added, a
    non-finite primary metric replaced by its worst score, ``train.engine.WORST`` (the run's own MLflow
    metrics keep the NaN)."""
    from deepindex.train.engine import WORST

    out = dict(m, **{EPOCHS_DONE: int(m.get("epoch", 0)) + 1})
    for key, worst in WORST.items():
        v = out.get(key)
        if isinstance(v, (int, float)) and not math.isfinite(v):
            out[key], out[DIVERGED] = worst, 1  # marked: no trial's best (_best_reported)
    return out


def _report_callback() -> TuneReportCallback:
    """``TuneReportCallback`` with each report through :func:`tune_metrics`."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context: TrainRunContext, metrics: list[dict[str, Any]],
                         checkpoint: Checkpoint | None) -> None:
            super().after_report(run_context, [tune_metrics(m) for m in metrics], checkpoint)

    return EpochReportCallback()


def _trial_lines(spec: SweepSpec, metric: str) -> Callback:
    """A Tune callback (it runs in this driver) that puts one console line per ended or failed trial."""
    from deepindex.console import event, failure_lines

    def failed(trial: Any) -> str:
        done = int((trial.last_result or {}).get(EPOCHS_DONE, 0))
        return f"trial {trial.trial_id} failed after {done}/{spec.epochs_of(trial.config or {})} epochs"

    class TrialLines(failure_lines(failed, log)):  # type: ignore[misc]  # a class made at run time
        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            r = trial.last_result or {}
            done = int(r.get(EPOCHS_DONE, 0))
            epochs = spec.epochs_of(trial.config or {})
            value = r.get(metric)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
            event("trial %s: %d/%d epochs, %s %s%s", trial.trial_id, done, epochs, metric, shown,
                  ", stopped early" if done < epochs else "")

    return TrialLines()


def trial_driver(params: dict[str, Any], *, base: dict[str, Any], sweep: str, train_storage: str,
                 tracking_uri: str | None, parent_run_id: str | None) -> None:
    """One Tune trial: the base config + this trial's params, trained as a tracked Ray Train run.

    Test scoring and artifacts happen on the sweep driver afterwards (:func:`finalize_trials`):
    ASHA ends a trial by killing this function's actor, finished or not.
    """
    import ray.tune

    from deepindex.config import from_dict
    from deepindex.tracking.run import make_tracker
    from deepindex.tracking.sweep import SWEEP_TAG, TRIAL_TAG
    from deepindex.train.trainer import journal_path, train

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = from_dict(base).override({**params, "ray.storage_path": train_storage})
    tags = {SWEEP_TAG: sweep, TRIAL_TAG: trial_id}
    # The trial id is stable across Tuner.restore: the same Train run (and MLflow run) resumes.
    tracker = make_tracker(cfg, trial_id, journal=journal_path(cfg, trial_id), tracking_uri=tracking_uri,
                           parent_run_id=parent_run_id, tags=tags)
    train(cfg, name=trial_id, evaluate_test=False, tracker=tracker, callbacks=[_report_callback()])


def trial_checkpoints(train_storage: str | Path, trial_id: str, metric: str, mode: str
                      ) -> tuple[str | None, str | None]:
    """(best by ``metric``, latest by epoch) checkpoint folders of a trial's Train run."""
    from deepindex.checkpoint import FILENAME, read_checkpoint

    found: list[tuple[int, float | None, str]] = []  # (epoch, metric, folder)
    for f in sorted(Path(train_storage, trial_id).glob(f"checkpoint_*/{FILENAME}")):
        try:
            state = read_checkpoint(f)
        except (OSError, ValueError, RuntimeError):
            continue  # a checkpoint being written when the trial was killed
        found.append((state["epoch"], (state.get("metrics") or {}).get(metric), str(f.parent)))
    if not found:
        return None, None
    latest = max(found)[2]
    scored = [(epoch, value, folder) for epoch, value, folder in found if value is not None]
    if not scored:
        return latest, latest
    best = (max if mode == "max" else min)(scored, key=lambda c: c[1])[2]
    return best, latest


def trial_concurrency(spec: SweepSpec) -> int:
    """How many trials run at once: as many as the cluster's free CPUs/GPUs hold (at least 1; on a cluster
    of this machine that cannot free enough for one, a one-line error instead of a sweep that never
    starts), at most ``tune.max_concurrent_trials``.  On a cluster that grows (an autoscaler: KubeRay's),
    a ``tune.max_concurrent_trials`` given is taken as it is: its trials queue and the autoscaler adds
    nodes for them, where sizing from the minimum cluster ran a k8s sweep one trial at a time (found on
    review)."""
    from deepindex.cluster import fixed_size, wait_for_resources

    s, r = spec.settings, spec.base.ray
    per_trial = r.worker_group()
    per_trial["CPU"] += s.trial_driver_cpus
    free = wait_for_resources(per_trial, f"a trial of this sweep ({s.trial_driver_cpus:g} CPU for its driver, "
                                         f"{r.num_workers} worker(s) x {r.cpus_per_worker:g})")
    n = max(1, min(int(free.get(k, 0.0) // v) for k, v in per_trial.items()))
    if s.max_concurrent_trials:
        n = min(n, s.max_concurrent_trials) if fixed_size() else s.max_concurrent_trials
    return n


def _searcher(spec: SweepSpec, metric: str, mode: str, concurrency: int
              ) -> tuple[Searcher | SearchAlgorithm, int | None]:
    """(search algorithm, TuneConfig.max_concurrent_trials): Tune applies the latter only to a
    ``Searcher``; the random/grid generator takes its limit itself."""
    s = spec.settings
    # The defaults first (they count as one of num_samples), then what the search proposes.
    points = [spec.default_point()] if s.seed_defaults else None
    if s.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        from deepindex.console import library_imported

        library_imported()  # optuna's own console handler: its lines go to the log file

        return OptunaSearch(metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=s.seed),
                            points_to_evaluate=points), concurrency
    from ray.tune.search import BasicVariantGenerator

    # random and grid: `grid` entries expand, the other distributions are sampled
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrency, points_to_evaluate=points), None


def _scheduler(spec: SweepSpec) -> TrialScheduler:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.settings
    if s.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=EPOCHS_DONE, max_t=spec.max_epochs, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def _parent_run(spec: SweepSpec, name: str, sweep_dir: Path, tracking_uri: str | None) -> str | None:
    """The sweep's MLflow parent run: created once, found again on restore (its id is kept in
    ``deepindex_sweep.json`` in the sweep folder)."""
    from deepindex.tracking.run import run_tags
    from deepindex.tracking.sweep import open_parent_run

    if tracking_uri is None:
        return None
    recorded = restore.read_state(sweep_dir, restore.SWEEP_STATE)
    params: dict[str, Any] = {f"sweep.{k}": v for k, v in vars(spec.settings).items()}
    params.update({f"space.{k}": f"{d.kind} {d.args}" for k, d in spec.space.items()})
    rid = open_parent_run(
        tracking_uri, spec.base.tracking.experiment, name, recorded=recorded.get("parent_run_id"),
        tags=run_tags(spec.base, {"tune.space": spec.path}), params=params,
        texts={"space.yaml": yaml.safe_dump(spec.raw, sort_keys=False),
               "base_config.yaml": yaml.safe_dump(spec.base.to_dict(), sort_keys=False)})
    if rid != recorded.get("parent_run_id"):
        restore.update_state(sweep_dir, restore.SWEEP_STATE, parent_run_id=rid, tracking_uri=tracking_uri)
    return rid


def _definition(spec: SweepSpec) -> dict[str, Any]:
    """What makes the sweep what it is (:mod:`deepindex.restore`): its trials' base config, space and
    search.  Left out: what acts after the trials (promotion, where to find the sweep, concurrency)."""
    d = restore.config_definition(spec.base)
    d.update({f"space.{k}": [dist.kind, dist.args] for k, dist in spec.space.items()})
    d.update({f"tune.{k}": v for k, v in vars(spec.settings).items() if k not in SETTINGS_AFTER_TRIALS})
    return d


def run_sweep(spec: SweepSpec, *, name: str | None = None, tracking_uri: str | None = None,
              callbacks: list[Callback] | None = None, promote: bool | None = None) -> SweepOutcome:
    """Run (or restore) the sweep on the connected cluster; record the best trial; maybe promote it.
    One process at a time runs a sweep (:func:`deepindex.restore.running`)."""
    from deepindex.train.trainer import folder_storage

    storage = folder_storage(spec.base, "sweep")
    name = name or spec.settings.name or restore.fresh_name("sweep", storage)
    with restore.running("sweep", name, storage):
        return _run_sweep(spec, name, storage, tracking_uri, callbacks, promote)


def _run_sweep(spec: SweepSpec, name: str, storage: str, tracking_uri: str | None, callbacks: list[Callback] | None,
               promote: bool | None) -> SweepOutcome:
    from ray import tune

    from deepindex.console import event, tune_verbosity
    from deepindex.data.cache import share_cache
    from deepindex.tracking.uri import resolve_tracking_uri
    from deepindex.train.engine import primary_metric

    start = time.monotonic()
    concurrency = trial_concurrency(spec)  # before the sweep's state is written: a cluster too busy fails here
    base = share_cache(spec.base, storage)  # each trial's run is under <storage>/<name>/train: one decode for all
    sweep_dir = Path(storage) / name
    restoring = tune.Tuner.can_restore(str(sweep_dir))
    if restoring:  # before anything is written: a changed sweep is refused as it was
        restore.check_unchanged(name, sweep_dir, restore.SWEEP_STATE, _definition(spec))
    else:
        restore.record_definition(sweep_dir, restore.SWEEP_STATE, _definition(spec))
    metric, mode = primary_metric(spec.base.multilabel)
    uri = (tracking_uri or resolve_tracking_uri()) if spec.base.tracking.enabled else None
    parent = _parent_run(spec, name, sweep_dir, uri)

    trainable = tune.with_resources(
        functools.partial(trial_driver, base=base.to_dict(), sweep=name,
                          train_storage=str(sweep_dir / "train"), tracking_uri=uri, parent_run_id=parent),
        {"CPU": spec.settings.trial_driver_cpus})
    if restoring:
        # Tune restores the sweep's TuneConfig and searcher as saved: the trials run at the concurrency the
        # sweep started with, whatever this command asks (it was accepted and silently ignored; found on review).
        started_at = restore.read_state(sweep_dir, restore.SWEEP_STATE).get("concurrency")
        at = f", {started_at} at a time as it started" if started_at else ""
        event("sweep %s exists at %s: restoring it (finished trials kept, unfinished ones resumed%s)", name, sweep_dir,
              at)
        if started_at and started_at != concurrency:
            log.warning("sweep %s: restored at %s trials at a time, as it started (Tune keeps its saved settings); "
                        "%d fit the cluster now: another --name starts a sweep that uses them", name, started_at,
                        concurrency)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        restore.update_state(sweep_dir, restore.SWEEP_STATE, concurrency=concurrency)
        s = spec.settings
        event("sweep %s: %d trials (%s search%s, %s scheduler), %d at a time, up to %d epochs each", name,
              s.num_samples, s.search, ", the defaults first" if s.seed_defaults else "", s.scheduler, concurrency,
              spec.max_epochs)
        search_alg, max_concurrent = _searcher(spec, metric, mode, concurrency)
        tuner = tune.Tuner(
            trainable,
            param_space=spec.param_space(),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=search_alg,
                                        scheduler=_scheduler(spec), num_samples=spec.settings.num_samples,
                                        max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      callbacks=[*(callbacks or []), _trial_lines(spec, metric)],
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      # Tune's status tables and per-trial boxes: in the log file (-v prints them)
                                      verbose=tune_verbosity()),
        )
    grid = tuner.fit()
    outcome = _summarise(grid, spec, name, str(sweep_dir), metric, mode, parent, time.monotonic() - start)
    _record(outcome, uri, spec.max_epochs)
    best = outcome.best
    event("sweep %s: %d trials in %.0fs, %d stopped early; best %s", name, len(outcome.trials), outcome.wall_s,
          outcome.stopped_early, "none" if best is None or best.metric is None
          else f"{best.trial_id}: {metric} {best.metric:.4f} after {best.epochs_done} epochs")
    if outcome.interrupted:
        log.warning("sweep %s was interrupted; run it again with the same name to resume it", name)
        return outcome
    if outcome.failed:
        first = outcome.trials[0]
        raise SweepFailed(f"sweep {name}: all {len(outcome.trials)} trials failed; trial {first.trial_id}: "
                          f"{first.error} (the log file has the tracebacks)")
    do_promote = spec.settings.promote if promote is None else promote
    if outcome.best is not None and outcome.best.run_id and uri:
        from deepindex.workflows import promote as promote_run

        if do_promote:
            outcome.promotion = promote_run(outcome.best.run_id, spec.base.tracking.registered_model, uri,
                                            parent_run_id=parent)
    return outcome


def _summarise(grid: ResultGrid, spec: SweepSpec, name: str, path: str, metric: str, mode: str, parent: str | None,
               wall_s: float) -> SweepOutcome:
    from deepindex.console import error_line

    trials_state = _saved_statuses(path)
    summaries = []
    for r in grid:  # type: ignore[attr-defined]  # ResultGrid iterates through __getitem__, which mypy does not model
        m = r.metrics or {}
        tid = m.get("trial_id") or (Path(r.path).name if r.path else "?")
        status = trials_state.get(tid, "ERROR" if r.error else "TERMINATED")
        done = int(m.get(EPOCHS_DONE, 0))
        params = {k: v for k, v in (r.config or {}).items()}
        value = _best_reported(r, metric, mode)
        stopped_early = status == "TERMINATED" and r.error is None and done < spec.epochs_of(params)
        summaries.append(TrialSummary(tid, params, value, done,
                                      stopped_early=stopped_early, status=status,
                                      error=error_line(r.error) if r.error is not None else None))
    interrupted = any(s.status in ("PENDING", "RUNNING", "PAUSED") for s in summaries)
    scored = [(s.metric, s) for s in summaries if s.metric is not None and s.status != "ERROR"]
    # The best trial by its best epoch: that epoch's checkpoint is what its run logs and a promotion
    # registers (finalize_run, trial_checkpoints).  Ranked by the last epoch, a trial that peaked and
    # then slipped lost to one whose promoted checkpoint was worse (found on review).
    best = None
    if scored:
        best = (max if mode == "max" else min)(scored, key=lambda m: m[0])[1]
    return SweepOutcome(name, path, metric, mode, summaries, best, parent, wall_s, interrupted)


def _best_reported(result: Any, metric: str, mode: str) -> float | None:
    """A trial's best reported ``metric`` over its epochs (its last one when Tune kept no history)."""
    # A diverged epoch is no score: Tune saw it as the worst (tune_metrics) so ASHA stops the trial, but a
    # trial of nothing else is no sweep's best (found on review: all trials diverged, one was "best" at 0.0).
    df = getattr(result, "metrics_dataframe", None)
    if df is not None and metric in df:
        rows = df[df[DIVERGED].fillna(0) != 1] if DIVERGED in df else df
        col = rows[metric].dropna()
        if len(col):
            return float(col.max() if mode == "max" else col.min())
    m = result.metrics or {}
    value = m.get(metric)
    if value is None or m.get(DIVERGED) == 1 or not math.isfinite(float(value)):
        return None
    return float(value)


def _saved_statuses(path: str) -> dict[str, str]:
    """Trial statuses as Tune last saved them.  After an interrupt (SIGINT/SIGUSR1) Tune marks
    the trials it stops TERMINATED in memory, but saves them RUNNING/PENDING, which is what
    ``Tuner.restore`` resumes: the saved state tells an interrupted sweep from a finished one."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(path).trials}
    except Exception as e:  # noqa: BLE001 - no saved state: trust the results
        log.debug("no saved experiment state at %s (%s)", path, e)
        return {}


def _trial_status(t: TrialSummary) -> str:
    if t.stopped_early:
        return "stopped early (ASHA)"
    return "finished" if t.status == "TERMINATED" else t.status.lower()


def _journal(train_storage: Path, trial_id: str) -> str:
    """A trial's tracking journal: beside its checkpoints, where its worker journals its epochs."""
    from deepindex.tracking.tracker import JOURNAL

    return str(train_storage / trial_id / JOURNAL)


def _journal_ends(outcome: SweepOutcome, uri: str, train_storage: Path) -> None:
    """The tracking server is down as the sweep ends: each ended trial's test metrics and status go
    to its journal (beside its epochs, journaled by its worker), for ``deepindex tracking sync`` (or
    the next command) to log into its run; the sweep's summary and promotion wait for the sweep to
    be run again under its name."""
    from deepindex.tracking.sweep import SWEEP_TAG, TRIAL_TAG
    from deepindex.tracking.tracker import Tracker
    from deepindex.workflows import finalize_run

    for t in outcome.trials:
        best, latest = trial_checkpoints(train_storage, t.trial_id, outcome.metric, outcome.mode)
        if t.status != "TERMINATED" or best is None:
            continue
        journal = _journal(train_storage, t.trial_id)
        # With the parent and the trial's tags, so that sync makes a trial that never reached the server a
        # child of the sweep (tracker.journal writes them).
        tracker = Tracker(uri, "", t.trial_id, tags={SWEEP_TAG: outcome.name, TRIAL_TAG: t.trial_id},
                          parent_run_id=outcome.parent_run_id, offline_path=journal, disabled=True)
        finalize_run(tracker, best, latest, t.trial_id, status=t.end_status)
    log.warning("MLflow server %s is unreachable at the end of sweep %s: its trials' results are journaled under "
                "%s; `deepindex tracking sync` logs them once it is back, and running the sweep again under its "
                "name records its best trial and promotes it", uri, outcome.name, train_storage)


def _late_child_run(outcome: SweepOutcome, uri: str, t: TrialSummary, train_storage: Path) -> None:
    """A trial that started while the tracking server was unreachable trained untracked (its epochs in
    its journal) and has no run under the sweep: it was left out of the sweep's record, never ended,
    and as the best trial not promoted (found on review).  Its run is created now under the sweep's
    parent run, with the trial's tags, and finalized: the journaled epochs, the test metrics, the
    checkpoint."""
    from deepindex.checkpoint import read_checkpoint
    from deepindex.config import from_dict
    from deepindex.tracking.run import make_tracker
    from deepindex.tracking.sweep import SWEEP_TAG, TRIAL_TAG
    from deepindex.workflows import finalize_run

    best, latest = trial_checkpoints(train_storage, t.trial_id, outcome.metric, outcome.mode)
    if t.status != "TERMINATED" or best is None:
        return
    cfg = from_dict(read_checkpoint(best)["config"])
    tracker = make_tracker(cfg, t.trial_id, journal=_journal(train_storage, t.trial_id), tracking_uri=uri,
                           parent_run_id=outcome.parent_run_id, tags={SWEEP_TAG: outcome.name, TRIAL_TAG: t.trial_id})
    if tracker is None or tracker.disabled:
        return
    tracker.start(cfg, {})
    if tracker.run_id is None:
        return
    t.run_id = tracker.run_id
    finalize_run(tracker, best, latest, t.trial_id, status=t.end_status)


def _record(outcome: SweepOutcome, uri: str | None, max_epochs: int) -> None:
    """Child run ids, early-stopped child runs closed as KILLED, the best trial on the parent run."""
    if uri is None or outcome.parent_run_id is None:
        return
    from deepindex.tracking import sweep as tracked
    from deepindex.tracking.tracker import Tracker
    from deepindex.tracking.uri import reachable
    from deepindex.workflows import finalize_run

    train_storage = Path(outcome.path) / "train"
    if not reachable(uri):
        _journal_ends(outcome, uri, train_storage)
        return
    by_trial = tracked.child_runs(outcome.parent_run_id, uri)
    exp_id = outcome.experiment_id = tracked.experiment_of(outcome.parent_run_id, uri)
    for t in outcome.trials:
        child = by_trial.get(t.trial_id)
        if child is None:  # started while the server was unreachable: its run is made now, under the sweep
            _late_child_run(outcome, uri, t, train_storage)
            continue
        t.run_id = child.run_id
        tracked.set_tag(t.run_id, "tune.status", _trial_status(t), uri)
        if child.status != "RUNNING" or t.status not in ("TERMINATED", "ERROR"):
            continue  # finalized already (a restored sweep), or still to be resumed
        best, latest = trial_checkpoints(train_storage, t.trial_id, outcome.metric, outcome.mode)
        if t.status == "ERROR" or best is None:
            tracked.end_run(t.run_id, "FAILED", uri)
            continue
        # ASHA ends a trial by killing its actor: the test split, artifacts and the checkpoint
        # of every trial are logged here, and a stopped trial's run ends KILLED.
        journal = _journal(train_storage, t.trial_id)  # should the server go down again meanwhile
        tracker = Tracker(uri, exp_id, t.trial_id, run_id=t.run_id, offline_path=journal)
        finalize_run(tracker, best, latest, t.trial_id, status=t.end_status)
    metrics = {"trials": len(outcome.trials), "trials_stopped_early": outcome.stopped_early,
               "sweep_wall_s": outcome.wall_s}
    tags: dict[str, str] = {}
    best_params = None
    if outcome.best is not None and outcome.best.metric is not None:
        metrics[f"best_{outcome.metric}"] = outcome.best.metric
        tags["best_trial_id"] = outcome.best.trial_id
        if outcome.best.run_id:
            tags["best_run_id"] = outcome.best.run_id
        if not outcome.interrupted:
            best_params = outcome.best.params
    rows = [tracked.TrialRow(t.trial_id, t.run_id, t.metric, t.epochs_done, _trial_status(t)) for t in outcome.trials]
    tracked.describe_sweep(outcome.parent_run_id, uri, name=outcome.name, metric=outcome.metric, mode=outcome.mode,
                           max_epochs=max_epochs, rows=rows,
                           best_trial=outcome.best.trial_id if outcome.best is not None else None)
    tracked.record_summary(outcome.parent_run_id, uri, metrics=metrics, tags=tags, best_params=best_params,
                           trials_json=json.dumps([vars(t) for t in outcome.trials], indent=2, default=str),
                           status=None if outcome.interrupted else "FAILED" if outcome.failed else "FINISHED")
