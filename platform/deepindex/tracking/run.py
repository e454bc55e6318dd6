"""Driver side of a tracked training run: build the tracker, train, then test metrics + artifacts.

``tracked_train`` is what ``deepindex train`` and every Tune trial call.  After Ray Train
returns, the best checkpoint (by the validation metric) is scored on the test split here,
and the run gets: ``test_*`` metrics, ``test_ap.csv`` (per-concept AP), ``test_pr_curve.png``
(multi-label) or ``test_confusion_matrix.png`` (single-label), and ``checkpoint/checkpoint.pt``
(the DESIGN.md checkpoint contract, which the registry registers).
"""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from deepindex.config import Config
from deepindex.tracking.tracker import (RUN_ID_KEY, TAG_TRAIN_NAME, Tracker, numeric_metrics, quiet_http_retries,
                                       replay_journal)

log = logging.getLogger(__name__)

_warned_unreachable: set[str] = set()


def git_commit() -> str | None:
    """The checkout's commit (``DEEPINDEX_GIT_COMMIT`` where a job ships no .git folder)."""
    if os.environ.get("DEEPINDEX_GIT_COMMIT"):
        return os.environ["DEEPINDEX_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def ray_job_tags() -> dict[str, str]:
    tags = {}
    try:
        import ray

        if ray.is_initialized():
            tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - a tag is not worth failing a run
        pass
    if os.environ.get("RAY_JOB_SUBMISSION_ID"):  # set by `ray job submit`
        tags["ray.submission_id"] = os.environ["RAY_JOB_SUBMISSION_ID"]
    return tags


def run_tags(cfg: Config, extra: dict[str, str] | None = None) -> dict[str, str]:
    tags = {"dataset": cfg.data.dataset, "task": "multi-label" if cfg.multilabel else "single-label",
            "model": cfg.model.name, **ray_job_tags()}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    tags.update(extra or {})
    return tags


def get_or_create_experiment(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by a concurrent trial or job
        return client.get_experiment_by_name(name).experiment_id


def journal_path(cfg: Config, name: str) -> str | None:
    from deepindex.train.trainer import storage_path

    storage = storage_path(cfg)
    return None if "://" in storage else str(Path(storage) / name / "tracking_journal.jsonl")


def make_tracker(cfg: Config, name: str, *, tracking_uri: str | None = None, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> Tracker | None:
    """A tracker for one training run, or None when tracking is off (config or no server).

    An unreachable server gives one warning and a disabled tracker: the epochs then go to
    the journal next to the checkpoints instead of MLflow.
    """
    from mlflow.tracking import MlflowClient

    from deepindex.tracking.uri import reachable, resolve_tracking_uri

    if not cfg.tracking.enabled:
        return None
    uri = tracking_uri or resolve_tracking_uri()
    if uri is None:
        return None
    offline = journal_path(cfg, name)
    run_name = cfg.tracking.run_name or name
    if not reachable(uri):
        if uri not in _warned_unreachable:
            _warned_unreachable.add(uri)
            log.warning("MLflow server %s is unreachable: training goes on untracked; epochs are journaled in %s",
                        uri, offline)
        return Tracker(uri, "", run_name, offline_path=offline, disabled=True)
    quiet_http_retries()
    exp_id = get_or_create_experiment(MlflowClient(uri), cfg.tracking.experiment)
    return Tracker(uri, exp_id, run_name, tags=run_tags(cfg, tags), parent_run_id=parent_run_id,
                   offline_path=offline)


def run_id_of(tracker: Tracker, checkpoint: str | None, name: str) -> str | None:
    """The MLflow run id the worker used: from the checkpoint's ``extra``, else by the name tag."""
    from deepindex.checkpoint import read_checkpoint

    if checkpoint:
        try:
            rid = (read_checkpoint(checkpoint).get("extra") or {}).get(RUN_ID_KEY)
            if rid:
                return rid
        except (FileNotFoundError, ValueError):
            pass
    if tracker.disabled or not tracker.experiment_id:
        return None
    try:
        runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TAG_TRAIN_NAME}` = '{name}'",
                                          max_results=1)
        return runs[0].info.run_id if runs else None
    except Exception:  # noqa: BLE001
        return None


def finalize(tracker: Tracker | None, best_checkpoint: str, latest_checkpoint: str | None, name: str,
             extra_metrics: dict[str, float] | None = None, status: str = "FINISHED") -> tuple[dict[str, Any], str | None]:
    """Score ``best_checkpoint`` on the test split; log metrics, artifacts, checkpoint; end the run
    with ``status`` (a Tune trial that ASHA stopped ends KILLED)."""
    from deepindex.tracking.artifacts import ap_table, curve_figure, score_checkpoint

    scored = score_checkpoint(best_checkpoint)
    if tracker is None:
        return scored.metrics, None
    run_id = run_id_of(tracker, latest_checkpoint or best_checkpoint, name)
    if run_id is None or tracker.disabled and not _server_back(tracker):
        tracker.journal("test", metrics=numeric_metrics(scored.metrics), checkpoint=best_checkpoint)
        return scored.metrics, run_id
    tracker.run_id, tracker.disabled = run_id, False
    try:
        if tracker.offline_path:  # epochs journaled while the server was down go back into the run
            replay_journal(tracker.offline_path, tracker.tracking_uri, run_id)
        tracker.log_metrics({**numeric_metrics(scored.metrics), **(extra_metrics or {})})
        client = tracker.client
        client.log_text(run_id, ap_table(scored), "test_ap.csv")
        fig = curve_figure(scored)
        client.log_figure(run_id, fig, "test_pr_curve.png" if scored.multilabel else "test_confusion_matrix.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
        client.log_artifact(run_id, checkpoint_file(best_checkpoint), "checkpoint")
        client.set_tag(run_id, "best_checkpoint", str(best_checkpoint))
        client.set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001 - the training result stands without its logs
        log.warning("MLflow: final logging of run %s failed (%s: %s); test metrics: %s", run_id, type(e).__name__, e,
                    numeric_metrics(scored.metrics))
        tracker.journal("test", metrics=numeric_metrics(scored.metrics), checkpoint=best_checkpoint)
    return scored.metrics, run_id


def _server_back(tracker: Tracker) -> bool:
    from deepindex.tracking.uri import reachable

    return bool(tracker.experiment_id) and reachable(tracker.tracking_uri)


def checkpoint_file(path: str) -> str:
    """``checkpoint.pt`` of a checkpoint folder (Ray's folders may hold more files) or the file itself."""
    from deepindex.checkpoint import FILENAME

    p = Path(path)
    return str(p / FILENAME if p.is_dir() else p)


def mark_failed(tracker: Tracker | None, name: str, checkpoint: str | None = None) -> None:
    if tracker is None or tracker.disabled:
        return
    rid = run_id_of(tracker, checkpoint, name)
    if rid:
        try:
            tracker.client.set_terminated(rid, "FAILED")
        except Exception:  # noqa: BLE001
            pass


def tracked_train(cfg: Config, *, name: str | None = None, callbacks: list | None = None,
                  parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                  tracking_uri: str | None = None):
    """Train on the connected cluster with MLflow tracking; returns (TrainOutcome, MLflow run id)."""
    from deepindex.train.trainer import run_name, train

    name = name or run_name(cfg)
    tracker = make_tracker(cfg, name, tracking_uri=tracking_uri, parent_run_id=parent_run_id, tags=tags)
    try:
        outcome = train(cfg, name=name, evaluate_test=False, tracker=tracker, callbacks=callbacks)
    except BaseException:
        mark_failed(tracker, name)
        raise
    outcome.test_metrics, run_id = finalize(tracker, outcome.checkpoint, outcome.latest_checkpoint, name)
    return outcome, run_id
