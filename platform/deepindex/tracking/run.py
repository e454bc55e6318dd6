"""One training run in MLflow, driver side: the tracker rank 0 logs through, and the final logging.

:func:`make_tracker` builds the :class:`~deepindex.tracking.tracker.Tracker` a run's rank 0 uses;
:func:`log_final` logs what the finished run is handed (``deepindex.workflows`` scores the best
checkpoint): ``test_*`` metrics, ``test_ap.csv``, the PR-curve or confusion-matrix figure, and
``checkpoint/checkpoint.pt`` (the DESIGN.md checkpoint contract, which the registry registers).
:func:`open_parent_run` makes the parent run a sweep or an audit nests its training runs under.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepindex.config import Config
from deepindex.tracking.tracker import RUN_ID_KEY, Tracker, mlflow_client, param_value, replay_journal

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

KIND_TAG = "deepindex.kind"  # what a run is: a sweep, an audit, one of an audit's folds

_warned_unreachable: set[str] = set()


def server_reachable(uri: str, untracked: str) -> bool:
    """Whether the tracking server ``uri`` answers; when it does not, one warning per server and
    process saying what goes on without it (``untracked``)."""
    from deepindex.tracking.uri import reachable

    if reachable(uri):
        return True
    if uri not in _warned_unreachable:
        _warned_unreachable.add(uri)
        log.warning("MLflow server %s is unreachable: %s", uri, untracked)
    return False


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


# MLflow 3's UI opens an experiment on what its kind says: the GenAI overview (traces, token
# usage) unless the experiment is tagged as model training, where it opens on the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id; one deepindex creates (or finds without a kind) is tagged as model training."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by a concurrent trial or job
            exp = client.get_experiment_by_name(name)
            if exp is None:  # not a race: creating it failed for another reason, which is the error to report
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before deepindex tagged its experiments; a user's choice stays
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def make_tracker(cfg: Config, name: str, *, journal: str | None = None, tracking_uri: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> Tracker | None:
    """A tracker for one training run, or None when tracking is off (config or no server).

    An unreachable server gives one warning and a disabled tracker: the epochs then go to
    ``journal`` (a JSON-lines file next to the checkpoints) instead of MLflow.
    """
    from deepindex.tracking.uri import resolve_tracking_uri

    if not cfg.tracking.enabled:
        return None
    uri = tracking_uri or resolve_tracking_uri()
    if uri is None:
        return None
    run_name = cfg.tracking.run_name or name
    if not server_reachable(uri, f"training goes on untracked; epochs are journaled in {journal}"):
        return Tracker(uri, "", run_name, offline_path=journal, disabled=True)
    exp_id = get_or_create_experiment(mlflow_client(uri), cfg.tracking.experiment)
    return Tracker(uri, exp_id, run_name, tags=run_tags(cfg, tags), parent_run_id=parent_run_id,
                   offline_path=journal, train_name=name)


def open_parent_run(tracking_uri: str, experiment: str, name: str, *, recorded: str | None, tags: dict[str, str],
                    params: dict[str, Any], texts: dict[str, str]) -> str:
    """A parent run (a sweep's, an audit's): ``recorded`` (the id a restored one saved) if this
    server has it, set RUNNING again; else a new run named ``name`` with ``tags``, ``params`` and
    text artifacts.  Its children are training runs whose tracker carries its id
    (:func:`make_tracker` ``parent_run_id``)."""
    from mlflow.entities import Param

    client = mlflow_client(tracking_uri)
    if recorded:
        try:
            client.get_run(recorded)
            client.update_run(recorded, status="RUNNING")
            return recorded
        except Exception:  # noqa: BLE001 - another server: start a new parent
            log.warning("%s: its parent run %s is not on %s; creating a new one", name, recorded, tracking_uri)
    exp_id = get_or_create_experiment(client, experiment)
    rid = client.create_run(exp_id, tags=tags, run_name=name).info.run_id
    batch = [Param(k, param_value(v)) for k, v in params.items()]
    for i in range(0, len(batch), 100):  # at most 100 params per call
        client.log_batch(rid, params=batch[i:i + 100])
    for artifact, text in texts.items():
        client.log_text(rid, text, artifact)
    return rid


def run_id_of(tracker: Tracker, checkpoint: str | None, name: str) -> str | None:
    """The MLflow run id the worker used: from the checkpoint's ``extra``, else by the name tag."""
    from deepindex.checkpoint import read_checkpoint

    if checkpoint:
        try:
            rid = (read_checkpoint(checkpoint).get("extra") or {}).get(RUN_ID_KEY)
            if rid:
                return str(rid)
        except (FileNotFoundError, ValueError):
            pass
    if tracker.disabled or not tracker.experiment_id:
        return None
    try:
        return tracker.named_run(name)
    except Exception:  # noqa: BLE001 - no run found is the answer when the server cannot say
        return None


