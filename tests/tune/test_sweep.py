"""Sweeps on a local Ray cluster and a real MLflow server: ASHA, parent/child runs, promotion, restore."""
from __future__ import annotations

import os
import re
import signal

import pytest

from support import ONE_WORKER, TINY, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.mlflow]


def _spec(tmp_path, space: dict, tune: dict, epochs: int, extra: tuple[str, ...] | list[str] = ()):
    from deepindex.tune.space import parse_space

    # Enough steps per epoch for a good learning rate to pull ahead of the weak ones by the first rung.
    base = [*TINY, *ONE_WORKER, "data.train_size=1000", "train.batch_size=32", *extra]
    overrides = {k: v for k, v in (item.split("=", 1) for item in base)}
    overrides.update({"train.epochs": str(epochs), "ray.storage_path": str(tmp_path / "results"),
                      "tracking.experiment": f"sweep-{tmp_path.name}",
                      "tracking.registered_model": f"model-{tmp_path.name}"})
    import yaml

    return parse_space({"base": {"overrides": {k: yaml.safe_load(v) for k, v in overrides.items()}},
                        "space": space, "tune": tune})


def _children(client, parent_run_id: str):
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


class _InterruptAfter:
    """A Tune callback that sends this process SIGUSR1 (Tune's interrupt) after ``n`` results.

    ``Tuner.restore`` brings the run config's callbacks back from the saved sweep, so the
    marker file makes it fire once, not again in the restored sweep.
    """

    def __new__(cls, n: int, marker):
        from ray import tune

        class Interrupt(tune.Callback):
            seen = 0

            def on_trial_result(self, iteration, trials, trial, result, **info):
                Interrupt.seen += 1
                if Interrupt.seen >= n and not marker.exists():
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGUSR1)

        return Interrupt()


@pytest.mark.timeout(540)
def test_asha_sweep_interrupted_restored_tracked_and_promoted(ray_local, mlflow_server, tmp_path, caplog):
    """4 trials, 2 at a time; Tune is interrupted after 3 results and the sweep restored.

    One learning rate that learns and three that barely move: at an ASHA rung a weak trial
    that arrives after a better one falls below the cutoff and stops.
    """
    from mlflow.tracking import MlflowClient
    from ray.util import placement_group_table

    from deepindex.tune.driver import run_sweep

    # The digits recipe's 3-block ConvNet: at lr 0.02 its validation error is 0.54-0.66 after one
    # epoch and 0.32-0.43 after two, where the weak rates stay at their initial 0.89-0.93; the
    # 2-block TINY net was still at 0.78-0.85 (a coin flip at the cutoff).  Ray Tune does not
    # save ASHA's rungs with the sweep, so after the restore the good trial's re-reported epoch is
    # what a weak trial arriving later is cut against.
    spec = _spec(tmp_path, {"optim.lr": {"grid": [0.02, 1e-6, 2e-6, 3e-6]},
                            "model.dropout": {"uniform": [0.0, 0.3]}},
                 {"search": "grid", "num_samples": 1, "grace_period": 1, "reduction_factor": 2,
                  "max_concurrent_trials": 2, "promote": True}, epochs=4,
                 extra=["model.channels=[16,32,64]", "model.embed_dim=64"])
    client = MlflowClient(mlflow_server.uri)
    caplog.set_level("INFO", logger="deepindex.events")
    groups_before = set(placement_group_table())

    first = run_sweep(spec, name="asha", tracking_uri=mlflow_server.uri,
                      callbacks=[_InterruptAfter(3, tmp_path / "interrupted")])
    assert first.interrupted and first.promotion is None
    assert client.get_run(first.parent_run_id).info.status == "RUNNING"
    from deepindex.workflows import promote_main

    with pytest.raises(ValueError, match=r"^sweep: 'asha' has not finished \(interrupted, or still running\): run"):
        promote_main(sweep="asha", experiment=f"sweep-{tmp_path.name}", tracking_uri=mlflow_server.uri)

    # The same name with another space or base config would resume the saved trials with the new
    # config (or ignore the change): refused, naming what changed, before anything starts.
    from dataclasses import replace

    from deepindex.restore import ChangedOnRestore

    changed = replace(spec, base=spec.base.override({"train.batch_size": 64}),
                      settings=replace(spec.settings, num_samples=2, promote=False))  # promote acts after the trials
    with pytest.raises(ChangedOnRestore, match=r"^sweep asha exists at .* with train\.batch_size=32 \(now 64\), "
                                                r"tune\.num_samples=1 \(now 2\): .* another --name"):
        run_sweep(changed, name="asha", tracking_uri=mlflow_server.uri)
    assert client.get_run(first.parent_run_id).info.status == "RUNNING"

    out = run_sweep(spec, name="asha", tracking_uri=mlflow_server.uri)  # same name: Tuner.restore
    assert not out.interrupted and out.parent_run_id == first.parent_run_id
    assert len(out.trials) == 4
    assert out.stopped_early >= 1, [(t.trial_id, t.epochs_done) for t in out.trials]
    # The best trial by its best epoch (the checkpoint its run logs and a promotion registers).
    scored = [t for t in out.trials if t.metric is not None and t.status != "ERROR"]
    assert out.best is not None and out.best.metric == min(t.metric for t in scored)

    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_run_id"] == out.best.run_id
    assert parent.data.metrics["trials_stopped_early"] == out.stopped_early
    children = _children(client, out.parent_run_id)
    # Restored trials continued their own runs: one child run per trial, no duplicates.
    assert sorted(c.data.tags["tune.trial_id"] for c in children) == sorted(t.trial_id for t in out.trials)
    for t in out.trials:
        child = client.get_run(t.run_id)
        assert float(child.data.params["optim.lr"]) == pytest.approx(t.params["optim.lr"])
        history = client.get_metric_history(t.run_id, "val_top1_error")
        steps = [m.step for m in history]
        # A trial's figure is its best epoch's (the checkpoint its run logs and a promotion takes): a value it
        # logged, and no worse than its last epoch's.
        seen = [m.value for m in sorted(history, key=lambda m: m.timestamp) if m.step < t.epochs_done]
        assert any(t.metric == pytest.approx(v) for v in seen) and t.metric <= seen[-1] + 1e-9, (t.trial_id, seen)
        # The worker logs an epoch before reporting it: a stopped trial may hold one more than Tune saw.
        assert sorted(set(steps)) == list(range(len(set(steps)))) and len(set(steps)) >= t.epochs_done
        assert "test_top1_error" in child.data.metrics
        assert child.info.status == ("KILLED" if t.stopped_early else "FINISHED")

    # The console: one line per ended trial (epochs, metric, stopped early or not), and the summary.
    events = [r.getMessage() for r in caplog.records if r.name == "deepindex.events"]
    for t in out.trials:
        line = [e for e in events if e.startswith(f"trial {t.trial_id}: ")][-1]  # the restored sweep's
        assert line.endswith(", stopped early") == t.stopped_early, line
    assert any(e.startswith("sweep asha: 4 trials in ") for e in events), events
    assert sum(e.startswith("sweep asha exists at ") and "restoring it" in e for e in events) == 1, events
    # Tune keeps the concurrency the sweep started with; the restore says which (it was silently ignored).
    (started,) = [m.group(1) for e in events if (m := re.match(r"sweep asha: \d+ trials \(.*\), (\d+) at a time", e))]
    assert any(e.startswith("sweep asha exists at ") and e.endswith(f"resumed, {started} at a time as it started)")
               for e in events), events
    # MLflow: a model-training experiment; the parent's description links every trial and their comparison.
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    description = parent.data.tags["mlflow.note.content"]
    assert all(f"runs/{t.run_id}" in description for t in out.trials) and "#/compare-runs?runs=" in description

    # The best trial is registered and holds the alias (there was no champion before).
    assert out.promotion is not None and out.promotion.promoted
    champ = client.get_model_version_by_alias(spec.base.tracking.registered_model, "champion")
    assert champ.run_id == out.best.run_id

    # Tune ended the stopped and interrupted trials by killing their actors, each one's Train
    # controller with it: Ray Train's cleaner (asking the cluster's State API) gives back their
    # worker groups' CPUs, or the next job on this cluster would wait for them forever.
    def kept() -> list[str]:
        return [g for g, info in placement_group_table().items()
                if g not in groups_before and info["state"] != "REMOVED"]
    wait_until(lambda: not kept(), timeout=60, what="the sweep's placement groups removed")




