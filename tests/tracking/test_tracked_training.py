"""Tracked Ray Train runs on a real MLflow server: what a run holds, resume, a server that dies."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from deepindex.config import load_config
from support import ONE_WORKER, TINY, MlflowOutage, start_mlflow_server

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.mlflow]


def _history(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.timeout(300)
def test_run_holds_params_metrics_tags_artifacts_and_resume_continues_it(ray_local, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from deepindex.workflows import tracked_train

    exp_name = f"track-{tmp_path.name}"
    cfg = load_config(None, TINY + ONE_WORKER + ["train.epochs=2", f"ray.storage_path={tmp_path / 'results'}",
                                                 f"tracking.experiment={exp_name}"])
    out, run_id = tracked_train(cfg, name="run1", tracking_uri=mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)

    assert run.info.status == "FINISHED"
    # 0.02: the digits recipe's (TINY sets no lr); [8, 16]: TINY's channels over the recipe's
    assert run.data.params["optim.lr"] == "0.02" and run.data.params["model.channels"] == "[8, 16]"
    assert run.data.params["data.dataset"] == "digits"
    assert _history(client, run_id, "val_top1_error") == [0, 1]
    assert run.data.metrics["test_top1_error"] == pytest.approx(out.test_metrics["test_top1_error"])
    tags = run.data.tags
    assert tags["dataset"] == "digits" and tags["ray.job_id"] and len(tags["git_commit"]) == 40
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "test_ap.csv", "test_confusion_matrix.png", "checkpoint"} <= top
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/checkpoint.pt"]
    ap_rows = client.download_artifacts(run_id, "test_ap.csv", str(tmp_path))
    assert len(Path(ap_rows).read_text().strip().splitlines()) == 1 + 10  # header + one row per digit

    # Same name and storage path: Ray Train resumes from the checkpoint, whose `extra` carries the
    # MLflow run id, so the epochs continue the same run instead of starting a duplicate.
    _out2, run_id2 = tracked_train(cfg.override({"train.epochs": 3}), name="run1", tracking_uri=mlflow_server.uri)
    assert run_id2 == run_id
    assert _history(client, run_id, "val_top1_error") == [0, 1, 2]
    exp = client.get_experiment_by_name(exp_name)
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"

    # The same name with another model would fail to load the checkpoint in every worker (a
    # traceback per worker, retried); another dataset or schedule would mix two runs in one.  The
    # command refuses it in one line naming the keys, before anything runs; more epochs were fine.
    from deepindex.cli import main

    overrides = [*TINY, *ONE_WORKER, "train.epochs=3", f"ray.storage_path={tmp_path / 'results'}",
                 f"tracking.experiment={exp_name}"]
    assert main(["train", "--name", "run1", *overrides, "model.channels=[8,32]", "optim.lr=0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"deepindex train: error: training run run1 exists at {tmp_path / 'results' / 'run1'} with "
                   "model.channels=[8, 16] (now [8, 32]), optim.lr=0.02 (now 0.05): the same name resumes it as it "
                   "was started. Give another --name for a new training run, or leave the changes out to resume "
                   "this one"], err
    assert _history(client, run_id, "val_top1_error") == [0, 1, 2]
    # A run saved before definitions were recorded resumes as it is: then the workers fail to load
    # the checkpoint, and the command says so in one line, naming the log file (exit 1), no traceback.
    (tmp_path / "results" / "run1" / "deepindex_train.json").unlink()
    assert main(["train", "--name", "run1", *overrides, "model.channels=[8,32]", "ray.max_failures=0",
                 "tracking.enabled=false"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[:2] == ["training convnet on 1 worker(s), 3 epochs (digits)",
                       f"train run1 exists at {tmp_path / 'results' / 'run1'}: resuming it from its last checkpoint"]
    assert len(err) == 3, err
    assert re.fullmatch(r"deepindex train: failed: training failed in worker rank 0: RuntimeError: Error\(s\) in "
                        r"loading state_dict for ConceptModel: \(the traceback is in (/\S+\.log)\)", err[2]), err
    assert "size mismatch for body" in Path(err[2].rsplit(" ", 1)[1].rstrip(")")).read_text()


@pytest.mark.timeout(300)
def test_tracking_server_dies_mid_run_training_completes_and_sync_logs_the_rest(ray_local, tmp_path, caplog):
    """The server crashes while epoch 1 is being logged and stays down past the end of the run:
    training finishes, the rest is journaled; with the server back, `sync_journals` completes the
    run (every epoch once, test metrics, checkpoint) and ends it FINISHED."""
    from mlflow.tracking import MlflowClient

    from deepindex.workflows import sync_journals, tracked_train

    outage = MlflowOutage(start_mlflow_server(tmp_path / "mlflow"), at_step=1)
    storage = tmp_path / "results"
    cfg = load_config(None, TINY + ONE_WORKER + ["train.epochs=5", f"ray.storage_path={storage}",
                                                 "tracking.experiment=doomed"])
    try:
        with caplog.at_level(logging.WARNING, logger="deepindex"):
            out, run_id = tracked_train(cfg, name="doomed", tracking_uri=outage.uri)
        assert outage.killed.is_set()
        assert out.metrics["epoch"] == 4  # every epoch ran
        assert 0.0 <= out.test_metrics["test_top1_error"] <= 1.0  # scored on the test split despite the dead server
        assert run_id is not None
        # What MLflow missed is journaled next to the checkpoints: epochs 1-4 and the end of the run.
        journal = storage / "doomed" / "tracking_journal.jsonl"
        records = [json.loads(line) for line in journal.read_text().splitlines()]
        assert sorted(r["step"] for r in records if r["kind"] == "epoch") == [1, 2, 3, 4]
        end = [r for r in records if r["kind"] == "test"]
        assert len(end) == 1 and end[0]["run_id"] == run_id and "test_top1_error" in end[0]["metrics"]
        warnings = [r for r in caplog.records
                    if r.levelno == logging.WARNING and r.name.startswith("deepindex.tracking")]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one warning, not one per epoch
        assert [(r.status, r.run_id) for r in sync_journals(storage, outage.uri)] == [("waiting", None)]  # still down

        server = outage.restart()
        client = MlflowClient(server.uri)
        assert client.get_run(run_id).info.status == "RUNNING"  # what a user sees before the sync
        synced = sync_journals(storage, server.uri)
        assert [(r.status, r.run_id, r.epochs) for r in synced] == [("synced", run_id, 4)]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert _history(client, run_id, "val_top1_error") == [0, 1, 2, 3, 4]  # each epoch once, at its step
        assert run.data.metrics["test_top1_error"] == pytest.approx(out.test_metrics["test_top1_error"])
        assert "checkpoint" in {a.path for a in client.list_artifacts(run_id)}
        assert not journal.exists() and len(list(journal.parent.glob("tracking_journal.replayed-*.jsonl"))) == 1
        assert sync_journals(storage, server.uri) == []  # set aside: never replayed twice
    finally:
        outage.close()


@pytest.mark.timeout(120)
def test_trial_started_again_before_its_first_checkpoint_continues_its_child_run(mlflow_server, tmp_path):
    """A sweep driver killed after a trial's MLflow run was created but before the trial's first
    checkpoint (which carries the run id): the restored trial starts from scratch, and must continue
    that child run instead of adding a second one for the same trial."""
    from mlflow.tracking import MlflowClient

    from deepindex.tracking.run import make_tracker, open_parent_run
    from deepindex.tracking.tracker import RUN_ID_KEY

    exp_name = f"restart-{tmp_path.name}"
    cfg = load_config(None, [*TINY, f"tracking.experiment={exp_name}"])
    uri = mlflow_server.uri
    parent = open_parent_run(uri, exp_name, "sweep", recorded=None, tags={}, params={}, texts={})
    other_parent = open_parent_run(uri, exp_name, "sweep2", recorded=None, tags={}, params={}, texts={})

    def start(name: str, parent_id: str) -> str:
        tracker = make_tracker(cfg, name, tracking_uri=uri, parent_run_id=parent_id)
        assert tracker is not None
        return tracker.start(cfg, {})[RUN_ID_KEY]

    first = start("t_00001", parent)
    assert start("t_00001", parent) == first  # no run id in hand (no checkpoint): found by parent + name
    assert start("t_00002", parent) != first  # another trial: its own run
    assert start("t_00001", other_parent) != first  # the same trial id in another sweep: its own run
    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name(exp_name).experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(c.info.run_name for c in children) == ["t_00001", "t_00002"]

    # A sweep whose base config names its runs (tracking.run_name: the same name shown for every
    # trial): the trials are still told apart by their training names.
    cfg = cfg.override({"tracking.run_name": "lr-sweep"})
    named = open_parent_run(uri, exp_name, "sweep3", recorded=None, tags={}, params={}, texts={})
    a, b = start("t_00001", named), start("t_00002", named)
    assert a != b and start("t_00002", named) == b
    assert {client.get_run(r).info.run_name for r in (a, b)} == {"lr-sweep"}
