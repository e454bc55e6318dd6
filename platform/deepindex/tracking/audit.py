"""A label audit in MLflow: one parent run (``deepindex.kind=audit``), one child run per fold.

The folds' child runs are ordinary training runs (``deepindex.workflows.tracked_train`` with
the parent's id and :func:`fold_tags`).  This module holds the rest, the way
:mod:`~deepindex.tracking.sweep` does for a sweep: the parent run (created once, continued when
the audit is restored), the node a fold trained on, the audit's numbers and report on the
parent, and reading a report back (``data.label_filter=runs:/<parent run id>``).  The audit
(``deepindex.audit.run``) decides what to record; nothing here knows about folds' training.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
from pathlib import Path

from deepindex.config import Config
from deepindex.tracking.run import KIND_TAG, open_parent_run, run_tags, server_reachable
from deepindex.tracking.tracker import Tracker, mlflow_client

log = logging.getLogger(__name__)

AUDIT_KIND = "audit"
FOLD_KIND = "audit-fold"
NAME_TAG = "audit.name"
FOLD_TAG = "audit.fold"
NODE_TAG = "audit.worker_node_id"
REPORT_ARTIFACTS = "audit"  # the report folder's artifact path on the parent run
_DOWNLOADED = ".downloaded"  # written last into a downloaded report's folder
# The config sections an audit's outcome depends on: the parent's params (its folds log all).
PARAM_SECTIONS = ("audit.", "data.", "model.", "train.")
_UNSAFE = re.compile(r"[^\w\-./ ]")  # MLflow names: alphanumerics, _ - . / and spaces


def fold_tags(audit: str, fold: int) -> dict[str, str]:
    """The tags of fold ``fold``'s training run (its tracker makes it a child of the parent)."""
    return {KIND_TAG: FOLD_KIND, NAME_TAG: audit, FOLD_TAG: str(fold)}


