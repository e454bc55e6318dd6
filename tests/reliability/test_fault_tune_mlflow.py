"""Faults in the sweep and tracking processes, through the public jobs as real processes.

* The Tune driver SIGKILLed mid-sweep (``jobs/tune.py``, its whole process group: the driver and
  the local Ray cluster it started): the same command again restores the sweep, keeps the
  finished trial as it was (not recomputed) and completes the rest; MLflow ends with one child
  run per trial and the sweep's parent run FINISHED.
  (``tests/tune/test_sweep.py`` covers Tune's own interrupt, SIGUSR1, and restore.)
* The MLflow server SIGKILLed mid-run (while epoch 1 is logged) and restarted on the same port and
  store (``jobs/train.py``): training completes, the epochs the dead server missed are replayed, and
  the run ends FINISHED, not stuck RUNNING.  ``tests/support.MlflowOutage`` crashes the server at that
  point and holds the run's final health probe until the restart, so the test takes the same path
  however fast the training runs.  (``tests/tracking`` covers a server that stays dead past the end
  of the run, and ``deepindex tracking sync`` afterwards.)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import HEALTH_HOLD_S, REPO, TINY, MlflowOutage, kill_session, start_mlflow_server, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.mlflow]

def _env(tmp_path: Path, mlflow_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # A fresh local Ray cluster per process (never someone else's), 4 logical CPUs on 2 cores.
    env.update({"DEEPINDEX_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": mlflow_uri,
                "DEEPINDEX_NUM_CPUS": "4", "PYTHONUNBUFFERED": "1"})
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # A new session: the job and the Ray processes it starts form one group, killed by its id.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


# ---- Tune driver killed ------------------------------------------------------------------
def _trial_results(sweep_dir: Path) -> dict[str, list[dict]]:
    """Tune's result.json lines per trial folder."""
    out = {}
    for f in sweep_dir.glob("*/result.json"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        out[f.parent.name] = lines
    return out


@pytest.mark.timeout(600)
def test_tune_driver_sigkilled_mid_sweep_restore_keeps_finished_trials(tmp_path):
    from mlflow.tracking import MlflowClient

    server = start_mlflow_server(tmp_path / "mlflow")
    epochs = 2
    sweep_dir = tmp_path / "results" / "killed-sweep"
    cmd = [sys.executable, "jobs/tune.py", "--space", "tune_configs/smoke.yaml", "--name", "killed-sweep",
           "--samples", "2", "--max-concurrent", "1", "--no-promote", *TINY, f"train.epochs={epochs}",
           f"ray.storage_path={tmp_path / 'results'}", "tracking.experiment=killed-sweep"]
    env = _env(tmp_path, server.uri)
    log = tmp_path / "tune.log"
    try:
        first = _start(cmd, env, log)
        try:
            def one_trial_done():
                done = {t: rs for t, rs in _trial_results(sweep_dir).items()
                        if rs and rs[-1].get("training_iteration", 0) >= epochs}
                return done or None

            done = wait_until(one_trial_done, 420, every=0.5, alive=lambda: first.poll() is None,
                              what="one trial finished")
        finally:
            kill_session(first)
        assert first.returncode == -signal.SIGKILL
        (done_trial, done_results), = list(done.items())[:1]
        before = {t: len(rs) for t, rs in _trial_results(sweep_dir).items()}

        second = _start(cmd, env, log)
        try:
            rc = second.wait(420)
        finally:
            kill_session(second)
        text = log.read_text(errors="replace")
        assert rc == 0, text[-3000:]
        summary = json.loads(text[text.rindex('{\n  "sweep"'):].split("\n}\n")[0] + "\n}")
        after = _trial_results(sweep_dir)
        print(f"tune driver SIGKILLed after trial {done_trial} finished; results per trial before the kill "
              f"{before}, after the restore { {t: len(rs) for t, rs in after.items()} }; summary trials="
              f"{summary['trials']} interrupted={summary['interrupted']}")
        assert summary["trials"] == 2 and not summary["interrupted"]
        # The finished trial was kept as it was: no result added, none recomputed.
        assert [r["training_iteration"] for r in after[done_trial]] == [r["training_iteration"] for r in done_results]
        assert all(rs and rs[-1]["training_iteration"] >= epochs for rs in after.values()), after.keys()

        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("killed-sweep")
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if r.data.tags.get("deepindex.kind") == "sweep"]
        children = [r for r in runs if "tune.trial_id" in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", [(r.info.run_id, r.info.status)
                                                                             for r in parents]
        # One child run per trial (the restored driver continued them, no duplicates), none left RUNNING.
        assert sorted(c.data.tags["tune.trial_id"] for c in children) == sorted(
            {c.data.tags["tune.trial_id"] for c in children}) and len(children) == 2
        assert all(c.info.status in ("FINISHED", "KILLED") for c in children), [c.info.status for c in children]
    finally:
        server.stop(signal.SIGKILL)


# ---- MLflow server killed and restarted --------------------------------------------------
@pytest.mark.timeout(420)
def test_mlflow_server_sigkilled_and_restarted_mid_run_run_ends_finished(tmp_path):
    from mlflow.tracking import MlflowClient

    outage = MlflowOutage(start_mlflow_server(tmp_path / "mlflow"), at_step=1, health_waits_for_restart=True)
    epochs = 4
    cmd = [sys.executable, "jobs/train.py", "--name", "crashy", *TINY, f"train.epochs={epochs}",
           f"ray.storage_path={tmp_path / 'results'}", "tracking.experiment=crashy"]
    log = tmp_path / "train.log"
    # The run's final probe waits as long as the proxy holds it, however long the restart takes.
    env = {**_env(tmp_path, outage.uri), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HEALTH_HOLD_S + 30)}
    job = _start(cmd, env, log)
    try:
        wait_until(outage.killed.is_set, 300, every=0.2, alive=lambda: job.poll() is None,
                   what="the server crashed while epoch 1 was logged")
        restarted = outage.restart()  # the same address and store; the run's end waits for it
        rc = job.wait(300)
    finally:
        kill_session(job)
        outage.close()
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    # Read the store the restarted server wrote, without a server: the sqlite file itself.
    store = MlflowClient(f"sqlite:///{restarted.root / 'mlflow.db'}")
    (run,) = store.search_runs([store.get_experiment_by_name("crashy").experiment_id])
    run_id = run.info.run_id
    history = store.get_metric_history(run_id, "val_top1_error")
    folder = tmp_path / "results" / "crashy"
    replayed = sorted(folder.glob("tracking_journal.replayed-*.jsonl"))
    journaled = sorted({json.loads(x)["step"] for j in replayed for x in j.read_text().splitlines()
                        if json.loads(x).get("kind") == "epoch"})
    print(f"MLflow server SIGKILLed while epoch 1 was logged, restarted: run {run.info.status}; epochs on the "
          f"server {sorted(m.step for m in history)}, of which replayed from the journal {journaled}")
    assert run.info.status == "FINISHED"  # not stuck RUNNING
    assert f"MLflow run {run_id}; to serve this model: deepindex promote --run {run_id}" in text  # the next step
    assert "test_top1_error" in run.data.metrics  # the final scoring reached the restarted server
    # No epoch lost: those the dead server missed were journaled, then replayed into the run at the end...
    assert journaled == list(range(1, epochs))
    # ...once each: the journal is set aside, and each epoch is in the run's history once.
    assert sorted(m.step for m in history) == list(range(epochs)), [(m.step, m.value) for m in history]
    assert not (folder / "tracking_journal.jsonl").exists() and len(replayed) == 1
