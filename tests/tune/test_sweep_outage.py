"""A sweep that ends while its MLflow server is down: each ended trial's test metrics go to its
journal (they used to be lost with a traceback at the sweep's end), and `deepindex tracking sync`
ends the trial's run with them once the server is back."""
from __future__ import annotations

import pytest

from deepindex.net import free_port

pytestmark = [pytest.mark.mlflow, pytest.mark.timeout(180)]


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
