"""Jobs on a real 2-node Ray cluster (separate processes, token auth on), submitted both with the
plain ``ray job submit`` CLI (the README's command) and with ``deepindex submit``."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import requests

from deepindex.submit import EXCLUDES
from support import TINY, TWO_WORKERS, pid_alive, wait_until

# Tiny training runs: 2 workers x 1 CPU, one per node (STRICT_SPREAD fails rather than packs).
TINY_TRAIN = [*TINY, *TWO_WORKERS, "train.epochs=1", "ray.placement_strategy=STRICT_SPREAD"]

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def readme_ray_job_submit(address: str, tracking_uri: str, submission_id: str, script: str,
                          args: list[str]) -> list[str]:
    """The plain ``ray job submit`` of the README ("Running on a Ray cluster"), as argv."""
    runtime_env = {"py_modules": ["platform/deepindex"], "excludes": EXCLUDES,
                   "env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}}
    return ["job", "submit", "--address", address, "--submission-id", submission_id, "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime_env), "--", "python", script, *args]


def assert_trained_on_both_nodes(cluster, submission_id: str, run_name: str, tracking_uri: str) -> None:
    """Both Train workers ran, on different nodes, and together they were the whole cluster."""
    info = cluster.job_info(submission_id)
    workers = cluster.train_workers(info["job_id"])
    assert len(workers) == 2, workers
    assert {w["node_id"] for w in workers} == set(cluster.node_ids)
    # The worker loop's own record: one status file per rank, each written by a different process.
    status = [json.loads((cluster.storage / run_name / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s.get("done") for s in status), status
    assert len({s["pid"] for s in status}) == 2
    assert {s["pid"] for s in status} == {w["pid"] for w in workers}
    # The run landed in the tracking server the job was given: one FINISHED run with its metrics.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("deepindex")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    assert runs[0].info.status == "FINISHED"
    assert {"val_loss", "val_top1_error", "images_per_s"} <= set(runs[0].data.metrics)


def tiny_train_args(cluster, name: str) -> list[str]:
    return ["--name", name, *TINY_TRAIN, f"ray.storage_path={cluster.storage}"]


@pytest.mark.timeout(240)  # the first test also pays for the module's 2-node cluster and MLflow server
def test_token_auth_is_on(stack):
    cluster, _ = stack
    assert requests.get(f"{cluster.address}/api/version", timeout=5).status_code == 401
    assert requests.get(f"{cluster.address}/api/version", headers=cluster.headers, timeout=5).status_code == 200
    # A client with the wrong token is refused with a one-line error, before anything is uploaded.
    out = cluster.deepindex("submit", "--address", cluster.address, "--no-wait", "train",
                            RAY_AUTH_TOKEN="0" * 64, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "Authentication" in out.stderr, out.stderr


@pytest.mark.timeout(300)
def test_ray_job_submit_cli_trains_on_both_nodes(stack):
    cluster, tracking_uri = stack
    sid, name = f"cli-{uuid.uuid4().hex[:8]}", "cli-run"
    out = cluster.ray_cli(*readme_ray_job_submit(cluster.address, tracking_uri, sid, "jobs/train.py",
                                                 tiny_train_args(cluster, name)))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert f"Job '{sid}' succeeded" in out.stdout + out.stderr
    assert "test_" in out.stdout  # the job printed its held-out metrics
    info = cluster.job_info(sid)
    assert info["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == tracking_uri
    assert_trained_on_both_nodes(cluster, sid, name, tracking_uri)


@pytest.mark.timeout(300)
def test_deepindex_submit_from_a_folder_of_ones_own_trains_on_both_nodes(stack, tmp_path):
    """A user's folder outside any checkout (deepindex installed): its recipe travels with the job."""
    import yaml

    from deepindex.config import parse_overrides

    cluster, tracking_uri = stack
    sid, name = f"di-{uuid.uuid4().hex[:8]}", "di-run"
    own = tmp_path / "mine"
    own.mkdir()
    recipe: dict[str, dict] = {}
    for key, value in parse_overrides([a for a in TINY_TRAIN if a.startswith(("data.", "model."))]).items():
        section, field = key.split(".", 1)
        recipe.setdefault(section, {})[field] = value
    (own / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    rest = [a for a in TINY_TRAIN if not a.startswith(("data.", "model."))]
    out = cluster.deepindex("submit", "--address", cluster.address, "--tracking-uri", tracking_uri,
                            "--submission-id", sid, "train", "--config", "recipe.yaml", "--name", name, *rest,
                            f"ray.storage_path={cluster.storage}", cwd=own)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.splitlines()[0] == sid  # the job id comes first, then the followed logs
    result = json.loads(out.stdout[out.stdout.index("{\n"):out.stdout.rindex("}") + 1])
    assert result["name"] == name and result["test"], result
    # The console is ours: Ray's client chatter (`INFO dashboard_sdk.py:... -- Uploading package ...`,
    # `WebSocket closed ...`) stays off it.
    assert [line.split(" as ")[0] for line in out.stderr.splitlines()] == ["submitted train", f"job {sid} SUCCEEDED"]
    assert "job_manager.py" not in out.stdout  # nor the job manager's own line in the followed log
    info = cluster.job_info(sid)
    assert info["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == tracking_uri
    assert info["entrypoint"].startswith("python -m deepindex.cli train --config recipe.yaml ")
    assert_trained_on_both_nodes(cluster, sid, name, tracking_uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run, = client.search_runs([client.get_experiment_by_name("deepindex").experiment_id],
                              f"attributes.run_name = '{name}'")
    assert run.data.params["data.train_size"] == "600"  # the recipe's, not the default


@pytest.mark.timeout(180)
def test_bad_config_fails_and_logs_name_the_key(stack):
    cluster, _ = stack
    sid = f"bad-{uuid.uuid4().hex[:8]}"
    out = cluster.deepindex("submit", "--address", cluster.address, "--submission-id", sid, "train",
                            *TINY_TRAIN, "optim.lrr=0.1")
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]  # the driver's exit status
    assert f"job {sid} FAILED" in out.stderr
    assert cluster.job_info(sid)["status"] == "FAILED"
    logs = cluster.ray_cli("job", "logs", "--address", cluster.address, sid, check=True).stdout
    assert "optim.lrr: unknown key" in logs
    assert "Traceback" not in logs  # a one-line error, not a stack trace
    assert Path(cluster.job_info(sid)["entrypoint"].split()[1]) == Path("jobs/train.py")  # from the checkout


@pytest.mark.timeout(240)
def test_ray_job_stop_stops_a_running_sweep_cleanly(stack):
    cluster, tracking_uri = stack
    sid = f"sweep-{uuid.uuid4().hex[:8]}"
    # A sweep that would run for hours: the smoke space with 1000 epochs per trial.
    out = cluster.deepindex("submit", "--address", cluster.address, "--tracking-uri", tracking_uri,
                            "--submission-id", sid, "--no-wait", "tune", "--space", "tune_configs/smoke.yaml",
                            "--name", "stop-sweep", "--no-promote", "train.epochs=1000",
                            f"ray.storage_path={cluster.storage}")
    assert out.returncode == 0 and out.stdout.strip() == sid, out.stderr

    def training() -> dict | None:  # trials are training: their Train workers are alive
        info = cluster.job_info(sid)
        assert info["status"] in ("PENDING", "RUNNING"), info
        workers = cluster.train_workers(info["job_id"]) if info.get("job_id") else []
        return info if any(w["state"] == "ALIVE" for w in workers) else None

    info = wait_until(training, 150, every=2.0, what="the sweep's trials training")
    ray_job_id = info["job_id"]
    pids = [w["pid"] for w in cluster.train_workers(ray_job_id) if w["state"] == "ALIVE"]

    stop = cluster.ray_cli("job", "stop", "--address", cluster.address, sid, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert cluster.wait_job(sid, 60)["status"] == "STOPPED"
    # Cleanly: every Train worker of every trial is gone, processes and actors, and the cluster's
    # CPUs are all free again for the next job.
    wait_until(lambda: not any(pid_alive(p) for p in pids)
               and all(w["state"] == "DEAD" for w in cluster.train_workers(ray_job_id)),
               90, every=2.0, what="every train worker of the stopped sweep gone")
    wait_until(lambda: "0.0/4.0 CPU" in cluster.cluster_status(), 60, every=2.0,
               what="all the cluster's CPUs free again")
