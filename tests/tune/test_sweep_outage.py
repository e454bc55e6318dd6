"""A sweep that ends while its MLflow server is down: each ended trial's test metrics go to its
journal (they used to be lost with a traceback at the sweep's end), and `deepindex tracking sync`
ends the trial's run with them once the server is back."""
from __future__ import annotations

import pytest

from deepindex.net import free_port

pytestmark = [pytest.mark.mlflow, pytest.mark.timeout(180)]


def _untracked_trial(trial_dir, lm, cfg):
    """A trial that never reached the server: two checkpoints without a run id (epoch 1 the best) and its
    epochs in its journal, as its rank 0 wrote them."""
    import json

    from deepindex.checkpoint import save_checkpoint
    from deepindex.tracking.tracker import JOURNAL

    for epoch in (0, 1):
        save_checkpoint(trial_dir / f"checkpoint_00000{epoch}", model=lm.model, config=cfg, stats=lm.stats,
                        concepts=lm.concepts, multilabel=lm.multilabel, epoch=epoch, metrics={"val_map": 0.5 + epoch})
    (trial_dir / JOURNAL).write_text("".join(json.dumps(
        {"kind": "epoch", "time": 1.0 + e, "run_name": "t1", "run_id": None, "step": e,
         "metrics": {"val_map": 0.5 + e}}) + "\n" for e in (0, 1)))
    return trial_dir


def test_a_sweep_ending_with_its_server_down_journals_each_trials_end_for_sync(small_model, mlflow_server, tmp_path,
                                                                               caplog):
    from mlflow.tracking import MlflowClient

    from deepindex.checkpoint import load_model, save_checkpoint
    from deepindex.tracking.sweep import TRIAL_TAG
    from deepindex.tracking.tracker import JOURNAL, RUN_ID_KEY, read_journal
    from deepindex.train.evaluation import score_checkpoint
    from deepindex.tune.driver import SweepOutcome, TrialSummary, _record
    from deepindex.workflows import sync_journals

    # A sweep's parent run and a trial's child run, as the driver and the trial's rank 0 made them.
    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment(f"outage-{tmp_path.name}")
    parent = client.create_run(exp, run_name="sweep").info.run_id
    child = client.create_run(exp, run_name="t1", tags={"mlflow.parentRunId": parent, TRIAL_TAG: "t1"}).info.run_id
    storage = tmp_path / "ray"
    trial_dir = storage / "sweep" / "train" / "t1"
    lm = load_model(small_model)
    for epoch in (0, 1):  # the trial's checkpoints (the best: epoch 1); the run id is in each one's extra
        save_checkpoint(trial_dir / f"checkpoint_00000{epoch}", model=lm.model, config=lm.config, stats=lm.stats,
                        concepts=lm.concepts, multilabel=lm.multilabel, epoch=epoch, metrics={"val_map": 0.5 + epoch},
                        extra={RUN_ID_KEY: child})
    trial = TrialSummary("t1", {}, 1.5, 2, False, "TERMINATED")
    outcome = SweepOutcome("sweep", str(storage / "sweep"), "val_map", "max", [trial], trial, parent, 1.0, False)

    _record(outcome, f"http://127.0.0.1:{free_port()}", 2)  # nobody listens there: the server is down

    assert "unreachable at the end of sweep sweep" in caplog.text
    (end,) = [r for r in read_journal(trial_dir / JOURNAL) if r["kind"] == "test"]
    expected = score_checkpoint(trial_dir / "checkpoint_000001").metrics["test_map"]
    assert (end["run_id"], end["status"], end["metrics"]["test_map"]) == (child, "FINISHED", pytest.approx(expected))
    assert client.get_run(child).info.status == "RUNNING"

    (synced,) = sync_journals(storage, mlflow_server.uri)  # the server back
    assert (synced.status, synced.run_id) == ("synced", child)
    run = client.get_run(child)
    assert run.info.status == "FINISHED" and run.data.metrics["test_map"] == pytest.approx(expected)
    assert "checkpoint/checkpoint.pt" in [a.path for a in client.list_artifacts(child, "checkpoint")]