@dataclass
class FinalReport:
    """What a finished run hands to tracking: test metrics, text and figure artifacts, the checkpoint."""

    metrics: dict[str, float]
    checkpoint: str  # the checkpoint.pt file logged as the run's model (artifact path checkpoint/)
    texts: dict[str, str] = field(default_factory=dict)  # artifact name -> content
    figures: dict[str, Figure] = field(default_factory=dict)  # artifact name -> matplotlib figure


def log_final(tracker: Tracker, report: FinalReport, latest_checkpoint: str | None, name: str,
              status: str = "FINISHED") -> str | None:
    """Log a finished run's report and end the run with ``status`` (a Tune trial that ASHA stopped
    ends KILLED); returns the run id.  When the server cannot be reached the test metrics are
    journaled instead, for ``deepindex tracking sync`` to replay later."""
    run_id = tracker.run_id or run_id_of(tracker, latest_checkpoint or report.checkpoint, name)
    # One probe first: a server that died mid-run (rank 0 journaled the rest) costs no retries here.
    if run_id is None or not _server_back(tracker):
        # The end of the run, for `deepindex tracking sync` (or the next command) to log later.
        tracker.journal("test", run_id=run_id, metrics=report.metrics, checkpoint=report.checkpoint, status=status)
        if tracker.offline_path:
            log.warning("MLflow server %s is unreachable at the end of run %s: its results are journaled in %s; "
                        "`deepindex tracking sync` (or the next deepindex command) logs them once it is back",
                        tracker.tracking_uri, name, tracker.offline_path)
        return run_id
    tracker.run_id, tracker.disabled = run_id, False
    try:
        if tracker.offline_path:  # epochs journaled while the server was down go back into the run
            replay_journal(tracker.offline_path, tracker.tracking_uri, run_id)
        tracker.log_metrics(report.metrics)
        client = tracker.client
        for artifact, text in report.texts.items():
            client.log_text(run_id, text, artifact)
        for artifact, fig in report.figures.items():
            client.log_figure(run_id, fig, artifact)
        client.log_artifact(run_id, report.checkpoint, "checkpoint")
        client.set_tag(run_id, "best_checkpoint", str(Path(report.checkpoint).parent))
        client.set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001 - the training result stands without its logs
        log.warning("MLflow: final logging of run %s failed (%s: %s); test metrics: %s", run_id, type(e).__name__, e,
                    report.metrics)
        tracker.journal("test", run_id=run_id, metrics=report.metrics, checkpoint=report.checkpoint, status=status)
    return run_id


def _server_back(tracker: Tracker) -> bool:
    from deepindex.tracking.uri import reachable

    return bool(tracker.experiment_id) and reachable(tracker.tracking_uri)


def mark_failed(tracker: Tracker | None, name: str, checkpoint: str | None = None, status: str = "FAILED") -> None:
    """End the run's MLflow run with ``status`` (``KILLED``: interrupted by the user)."""
    if tracker is None or tracker.disabled:
        return
    rid = run_id_of(tracker, checkpoint, name)
    if rid:
        with contextlib.suppress(Exception):  # the failure itself is what the caller reports
            tracker.client.set_terminated(rid, status)
