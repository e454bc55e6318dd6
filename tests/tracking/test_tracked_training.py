"""Tracked Ray Train runs on a real MLflow server: what a run holds, resume, a server that dies."""
from __future__ import annotations

import json
import logging
import signal
import threading
import time

import pytest

from deepindex.config import load_config
from fixtures_mlflow import start_mlflow_server
from fixtures_mlflow import TINY

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.mlflow]


def _history(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.timeout(300)
def test_run_holds_params_metrics_tags_artifacts_and_resume_continues_it(ray_local, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from deepindex.workflows import tracked_train

    exp_name = f"track-{tmp_path.name}"
    cfg = load_config(None, TINY + ["train.epochs=2", f"ray.storage_path={tmp_path / 'results'}",
                                    f"tracking.experiment={exp_name}"])
    out, run_id = tracked_train(cfg, name="run1", tracking_uri=mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)

    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["model.channels"] == "[8, 16]"
    assert run.data.params["data.dataset"] == "digits"
    assert _history(client, run_id, "val_top1_error") == [0, 1]
    assert run.data.metrics["test_top1_error"] == pytest.approx(out.test_metrics["test_top1_error"])
    tags = run.data.tags
    assert tags["dataset"] == "digits" and tags["ray.job_id"] and len(tags["git_commit"]) == 40
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "test_ap.csv", "test_confusion_matrix.png", "checkpoint"} <= top
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/checkpoint.pt"]
    ap_rows = client.download_artifacts(run_id, "test_ap.csv", str(tmp_path))
    assert len(open(ap_rows).read().strip().splitlines()) == 1 + 10  # header + one row per digit

    # Same name and storage path: Ray Train resumes from the checkpoint, whose `extra` carries the
    # MLflow run id, so the epochs continue the same run instead of starting a duplicate.
    out2, run_id2 = tracked_train(cfg.override({"train.epochs": 3}), name="run1", tracking_uri=mlflow_server.uri)
    assert run_id2 == run_id
    assert _history(client, run_id, "val_top1_error") == [0, 1, 2]
    exp = client.get_experiment_by_name(exp_name)
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.timeout(300)
def test_tracking_server_killed_during_a_run_training_completes(ray_local, tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from deepindex.workflows import tracked_train

    server = start_mlflow_server(tmp_path / "mlflow")
    exp_name = "doomed"
    cfg = load_config(None, TINY + ["train.epochs=5", f"ray.storage_path={tmp_path / 'results'}",
                                    f"tracking.experiment={exp_name}"])
    killed = threading.Event()

    def kill_after_first_epoch():
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed.is_set():
            try:
                exp = client.get_experiment_by_name(exp_name)
                runs = client.search_runs([exp.experiment_id]) if exp else []
                if runs and client.get_metric_history(runs[0].info.run_id, "val_top1_error"):
                    server.stop(signal.SIGKILL)  # a crash, not a clean shutdown
                    killed.set()
                    return
            except Exception:  # noqa: BLE001 - the server may be slow to answer; poll again
                pass
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_epoch, daemon=True)
    killer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="deepindex"):
            out, run_id = tracked_train(cfg, name="doomed", tracking_uri=server.uri)
    finally:
        killed.set()
        server.stop(signal.SIGKILL)
    killer.join(timeout=10)

    assert out.metrics["epoch"] == 4  # every epoch ran
    assert 0.0 <= out.test_metrics["test_top1_error"] <= 1.0  # scored on the test split despite the dead server
    assert run_id is not None
    # What MLflow missed is journaled next to the checkpoints: the last epochs and the test metrics.
    journal = tmp_path / "results" / "doomed" / "tracking_journal.jsonl"
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert 4 in {r["step"] for r in records if r["kind"] == "epoch"}
    assert any(r["kind"] == "test" and "test_top1_error" in r["metrics"] for r in records)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("deepindex.tracking")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]

    # The server back (same store): replaying the journal completes the run's history, once.
    from deepindex.tracking.tracker import replay_journal

    back = start_mlflow_server(tmp_path / "mlflow")
    try:
        client = MlflowClient(back.uri)
        live = _history(client, run_id, "val_top1_error")
        journaled = sorted(r["step"] for r in records if r["kind"] == "epoch")
        assert replay_journal(journal, back.uri, run_id) == len(journaled)
        assert sorted(_history(client, run_id, "val_top1_error")) == sorted(live + journaled) == list(range(5))
        assert not journal.exists() and len(list(journal.parent.glob("tracking_journal.replayed-*.jsonl"))) == 1
        assert replay_journal(journal, back.uri, run_id) == 0  # set aside: never replayed twice
    finally:
        back.stop(signal.SIGKILL)