@pytest.mark.timeout(300)
def test_a_sweep_whose_trials_all_fail_says_why_once_each_and_fails(ray_local, mlflow_server, tmp_path, capsys,
                                                                     monkeypatch):
    """A sweep whose every trial fails where only the trial can know it (each sampled batch is larger than
    the train split; the data itself is checked before the sweep starts): each trial's error in one line
    (not Tune's tracebacks), then the command fails naming it, and the sweep's MLflow run ends FAILED."""
    import yaml
    from mlflow.tracking import MlflowClient

    from deepindex.cli import main
    from deepindex.paths import state_dir

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    space = tmp_path / "space.yaml"
    base = {"data.train_size": 200, "data.val_size": 50, "data.test_size": 50, "train.batch_size": 256,
            "model.channels": [8, 16], "model.embed_dim": 32, "train.epochs": 1,
            **{k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in ONE_WORKER)},
            "ray.storage_path": str(tmp_path / "results"), "tracking.experiment": f"sweep-{tmp_path.name}"}
    space.write_text(yaml.safe_dump({"base": {"overrides": base},
                                     "space": {"train.batch_size": {"choice": [512, 1024]}},
                                     "tune": {"num_samples": 2, "grace_period": 1, "promote": False}}))
    assert main(["tune", "--space", str(space), "--name", "gone"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    why = "is more than the train split fills: no training step would run; set train.batch_size <= 200"
    assert lines[-1].startswith("deepindex tune: error: sweep gone: all 2 trials failed; trial "), lines[-1]
    assert why in lines[-1] and lines[-1].endswith("(the log file has the tracebacks)"), lines[-1]
    failed = [ln for ln in lines if " failed after 0/1 epochs: " in ln]
    # Each trial: once failed and started again (max_failures=1), then failed for good, each time saying why.
    assert len([ln for ln in failed if ln.endswith("; starting it again")]) == 2, err
    assert len([ln for ln in failed if ln.endswith("(the log file has its traceback)")]) == 2, err
    assert all(why in ln for ln in failed), failed
    assert "Traceback" not in err and "Trial task failed" not in err and "Trials did not complete" not in err, err
    log_file, = (state_dir() / "logs").glob("tune-*.log")
    assert "Trial task failed" in log_file.read_text()  # Tune's own record, with its traceback
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(f"sweep-{tmp_path.name}")
    parent, = client.search_runs([exp.experiment_id], "tags.deepindex.kind = 'sweep'")
    assert parent.info.status == "FAILED"
