"""Options refused in one line naming them, before anything is made, loaded or started: the numbers of
``evaluate-retrieval`` and the ``--name`` of a training run, a sweep and an audit."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deepindex.cli import main

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Any model evaluate-retrieval would resolve or load is recorded and refused instead."""
    calls: list[Any] = []

    def refuse(*a: Any, **k: Any) -> Any:
        calls.append(a)
        raise AssertionError(f"a model was loaded: {a}")

    monkeypatch.setattr("deepindex.tracking.registry.resolve_model", refuse)
    monkeypatch.setattr("deepindex.checkpoint.load_model", refuse)
    return calls


@pytest.mark.parametrize(("argv", "message"), [
    (["--size", "-1"], "argument --size: must be >= 1, not -1"),
    (["--size", "0"], "argument --size: must be >= 1, not 0"),
    (["--k", "0"], "argument --k: must be >= 1, not 0"),
    (["--queries-per-concept", "0"], "argument --queries-per-concept: must be >= 1, not 0"),
    (["--queries-per-concept", "many"], "argument --queries-per-concept: 'many' is not a whole number"),
    (["--seed", "-1"], "argument --seed: must be >= 0, not -1"),  # was numpy's "expected non-negative integer"
])
def test_evaluate_retrieval_names_a_bad_number_before_any_model_loads(
        no_model: list[Any], capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["evaluate-retrieval", "--model", "nowhere.pt", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"deepindex evaluate-retrieval: error: {message}", err
    assert no_model == []


def test_evaluate_retrieval_needs_a_gallery_larger_than_k(no_model: list[Any],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate-retrieval", "--model", "nowhere.pt", "--size", "10", "--k", "10"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["deepindex evaluate-retrieval: error: --size: the gallery of 10 items needs more "
                                "than --k 10 (each query is ranked against the others): give --size 11 or more"], err
    assert no_model == []


# ---- a run's name is one folder under the storage path ---------------------------------------------
COMMANDS = [["train"], ["tune", "--space", "smoke"], ["data", "audit"]]


@pytest.mark.parametrize("command", COMMANDS, ids=["train", "tune", "audit"])
@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "{tmp}/abs/x", "a b", ""])
def test_a_name_that_is_not_one_folder_is_refused_before_anything_is_made(
        command: list[str], name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`data audit --name ../../escape` wrote the audit outside the storage path, `--name bad/name` made nested
    folders: a training run's, sweep's and audit's name is checked as a collection's is."""
    import ray

    ray.shutdown()  # whichever test ran before: this one asserts Ray did not start
    name = name.format(tmp=tmp_path)  # an absolute path: Path(storage) / name is that path
    storage = tmp_path / "deep" / "results"
    with pytest.raises(SystemExit) as e:
        main([*command, "--name", name, f"ray.storage_path={storage}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    prog = "data audit" if command[0] == "data" else command[0]
    assert err.splitlines()[-1] == (f"deepindex {prog}: error: argument --name: {name!r} must be 1-100 "
                                    "characters of A-Z a-z 0-9 . _ -, starting with a letter or digit (a run's name "
                                    "is its folder under the storage path)"), err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "abs").exists() and not ray.is_initialized()


@pytest.mark.parametrize("name", ["r1", "example-photos", "train-20261206-101500-2", "v1.2_final", "007"])
def test_names_of_letters_digits_and_dot_dash_underscore_pass(name: str) -> None:
    from deepindex.cli import build_parser, parse

    for command in COMMANDS:
        assert parse(build_parser(), [*command, "--name", name]).name == name


def test_a_name_from_the_config_is_checked_before_its_folder_is_made(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """ray.name names a training run or an audit as --name does: the same check, where the run's folder is
    made (deepindex.restore.running), before Ray starts."""
    import ray

    ray.shutdown()
    storage = tmp_path / "deep" / "results"
    for command in (["train"], ["data", "audit"]):
        assert main([*command, "ray.name=../x", f"ray.storage_path={storage}"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [f"deepindex {command[0]}: error: --name (or ray.name): '../x' must be 1-100 "
                                    "characters of A-Z a-z 0-9 . _ -, starting with a letter or digit (a run's name "
                                    "is its folder under the storage path)"], err
    assert not (tmp_path / "deep").exists() and not ray.is_initialized()
