"""deepindex.restore: a training run, sweep or audit named again resumes as it was started, or is refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deepindex.config import load_config
from deepindex.restore import (
    AUDIT_STATE,
    FREE,
    LOCK,
    SWEEP_STATE,
    TRAIN_STATE,
    ChangedOnRestore,
    RunInProgress,
    check_unchanged,
    config_definition,
    fresh_name,
    read_state,
    record_definition,
    running,
    update_state,
)


def test_the_state_file_keeps_the_parent_run_and_the_definition_side_by_side(tmp_path) -> None:
    assert read_state(tmp_path / "run", TRAIN_STATE) == {}
    update_state(tmp_path / "run", TRAIN_STATE, parent_run_id="abc", tracking_uri="http://x")
    record_definition(tmp_path / "run", TRAIN_STATE, {"model.channels": (8, 16), "optim.lr": 0.1})
    update_state(tmp_path / "run", TRAIN_STATE, parent_run_id="def")
    state = json.loads((tmp_path / "run" / TRAIN_STATE).read_text())
    assert state == {"parent_run_id": "def", "tracking_uri": "http://x",
                     "definition": {"model.channels": [8, 16], "optim.lr": 0.1}}


def test_the_same_definition_restores_and_another_is_refused_naming_each_key(tmp_path) -> None:
    cfg = load_config(None, ["data.dataset=digits", "model.channels=[8,16]"])
    record_definition(tmp_path, SWEEP_STATE, config_definition(cfg))
    check_unchanged("s", tmp_path, SWEEP_STATE, config_definition(cfg))  # tuples against saved lists: equal
    # Where the run is, and promotion, may change.
    moved = cfg.override({k: v for k, v in {"ray.storage_path": "/elsewhere", "tracking.registered_model": "other",
                                            "tracking.promote_min_qbe_map": 0.9}.items() if k in FREE})
    check_unchanged("s", tmp_path, SWEEP_STATE, config_definition(moved))
    other = cfg.override({"optim.lr": 0.5, "model.channels": [8, 32]})
    with pytest.raises(ChangedOnRestore) as e:
        check_unchanged("s", tmp_path, SWEEP_STATE, {**config_definition(other), "space.x": ["choice", [1]]})
    msg = str(e.value)
    assert msg.startswith(f"sweep s exists at {tmp_path} with model.channels=[8, 16] (now [8, 32]), "
                          f"optim.lr={cfg.optim.lr} (now 0.5), space.x=\"unset\" (now [\"choice\", [1]]): "), msg
    assert msg.endswith("Give another --name for a new sweep, or leave the changes out to resume this one")
    # A long list is cut: four keys named, the rest counted.
    many = cfg.override({"optim.lr": 0.5, "train.epochs": 2, "train.batch_size": 7, "model.dropout": 0.45,
                         "data.train_size": 100})
    with pytest.raises(ChangedOnRestore, match=r"train\.batch_size=\d+ \(now 7\) and 1 more: "):
        check_unchanged("s", tmp_path, SWEEP_STATE, config_definition(many))
    # An audit's own free keys (its filter acts after the folds) are the caller's to leave out.
    record_definition(tmp_path / "a", AUDIT_STATE, config_definition(cfg, free=("audit.filter_by",)))
    filtered = cfg.override({"audit.filter_by": "both"})
    check_unchanged("a", tmp_path / "a", AUDIT_STATE, config_definition(filtered, free=("audit.filter_by",)))
    with pytest.raises(ChangedOnRestore, match=r"^audit a exists at .* with audit\.folds=5 \(now 3\): "):
        check_unchanged("a", tmp_path / "a", AUDIT_STATE,
                        config_definition(filtered.override({"audit.folds": 3}), free=("audit.filter_by",)))


def test_a_run_saved_before_definitions_were_recorded_restores_as_it_is(tmp_path) -> None:
    update_state(tmp_path, SWEEP_STATE, parent_run_id="abc")
    check_unchanged("s", tmp_path, SWEEP_STATE, {"optim.lr": 1.0})


def test_a_training_run_resumes_on_other_workers_or_longer_unless_its_schedule_is_cosine(tmp_path) -> None:
    """``claim_run`` before a training run: the integration (a real resume, the CLI's line) is
    tests/tracking/test_tracked_training.py's; here Ray Train's run state is a stand-in file of its
    shape (the field the tests of Ray Train runs read too)."""
    from deepindex.train.trainer import RAY_TRAIN_STATE, claim_run

    for policy in ("step", "cosine"):
        cfg = load_config(None, ["data.dataset=digits", f"schedule.policy={policy}", f"ray.storage_path={tmp_path}"])
        claim_run(cfg, policy)  # a new run: recorded
        claim_run(cfg.override({"model.dropout": 0.4}), policy)  # not started yet: a new definition
        state = tmp_path / policy / RAY_TRAIN_STATE
        state.write_text('{"latest_checkpoint_result": null}')  # failed before its first checkpoint: starts over
        claim_run(cfg.override({"model.dropout": 0.4}), policy)
        state.write_text('{"latest_checkpoint_result": {"metrics": {"epoch": 0}}}')  # now it resumes from one
        with pytest.raises(ChangedOnRestore, match=rf"^training run {policy} exists at .* with model\.dropout=0\.4 "):
            claim_run(cfg, policy)
        cfg = cfg.override({"model.dropout": 0.4})
        claim_run(cfg.override({"ray.num_workers": 3, "train.threads": 2, "tracking.enabled": False}), policy)
        claim_run(cfg.override({"audit.filter_by": "both"}), policy)  # a fold of an audit restored with another filter
        longer = cfg.override({"train.epochs": cfg.train.epochs + 4})
        if policy == "step":
            claim_run(longer, policy)
        else:
            with pytest.raises(ChangedOnRestore, match=r" with train\.epochs=\d+ \(now \d+\): "):
                claim_run(longer, policy)


def test_a_name_is_one_kind_of_run(tmp_path) -> None:
    """An audit named like a sweep would restore the sweep's trials as folds (both are Tune runs);
    a training run named like a sweep would write its checkpoints among the trials."""
    record_definition(tmp_path / "s2", SWEEP_STATE, {"optim.lr": 0.1})
    with pytest.raises(ChangedOnRestore, match=rf"^s2: {tmp_path / 's2'} holds a sweep, not an audit: give another "
                                               r"--name$"):
        check_unchanged("s2", tmp_path / "s2", AUDIT_STATE, {"optim.lr": 0.1})
    with pytest.raises(ChangedOnRestore, match=r"holds a sweep, not a training run"):
        record_definition(tmp_path / "s2", TRAIN_STATE, {"optim.lr": 0.1})
    assert sorted(p.name for p in (tmp_path / "s2").iterdir()) == [SWEEP_STATE]
    check_unchanged("s2", tmp_path / "s2", SWEEP_STATE, {"optim.lr": 0.1})



def test_a_run_is_run_by_one_process_at_a_time_and_a_killed_one_leaves_no_lock(tmp_path, capsys, monkeypatch) -> None:
    """The same `deepindex train --name t1` in a second terminal is refused, naming the process that
    runs it; once that process ends, killed or not, the name runs again."""
    folder = tmp_path / "t1"
    with running("train", "t1", str(tmp_path)):
        with pytest.raises(RunInProgress, match=rf"^train t1 is running now \(pid {os.getpid()} on .+, since .+\) at "
                                                 rf"{folder}: wait for it to end, or give another --name$"), \
                running("train", "t1", str(tmp_path)):
            pass
        # The command itself: one line, exit 2, before Ray or the data are touched.
        from deepindex.cli import main

        assert main(["train", "--name", "t1", "data.dataset=digits", f"ray.storage_path={tmp_path}"]) == 2
        assert capsys.readouterr().err.startswith(f"deepindex train: error: train t1 is running now (pid {os.getpid()}")
    with running("train", "t1", str(tmp_path)):  # released at the end of the block
        pass
    # A holder SIGKILLed mid-run: the lock ends with it (no stale lock to clear by hand).
    code = ("import sys, time; from deepindex.restore import running\n"
            "with running('sweep', 's1', sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(RunInProgress, match=rf"^sweep s1 is running now \(pid {holder.pid} on "), \
                running("sweep", "s1", str(tmp_path)):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with running("sweep", "s1", str(tmp_path)):
        assert (tmp_path / "s1" / LOCK).read_text().startswith(f"pid {os.getpid()} ")
    monkeypatch.chdir(tmp_path)
    with running("sweep", "s1", "s3://bucket/runs"):  # remote storage: no lock, and no local folder "s3:"
        assert not (tmp_path / "s3:").exists()


def test_default_names_of_runs_started_in_the_same_second_differ(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: fmt.replace("%Y%m%d-%H%M%S", "20261206-101500"))
    names = [fresh_name("train", str(tmp_path)) for _ in range(3)]
    assert names == ["train-20261206-101500", "train-20261206-101500-2", "train-20261206-101500-3"]
    assert all((tmp_path / n).is_dir() for n in names)  # each name's folder is taken as it is given
    assert fresh_name("sweep", "s3://bucket/runs") == "sweep-20261206-101500"  # remote: the time alone