def test_a_trial_that_started_while_the_server_was_down_gets_its_run_under_the_sweep(small_model, mlflow_server,
                                                                                      tmp_path):
    """Found on review: a trial whose rank 0 found the server unreachable trained untracked (its epochs in its
    journal) and had no run under the sweep; at the sweep's end, the server back, it was left out, never
    ended, and as the best trial not promoted.  Its run is now made under the parent and finalized."""

    from mlflow.tracking import MlflowClient

    from deepindex.checkpoint import load_model
    from deepindex.tracking.sweep import TRIAL_TAG
    from deepindex.train.evaluation import score_checkpoint
    from deepindex.tune.driver import SweepOutcome, TrialSummary, _record

    client = MlflowClient(mlflow_server.uri)
    lm = load_model(small_model)
    cfg = lm.config.override({"tracking.experiment": f"late-{tmp_path.name}"})
    exp = client.create_experiment(cfg.tracking.experiment)
    parent = client.create_run(exp, run_name="sweep").info.run_id
    trial_dir = _untracked_trial(tmp_path / "ray" / "sweep" / "train" / "t1", lm, cfg)
    trial = TrialSummary("t1", {}, 1.5, 2, False, "TERMINATED")
    outcome = SweepOutcome("sweep", str(trial_dir.parent.parent), "val_map", "max", [trial], trial, parent, 1.0, False)

    _record(outcome, mlflow_server.uri, 2)

    (child,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert child.data.tags[TRIAL_TAG] == "t1" and child.info.status == "FINISHED" and trial.run_id == child.info.run_id
    expected = score_checkpoint(trial_dir / "checkpoint_000001").metrics["test_map"]
    assert child.data.metrics["test_map"] == pytest.approx(expected)
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_map")] == [0, 1]  # the journaled epochs
    assert client.get_run(parent).data.tags["best_run_id"] == child.info.run_id  # what promote --sweep takes


def test_a_trial_never_tracked_and_synced_after_the_sweep_is_its_child_run_once(small_model, mlflow_server, tmp_path):
    """A trial that started and ended while the server was down (the sweep too): `deepindex tracking sync`
    made its run on its own, outside the sweep, and the sweep run again made a second run of the trial
    without its epochs (found on review).  Sync now makes it the sweep's child with its trial tags, and the
    sweep run again finds it there."""

    from mlflow.tracking import MlflowClient

    from deepindex.checkpoint import load_model
    from deepindex.tracking.sweep import SWEEP_TAG, TRIAL_TAG
    from deepindex.tune.driver import SweepOutcome, TrialSummary, _record
    from deepindex.workflows import sync_journals

    client = MlflowClient(mlflow_server.uri)
    lm = load_model(small_model)
    cfg = lm.config.override({"tracking.experiment": f"never-{tmp_path.name}"})
    exp = client.create_experiment(cfg.tracking.experiment)
    parent = client.create_run(exp, run_name="sweep").info.run_id
    storage = tmp_path / "ray"
    _untracked_trial(storage / "sweep" / "train" / "t1", lm, cfg)
    trial = TrialSummary("t1", {}, 1.5, 2, False, "TERMINATED")
    outcome = SweepOutcome("sweep", str(storage / "sweep"), "val_map", "max", [trial], trial, parent, 1.0, False)

    _record(outcome, f"http://127.0.0.1:{free_port()}", 2)  # the sweep ends with the server down
    (synced,) = sync_journals(storage, mlflow_server.uri)  # the server back
    assert synced.status == "synced" and synced.epochs == 2
    (child,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert child.info.run_id == synced.run_id and child.info.status == "FINISHED"
    assert (child.data.tags[TRIAL_TAG], child.data.tags[SWEEP_TAG]) == ("t1", "sweep")
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_map")] == [0, 1]

    trial.run_id = None
    _record(outcome, mlflow_server.uri, 2)  # the sweep run again under its name, the server up
    assert [r.info.run_id for r in client.search_runs([exp], "")] in (
        [child.info.run_id, parent], [parent, child.info.run_id])  # no second run of the trial
    assert client.get_run(parent).data.tags["best_run_id"] == child.info.run_id
