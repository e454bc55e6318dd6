"""What an audit refuses before Ray starts and before its name is taken, what it advises when folds fail,
and how its warnings read.  No Ray, no training: each test takes seconds."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deepindex.cli import main
from deepindex.config import ConfigError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _no_ray_yet() -> None:
    """These tests assert that Ray did not start: so it is not running when they begin."""
    import ray

    ray.shutdown()


def test_folds_too_small_for_a_batch_are_refused_before_ray_starts_and_take_no_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """data.train_size=10 at the default batch of 128: every fold failed on train.batch_size after the cluster
    started, and the audit said to run it again under the same name, where a smaller batch is refused."""
    import ray

    storage = tmp_path / "results"
    for name in (["--name", "tiny"], []):
        assert main(["data", "audit", *name, f"ray.storage_path={storage}", "data.train_size=10"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["deepindex data: error: train.batch_size: 128 is more than the train split fills (64 a worker; "
                       "each worker holds 4 of the 8 items): no training step would run; set train.batch_size <= 8 "
                       "(each of the audit's 5 folds trains on about 8 of the 10 train items: every item but its own "
                       "fold's)"], err
        assert not storage.exists() and not ray.is_initialized()
    # Fewer train items than folds: the same place, the same way.
    assert main(["data", "audit", "--name", "tiny", f"ray.storage_path={storage}", "data.train_size=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deepindex data: error: audit.folds: 5 folds need at least 5 train items, there are 3"], err
    assert not storage.exists() and not ray.is_initialized()


def _img(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10), value, dtype=np.uint8), mode="L").save(path)


def test_a_file_collection_too_small_for_the_folds_records_no_audit(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A file collection's train items are known once it is read: refused then, still before Ray starts, and
    before the audit's definition is recorded (the same name with a smaller batch is a new audit, not a change)."""
    import ray

    from deepindex.restore import AUDIT_STATE

    for c, v in (("cat", 20), ("dog", 140)):
        for i in range(12):
            _img(tmp_path / "imgs" / c / f"{i}.png", v + 3 * i)
    storage = tmp_path / "results"
    assert main(["data", "audit", "--name", "few", f"ray.storage_path={storage}", "data.dataset=image-folder",
                 f"data.root={tmp_path / 'imgs'}", "data.image_size=16", "ray.num_workers=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepindex data: error: train.batch_size: 128 is more than the train "
                                               "split fills: no training step would run; set train.batch_size <= "), err
    assert "folds trains on about" in err[0], err
    assert not (storage / "few" / AUDIT_STATE).exists() and not ray.is_initialized()


def test_folds_that_failed_on_their_config_are_not_resumed_under_the_same_name() -> None:
    from deepindex.audit.run import failed_folds

    class RayTaskErrorLike(Exception):  # what a Tune trial's error is: it wraps the fold's own as .cause
        def __init__(self, cause: BaseException) -> None:
            super().__init__(f"Traceback (most recent call last):\n  ...\n{type(cause).__name__}: {cause}")
            self.cause = cause

    config = RayTaskErrorLike(ConfigError("train.batch_size: 128 is more than the train split fills"))
    said = failed_folds("a1", [0, 1], 2, [config, config])
    assert said == ("audit a1: folds [1, 2] of 2 did not finish (ConfigError: train.batch_size: 128 is more than the "
                    "train split fills); fix the config and run it under another --name (this name keeps the config "
                    "it started with)")
    crash = RayTaskErrorLike(RuntimeError("worker died"))
    assert failed_folds("a1", [1], 2, [crash]).endswith("(RuntimeError: worker died); run it again with the same "
                                                        "name to resume")
    assert failed_folds("a1", [1], 2, []) == "audit a1: folds [2] of 2 did not finish; run it again with the same " \
                                             "name to resume"


def test_the_audits_warnings_are_sentences_of_their_own() -> None:
    """The weak-folds and weak-model warnings ran together in the summary, the JSON and audit.json:
    "... and audit again 226 of 300 items (75 %) have a suspect label ..."."""
    from deepindex.audit.report import combine_warnings, weak_folds_warning, weak_model_warning

    folds = weak_folds_warning([0.71875, 0.28125, 0.03125], 0.65625, multilabel=False)
    flagged = np.zeros((300, 3), dtype=bool)
    flagged[:226, 0] = True
    model = weak_model_warning(SimpleNamespace(flagged=flagged), 0.31)  # type: ignore[arg-type]
    assert folds is not None and model is not None
    both = combine_warnings(folds, model)
    assert both == f"{folds}. {model}."
    assert "and audit again. 226 of 300 items (75 %) have a suspect label" in both
    assert combine_warnings(None, model) == f"{model}."
    assert combine_warnings("Done.", None) == "Done."
    assert combine_warnings(None, None) is None
