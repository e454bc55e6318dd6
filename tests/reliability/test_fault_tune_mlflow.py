"""Faults in the sweep and tracking processes, through the public jobs as real processes.

* The Tune driver SIGKILLed mid-sweep (``jobs/tune.py``, its whole process group: the driver and
  the local Ray cluster it started): the same command again restores the sweep, keeps the
  finished trial as it was (not recomputed) and completes the rest; MLflow ends with one child
  run per trial and the sweep's parent run FINISHED.
  (``tests/tune/test_sweep.py`` covers Tune's own interrupt, SIGUSR1, and restore.)
* The MLflow server SIGKILLed mid-run and restarted on the same port and store
  (``jobs/train.py``): training completes and the run ends FINISHED, not stuck RUNNING.
  (``tests/tracking`` covers a server that stays dead.)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the shared fixture modules, as tests/tune and tests/tracking do

from fixtures_mlflow import start_mlflow_server  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.mlflow]

SMALL = ["data.dataset=digits", "data.train_size=400", "data.val_size=100", "data.test_size=100",
         "model.channels=[8,16]", "model.embed_dim=32", "train.batch_size=64"]


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


def _kill_group(proc: subprocess.Popen) -> None:
    from deepindex.sessions import session_members

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)
    deadline = time.monotonic() + 30
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not session_members(proc.pid), "processes of the killed group are still running"


def _wait(predicate, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(f"the job exited ({proc.returncode}) before the fault was injected:\n{tail}")
        time.sleep(0.5)
    return None


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
           "--samples", "2", "--max-concurrent", "1", "--no-promote", *SMALL, f"train.epochs={epochs}",
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

            done = _wait(one_trial_done, 420, first, log)
            assert done, f"no trial finished in time:\n{log.read_text(errors='replace')[-3000:]}"
        finally:
            _kill_group(first)
        assert first.returncode == -signal.SIGKILL
        (done_trial, done_results), = list(done.items())[:1]
        before = {t: len(rs) for t, rs in _trial_results(sweep_dir).items()}

        second = _start(cmd, env, log)
        try:
            rc = second.wait(420)
        finally:
            _kill_group(second)
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
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in parents]
        # One child run per trial (the restored driver continued them, no duplicates), none left RUNNING.
        assert sorted(c.data.tags["tune.trial_id"] for c in children) == sorted(
            {c.data.tags["tune.trial_id"] for c in children}) and len(children) == 2
        assert all(c.info.status in ("FINISHED", "KILLED") for c in children), [c.info.status for c in children]
    finally:
        server.stop(signal.SIGKILL)


# ---- MLflow server killed and restarted --------------------------------------------------
@pytest.mark.timeout(420)
def test_mlflow_server_sigkilled_and_restarted_mid_run_run_ends_finished(tmp_path, monkeypatch):
    import fixtures_mlflow
    from mlflow.tracking import MlflowClient

    server = start_mlflow_server(tmp_path / "mlflow")
    port = int(server.uri.rsplit(":", 1)[1])
    epochs = 4
    cmd = [sys.executable, "jobs/train.py", "--name", "crashy", *SMALL, f"train.epochs={epochs}",
           f"ray.storage_path={tmp_path / 'results'}", "tracking.experiment=crashy"]
    log = tmp_path / "train.log"
    client = MlflowClient(server.uri)
    job = _start(cmd, _env(tmp_path, server.uri), log)
    restarted = None
    try:
        def first_epoch_logged():
            try:
                exp = client.get_experiment_by_name("crashy")
                runs = client.search_runs([exp.experiment_id]) if exp else []
                return runs[0].info.run_id if runs and client.get_metric_history(runs[0].info.run_id,
                                                                                 "val_top1_error") else None
            except Exception:  # noqa: BLE001 - a busy server: ask again
                return None

        run_id = _wait(first_epoch_logged, 300, job, log)
        assert run_id, log.read_text(errors="replace")[-3000:]
        server.stop(signal.SIGKILL)  # a crash, not a clean shutdown
        down_at = time.monotonic()
        time.sleep(3.0)
        monkeypatch.setattr(fixtures_mlflow, "free_port", lambda: port)  # the same address and store
        restarted = start_mlflow_server(tmp_path / "mlflow")
        back_s = time.monotonic() - down_at
        rc = job.wait(300)
    finally:
        _kill_group(job)
        for s in (server, restarted):
            if s is not None:
                s.stop(signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    # Read the store the restarted server wrote, without a server: the sqlite file itself.
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    run = store.get_run(run_id)
    steps = sorted({m.step for m in store.get_metric_history(run_id, "val_top1_error")})
    folder = tmp_path / "results" / "crashy"
    replayed = sorted(folder.glob("tracking_journal.replayed-*.jsonl"))
    journaled = sorted({json.loads(x)["step"] for j in replayed for x in j.read_text().splitlines()
                        if json.loads(x).get("kind") == "epoch"})
    print(f"MLflow server SIGKILLed after epoch 0, back after {back_s:.1f}s: run {run.info.status}; "
          f"epochs on the server {steps}, of which replayed from the journal {journaled}; test metrics on the "
          f"server: {'test_top1_error' in run.data.metrics}")
    assert run.info.status == "FINISHED"  # not stuck RUNNING
    assert "test_top1_error" in run.data.metrics  # the final scoring reached the restarted server
    # No epoch lost: those the dead server missed were journaled, then replayed into the run at the end.
    assert steps == list(range(epochs)), (steps, journaled)
    # Replayed once: the journal is set aside, and each epoch is in the run's history once.
    assert not (folder / "tracking_journal.jsonl").exists() and len(replayed) <= 1
    history = store.get_metric_history(run_id, "val_top1_error")
    assert sorted(m.step for m in history) == steps, [(m.step, m.value) for m in history]
