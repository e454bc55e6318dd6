"""A resume refused for its schedule names the schedule, not the run's own train.epochs as "unset"."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepindex.config import load_config
from deepindex.restore import TRAIN_STATE, ChangedOnRestore


def _started(tmp_path: Path, name: str, *overrides: str):
    """A run ``name`` claimed with ``overrides`` that has a checkpoint to resume from (Ray Train's run state is a
    stand-in file of its shape, as in tests/test_restore.py)."""
    from deepindex.train.trainer import RAY_TRAIN_STATE, claim_run

    cfg = load_config(None, ["data.dataset=digits", f"ray.storage_path={tmp_path}", *overrides])
    claim_run(cfg, name)
    (tmp_path / name / RAY_TRAIN_STATE).write_text('{"latest_checkpoint_result": {"metrics": {"epoch": 0}}}')
    return cfg


def test_a_step_run_resumed_with_cosine_is_refused_for_its_schedule_not_its_epochs(tmp_path: Path) -> None:
    """`train --name t1 train.epochs=2` then the same with `optim.lr=0.1 schedule.policy=cosine` said
    `train.epochs="unset" (now 2)`: the step run's definition left its epochs out."""
    from deepindex.train.trainer import claim_run

    cfg = _started(tmp_path, "t1", "train.epochs=2", "schedule.policy=step")
    with pytest.raises(ChangedOnRestore) as e:
        claim_run(cfg.override({"optim.lr": 0.1, "schedule.policy": "cosine"}), "t1")
    msg = str(e.value)
    assert 'schedule.policy="step" (now "cosine")' in msg and "optim.lr=" in msg and "train.epochs" not in msg, msg
    # More epochs still continue a step run, and a cosine run resumed with other epochs is refused for them.
    claim_run(cfg.override({"train.epochs": 6}), "t1")
    with pytest.raises(ChangedOnRestore, match=r" with schedule\.policy=\"step\" \(now \"cosine\"\), "
                                               r"train\.epochs=2 \(now 6\): "):
        claim_run(cfg.override({"train.epochs": 6, "schedule.policy": "cosine"}), "t1")
    cosine = _started(tmp_path, "t2", "train.epochs=2", "schedule.policy=cosine")
    with pytest.raises(ChangedOnRestore, match=r" with schedule\.policy=\"cosine\" \(now \"step\"\), "
                                               r"train\.epochs=2 \(now 6\): "):
        claim_run(cosine.override({"train.epochs": 6, "schedule.policy": "step"}), "t2")


def test_a_definition_recorded_without_train_epochs_still_resumes(tmp_path: Path) -> None:
    """A step run recorded before train.epochs always was: it resumes with more epochs, and a cosine resume is
    refused for its schedule alone."""
    from deepindex.train.trainer import claim_run

    cfg = _started(tmp_path, "old", "train.epochs=2")
    state = tmp_path / "old" / TRAIN_STATE
    doc = json.loads(state.read_text())
    del doc["definition"]["train.epochs"]
    state.write_text(json.dumps(doc))
    claim_run(cfg, "old")
    claim_run(cfg.override({"train.epochs": 5}), "old")
    with pytest.raises(ChangedOnRestore) as e:
        claim_run(cfg.override({"schedule.policy": "cosine"}), "old")
    assert "schedule.policy=" in str(e.value) and "train.epochs" not in str(e.value), str(e.value)
