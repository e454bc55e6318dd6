"""A sweep in MLflow: one parent run, one child run per trial (nested with ``mlflow.parentRunId``).

The Tune driver (``deepindex.tune.driver``) decides what to record; this module only talks to
MLflow: the parent run (created once, continued on restore), the trials' child runs, the summary
on the parent, and finding a finished sweep's best trial for ``deepindex promote --sweep``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from deepindex.tracking.run import KIND_TAG
from deepindex.tracking.run import open_parent_run as open_parent
from deepindex.tracking.tracker import mlflow_client, param_value
from deepindex.tracking.uri import ML_VIEW

log = logging.getLogger(__name__)

SWEEP_TAG = "tune.sweep"
TRIAL_TAG = "tune.trial_id"
DESCRIPTION_TAG = "mlflow.note.content"  # what the UI shows (and edits) as a run's description


@dataclass(frozen=True)
class TrialRow:
    """One trial in the sweep parent's description."""

    trial_id: str
    run_id: str | None
    metric: float | None
    epochs: int
    status: str  # "finished", "stopped early (ASHA)", "error", ...


@dataclass(frozen=True)
class ChildRun:
    run_id: str
    status: str  # MLflow's: RUNNING, FINISHED, KILLED, FAILED


def open_parent_run(tracking_uri: str, experiment: str, name: str, *, recorded: str | None, tags: dict[str, str],
                    params: dict[str, Any], texts: dict[str, str]) -> str:
    """The sweep's parent run (:func:`deepindex.tracking.run.open_parent_run`), tagged as a sweep
    named ``name``: the tags :func:`find_sweep_best` looks it up by."""
    return open_parent(tracking_uri, experiment, name, recorded=recorded,
                       tags={**tags, SWEEP_TAG: name, KIND_TAG: "sweep"}, params=params, texts=texts)


def experiment_of(run_id: str, tracking_uri: str) -> str:
    return str(mlflow_client(tracking_uri).get_run(run_id).info.experiment_id)


def child_runs(parent_run_id: str, tracking_uri: str) -> dict[str, ChildRun]:
    """trial id -> its child run under ``parent_run_id``."""
    client = mlflow_client(tracking_uri)
    children = client.search_runs([experiment_of(parent_run_id, tracking_uri)],
                                  f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000)
    return {c.data.tags[TRIAL_TAG]: ChildRun(c.info.run_id, c.info.status) for c in children
            if TRIAL_TAG in c.data.tags}


def set_tag(run_id: str, key: str, value: str, tracking_uri: str) -> None:
    mlflow_client(tracking_uri).set_tag(run_id, key, value)


def end_run(run_id: str, status: str, tracking_uri: str) -> None:
    mlflow_client(tracking_uri).set_terminated(run_id, status)


def record_summary(parent_run_id: str, tracking_uri: str, *, metrics: dict[str, float], tags: dict[str, str],
                   best_params: dict[str, Any] | None, trials_json: str, status: str | None) -> None:
    """The sweep's outcome on its parent run; ``status`` (FINISHED, FAILED) ends the run, None leaves it
    running (an interrupted sweep, resumed by its name)."""
    from mlflow.entities import Metric, Param

    client = mlflow_client(tracking_uri)
    for k, v in tags.items():
        client.set_tag(parent_run_id, k, v)
    if best_params:
        try:  # params are write-once: a sweep restored after it finished must not fail here
            client.log_batch(parent_run_id, params=[Param(f"best.{k}", param_value(v))
                                                    for k, v in list(best_params.items())[:90]])
        except Exception as e:  # noqa: BLE001 - the summary matters more than the params
            log.warning("sweep run %s: best params not logged (%s)", parent_run_id, e)
    now = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.log_text(parent_run_id, trials_json, "trials.json")
    if status is not None:
        client.set_terminated(parent_run_id, status)


def describe_sweep(parent_run_id: str, tracking_uri: str, *, name: str, metric: str, mode: str, max_epochs: int,
                   rows: list[TrialRow], best_trial: str | None) -> str:
    """Set the parent run's description (Markdown, shown on its page): one link per child run, best
    first, and a link that opens all of them in MLflow's compare view (parallel coordinates)."""
    exp = experiment_of(parent_run_id, tracking_uri)
    # The UI routes on the URL fragment: links relative to the page work wherever the UI is served.
    run_link = lambda rid: f"#/experiments/{exp}/runs/{rid}?{ML_VIEW}"
    ranked = sorted(rows, key=lambda r: (r.metric is None, -(r.metric or 0.0) if mode == "max" else (r.metric or 0.0)))
    linked = [r.run_id for r in ranked if r.run_id]
    compare = (f"#/compare-runs?runs={quote(json.dumps(linked))}&experiments={quote(json.dumps([exp]))}"
               f"&{ML_VIEW}")
    lines = [f"Sweep **{name}**: {len(rows)} trials, ranked by `{metric}` ({mode}), up to {max_epochs} epochs each.",
             "",
             f"**[Compare the {len(linked)} trials]({compare})** (parallel coordinates, params, metrics), or select "
             "them in the runs table and click *Compare*.",
             "",
             f"| trial | {metric} | epochs | status |",
             "|---|---|---|---|"]
    for r in ranked:
        trial = f"[{r.trial_id}]({run_link(r.run_id)})" if r.run_id else r.trial_id
        value = f"{r.metric:.4f}" if r.metric is not None else "-"
        best = " **best**" if r.trial_id == best_trial else ""
        lines.append(f"| {trial}{best} | {value} | {r.epochs}/{max_epochs} | {r.status} |")
    text = "\n".join(lines) + "\n"
    mlflow_client(tracking_uri).set_tag(parent_run_id, DESCRIPTION_TAG, text)
    return text


def find_sweep_best(sweep: str, experiment: str = "deepindex", tracking_uri: str | None = None) -> tuple[str, str]:
    """(best child run id, parent run id) of a finished sweep, from its MLflow parent run."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"tracking.experiment: no experiment {experiment!r} on {client.tracking_uri}")
    runs = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{KIND_TAG}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ValueError(f"sweep: no sweep named {sweep!r} in experiment {experiment!r}")
    if runs[0].info.status == "RUNNING":  # interrupted (or still going): its best so far is not the sweep's
        raise ValueError(f"sweep: {sweep!r} has not finished (interrupted, or still running): run the sweep again "
                         f"under its name to finish it, or promote one trial's run with --run RUN_ID")
    best = runs[0].data.tags.get("best_run_id")
    if not best:
        raise ValueError(f"sweep: {sweep!r} has no best trial recorded (unfinished or untracked)")
    return best, runs[0].info.run_id