def open_audit_run(cfg: Config, name: str, tracking_uri: str | None, *, recorded: str | None) -> str | None:
    """The audit's parent run: ``recorded`` (a restored audit's) if the server has it, else a new
    one holding the audit's settings.  None when tracking is off or the server does not answer
    (one warning: the audit then runs untracked, its report stays on the storage path)."""
    if tracking_uri is None or not server_reachable(
            tracking_uri, f"the audit {name} runs untracked; its report stays on the Ray storage path"):
        return None
    import yaml

    params = {k: v for k, v in sorted(cfg.flat().items()) if k.startswith(PARAM_SECTIONS)}
    return open_parent_run(tracking_uri, cfg.tracking.experiment, name, recorded=recorded,
                           tags=run_tags(cfg, {KIND_TAG: AUDIT_KIND, NAME_TAG: name}), params=params,
                           texts={"config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False)})


def tag_fold_node(run_id: str, node_id: str, tracking_uri: str) -> None:
    """The Ray node a fold's Train worker ran on, on the fold's run (best effort: a tag is not
    worth failing a fold)."""
    try:
        mlflow_client(tracking_uri).set_tag(run_id, NODE_TAG, node_id)
    except Exception as e:  # noqa: BLE001 - any tracking failure leaves the fold's result alone
        log.warning("MLflow: run %s not tagged with its node (%s: %s)", run_id, type(e).__name__, e)


def metric_name(key: str) -> str:
    """``key`` as MLflow accepts it (a concept name may hold anything)."""
    return _UNSAFE.sub("_", key)


def log_audit(run_id: str, tracking_uri: str, *, metrics: dict[str, float], report: str | Path) -> bool:
    """The audit's numbers and its report folder (artifacts ``audit/``) on the parent run, which
    then ends FINISHED; True when all three are logged.

    A server that fails here stops nothing, as a training's does not: the audit is done and its report is on
    the storage path.  One warning names the server and what the run did not get, and the same audit run
    again (its name and storage path: the folds are kept, nothing trains) logs them on the same run.  The
    tracking journal (``deepindex tracking sync``) replays training runs, whose end is a checkpoint to score,
    not an audit's; so there is nothing to journal here."""
    missing = ["its numbers", f"its report (artifacts {REPORT_ARTIFACTS}/)", "its end (it stays RUNNING)"]
    try:
        parent = Tracker(tracking_uri, "", AUDIT_KIND, run_id=run_id)  # its client and batched metric logging
        parent.log_metrics({metric_name(k): float(v) for k, v in metrics.items()})
        missing.pop(0)
        parent.client.log_artifacts(run_id, str(report), REPORT_ARTIFACTS)
        missing.pop(0)
        parent.client.set_terminated(run_id, "FINISHED")
        return True
    except Exception as e:  # noqa: BLE001 - any tracking failure leaves the finished audit alone
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        log.warning("MLflow server %s failed while the audit's results were logged (%s): its run %s did not get %s. "
                    "The report stays at %s; run the audit again under the same name once the server answers, "
                    "to log them", tracking_uri, why, run_id, _listed(missing), report)
        return False


def _listed(things: list[str]) -> str:
    return things[0] if len(things) == 1 else f"{', '.join(things[:-1])} or {things[-1]}"


def end_audit_run(run_id: str, status: str, tracking_uri: str) -> None:
    """End the parent run with ``status`` (a failed audit's): a failure here is only a warning,
    the audit's own error is the one to report."""
    try:
        mlflow_client(tracking_uri).set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("MLflow: could not end the audit's run %s (%s: %s)", run_id, type(e).__name__, e)


def download_report(run_id: str, tracking_uri: str | None = None) -> Path:
    """The report folder an audit logged on its parent run ``run_id``, downloaded once per machine
    and user: into ``<temp>/deepindex-audit-<uid>/<key of server and run>``, swapped in whole
    (:func:`deepindex.atomic.swap_dir`), so the training driver and its workers on one node share one
    copy and no process leaves a folder of its own behind.  An audit run again under its name (another
    ``audit.filter_by``) logs a new report on the same run and ends it again: the copy is keyed by the
    run's end too, so a machine that fetched the old one fetches the new (it used to train on the old
    suspects, and two nodes of one run could train on different labels).  No server, no such run or
    no report: a one-line ``ValueError``, and nothing left on disk."""
    from deepindex.atomic import swap_dir

    client = mlflow_client(tracking_uri)
    try:
        ended = client.get_run(run_id).info.end_time
    except Exception as e:  # noqa: BLE001 - a missing run, a dead server: one answer
        raise ValueError(f"cannot fetch the audit report of run {run_id} from {client.tracking_uri} "
                         f"({type(e).__name__})") from None
    key = hashlib.sha1(f"{client.tracking_uri}\n{run_id}\n{ended}".encode()).hexdigest()[:16]
    target = _private_dir(Path(tempfile.gettempdir()) / f"deepindex-audit-{os.getuid()}") / key
    if not (target / _DOWNLOADED).is_file():
        def write(tmp: Path) -> None:
            client.download_artifacts(run_id, REPORT_ARTIFACTS, str(tmp))
            (tmp / _DOWNLOADED).write_text(f"{client.tracking_uri} {run_id}\n")  # last: marks it whole

        try:
            swap_dir(target, write, _DOWNLOADED)
        except Exception as e:  # noqa: BLE001 - a missing run, a missing folder, a dead server: one answer
            raise ValueError(f"cannot fetch the audit report of run {run_id} from {client.tracking_uri} "
                             f"({type(e).__name__})") from None
    return target / REPORT_ARTIFACTS


def _private_dir(d: Path) -> Path:
    """``d``, made if missing, only if this user alone owns and can write it: in a shared temp
    folder another user could have made it first, to hand this user a report of their choosing."""
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise ValueError(f"{d} is not a folder that only this user owns and can write: remove it, or "
                         "point TMPDIR elsewhere")
    return d
