"""What `train` and `promote` refuse before anything starts: CIFAR data that is not there (before Ray
starts, so a sweep does not fail every trial on it), and a registered model name MLflow would refuse."""
from __future__ import annotations

from pathlib import Path

import pytest

from deepindex.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_without_its_files_is_refused_before_ray_starts(dataset: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`train data.dataset=cifar10` started Ray and failed in every worker (with data.root=nope the failure policy
    retried it; a sweep failed every trial): the driver checks CIFAR's files as it checks an image folder's."""
    import ray

    ray.shutdown()  # whichever test ran before: this one asserts Ray did not start

    def no_ray(*a: object, **k: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr("deepindex.cluster.connect", no_ray)
    storage = tmp_path / "results"
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in ([], [f"data.root={empty}"], [f"data.root={tmp_path / 'nope'}"]):
        code = main(["train", f"data.dataset={dataset}", *root, f"ray.storage_path={storage}"])
        err = capsys.readouterr().err
        assert code == 2, err
        last = err.splitlines()[-1]
        assert last.startswith("deepindex train: error: data.root: "), err
        assert ("required for CIFAR" if not root else f"{dataset} files not found") in last, err
    assert not ray.is_initialized()


@pytest.mark.parametrize("model", ["bad/name", "", "a:b", " "])
def test_a_model_name_mlflow_refuses_is_refused_before_anything_is_registered(
        model: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`promote --run RID --model bad/name` failed in MLflow after scoring (`failed: RestException: ...`, exit 1);
    `--model ""` fell back to the run's own model name without a word."""
    def nothing(*a: object, **k: object) -> None:
        raise AssertionError(f"reached: {a}")

    for what in ("deepindex.workflows.promote", "deepindex.workflows.sync_pending",
                 "deepindex.tracking.registry.register_run", "deepindex.tracking.registry.download_run_checkpoint"):
        monkeypatch.setattr(what, nothing)
    assert main(["promote", "--run", "0123abcd", "--model", model]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"deepindex promote: error: --model: {model!r} "), err


@pytest.mark.parametrize("dataset", ["digit-scenes", "digits"])
def test_a_batch_the_generated_train_split_cannot_fill_is_refused_before_ray_starts(
        dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`train data.train_size=10` at the default batch of 128 was refused only once Ray had started (the audit
    refuses its folds' before Ray): the driver knows a generated split's size, so it checks it first."""
    import ray

    ray.shutdown()

    def no_ray(*a: object, **k: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr("deepindex.cluster.connect", no_ray)
    code = main(["train", f"data.dataset={dataset}", "data.train_size=10", f"ray.storage_path={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines()[-1].startswith("deepindex train: error: train.batch_size: 128 is more than the train "
                                           "split fills"), err
    assert not ray.is_initialized() and not (tmp_path / "r").exists()
