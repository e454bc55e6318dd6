"""The best checkpoint of a Train run, picked from Ray's own bookkeeping: a diverged (NaN) epoch is never
the best while any kept epoch has a finite score.  Real Ray Train V2 objects (its checkpoint manager and
``Result``), with checkpoint folders in tmp_path: no cluster, no training."""
from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

import pytest

from deepindex.config import load_config
from deepindex.train.engine import primary_metric

NAN = float("nan")


def _result(tmp_path: Path, values: list[float], metric: str, mode: str, keep: int):
    """The ``Result`` Ray Train V2's controller builds for a run that reported ``metric`` = ``values`` with a
    checkpoint each epoch, under ``CheckpointConfig(num_to_keep=keep)`` scored as ``build_trainer`` scores."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext
    from ray.train.v2._internal.execution.training_report import _TrainingReport
    from ray.train.v2.api.result import Result

    async def register() -> CheckpointManager:  # the manager notifies its waiters on an event loop
        manager = CheckpointManager(CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=metric,
                                                     checkpoint_score_order=mode),
                                    StorageContext(storage_path=str(tmp_path), experiment_dir_name="run"))
        for epoch, value in enumerate(values):
            folder = tmp_path / "run" / f"checkpoint_{epoch}"
            folder.mkdir(parents=True)
            manager.register_checkpoint(_TrainingReport(Checkpoint(str(folder)), {metric: value, "epoch": epoch},
                                                        validation=False))
        return manager

    manager = asyncio.run(register())
    latest = manager.latest_checkpoint_result
    assert latest is not None
    # As ray.train.v2's controller builds the run's Result (TrainController._build_result).
    return Result(metrics=latest.metrics, checkpoint=latest.checkpoint, error=None, path=str(tmp_path / "run"),
                  best_checkpoints=[(r.checkpoint, r.metrics) for r in manager.best_checkpoint_results])


def _epoch(path: str) -> int:
    return int(Path(path).name.removeprefix("checkpoint_"))


def test_train_scores_the_best_finite_epoch_not_a_diverged_last_one(tmp_path, monkeypatch):
    """Found on review: val metric 0.60, 0.91, 0.88, then NaN (the last epoch diverged), all four kept.  Ray
    sorts the NaN first and Result.get_best_checkpoint's max/min keeps it: ``deepindex train`` test-scored,
    logged and offered for promotion the diverged model, and the audit's folds predicted with it."""
    import deepindex.cluster
    from deepindex.train import trainer

    cfg = load_config(None, [f"ray.storage_path={tmp_path / 'storage'}", "ray.keep_checkpoints=4"])
    metric, mode = primary_metric(cfg.multilabel)
    values = [0.60, 0.91, 0.88, NAN] if mode == "max" else [0.40, 0.09, 0.12, NAN]
    result = _result(tmp_path, values, metric, mode, keep=cfg.ray.keep_checkpoints)
    assert any(math.isnan(m[metric]) for _, m in result.best_checkpoints)  # Ray kept the diverged one

    monkeypatch.setattr(deepindex.cluster, "connect", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "build_trainer", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "fit", lambda _trainer, _name: result)
    out = trainer.train(cfg, name="diverged-last", evaluate_test=False)
    assert _epoch(out.checkpoint) == 1, out.checkpoint
    assert out.latest_checkpoint == result.checkpoint.path and _epoch(result.checkpoint.path) == 3


@pytest.mark.parametrize(("values", "mode", "keep", "best"), [
    ([0.60, 0.91, 0.88, NAN], "max", 4, 1),
    ([0.60, 0.91, 0.88, NAN], "max", 2, 1),  # the NaN latest falls outside the best 2 Ray hands back
    ([0.60, NAN], "max", 2, 0),  # the default keep_checkpoints, a 2-epoch run
    ([0.30, NAN], "min", 2, 0),
    ([NAN, 0.30, 0.20], "min", 3, 2),  # a NaN first epoch is no best either
    ([0.50, 0.70, 0.70], "max", 3, 1),  # a tie: the earlier epoch, as Ray's own pick
    ([0.50, math.inf, 0.70], "max", 3, 2),  # no infinite score either
])
def test_best_checkpoint_drops_non_finite_scores(tmp_path, values, mode, keep, best):
    from deepindex.train.trainer import best_checkpoint

    metric = "val_map" if mode == "max" else "val_top1_error"
    result = _result(tmp_path, values, metric, mode, keep)
    assert _epoch(best_checkpoint(result, metric, mode).path) == best


def test_with_no_finite_score_the_latest_checkpoint_stands(tmp_path, caplog):
    from deepindex.train.trainer import best_checkpoint

    result = _result(tmp_path, [NAN, NAN], "val_map", "max", keep=2)
    caplog.set_level(logging.WARNING, logger="deepindex.train.trainer")
    assert _epoch(best_checkpoint(result, "val_map", "max").path) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "train: no checkpoint has a finite val_map (training diverged): the latest stands as the best"]
    with pytest.raises(ValueError, match="mode 'best'"):
        best_checkpoint(result, "val_map", "best")
