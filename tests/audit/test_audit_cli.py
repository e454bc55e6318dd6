"""``deepindex data audit`` / ``deepindex submit audit`` / ``data.label_filter``, and the data of
``train`` and ``tune``: one-line errors naming the field, before any Ray cluster starts."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from deepindex.cli import main


def _ray_started() -> bool:
    import ray

    return ray.is_initialized()


@pytest.fixture(autouse=True)
def _no_ray_yet() -> None:
    """These tests assert that a command failed before it started Ray: so Ray is not running when they
    begin, whichever test ran before (the session's cluster starts again on its next use)."""
    import ray

    ray.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", [
    (["audit.folds=1"], "audit.folds: Input should be greater than or equal to 2"),
    (["audit.fold=3"], "audit.fold: unknown key"),
    (["audit.filter_by=vibes"], "audit.filter_by: Input should be"),
    (["data.label_noise=-0.1"], "data.label_noise: Input should be greater than or equal to 0"),
    (["data.label_filter=/nowhere"], "data.label_filter: an audit audits the given labels; drop the filter"),
    (["data.cv_folds=3"], "data.cv_folds: the audit sets the folds itself (use audit.folds)"),
    (["audit.folds"], "audit.folds: an override must look like key=value"),
])
def test_audit_refuses_bad_input_with_one_line_naming_the_field(args: list[str], message: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "audit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"deepindex data: error: {message}"), err
    assert not _ray_started()


@pytest.mark.timeout(60)
def test_training_refuses_a_missing_or_foreign_audit_report_before_ray_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", f"data.label_filter={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"deepindex train: error: data.label_filter: no audit report at {tmp_path / 'nowhere'} "
                   "(a folder with suspects.csv)"]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "suspects.csv").write_text("rank,index,item,concept\n")
    (tmp_path / "r" / "audit.json").write_text(json.dumps({"data": {"train_size": 7}}))
    assert main(["train", f"data.label_filter={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.label_filter: the audit" in err[0] and "was made for data." in err[0], err
    assert not _ray_started()


@pytest.mark.timeout(60)
def test_submit_audit_runs_the_audit_job(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--dry-run", "audit", "--name", "a1", "audit.folds=3", "data.label_noise=0.3"]) == 0
    sub = json.loads(capsys.readouterr().out)
    assert sub["entrypoint"] == "python jobs/audit.py --name a1 audit.folds=3 data.label_noise=0.3"
    assert sub["runtime_env"]["py_modules"][0].endswith("platform/deepindex")


@pytest.mark.timeout(60)
def test_noise_robust_loss_sweep_loads_over_the_loss_keys() -> None:
    from deepindex.tune.space import load_space

    spec = load_space(Path(__file__).resolve().parents[2] / "tune_configs" / "noisy_labels.yaml")
    assert spec.space["train.bootstrap"].args == ["none", "soft", "hard"]
    assert spec.base.data.label_noise == 0.3 and spec.settings.search == "grid"


@pytest.mark.timeout(60)
def test_a_filter_naming_an_audit_run_needs_a_tracking_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "data.label_filter=runs:/0123abcd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deepindex train: error: data.label_filter: tracking: no MLflow server "
                   "(set MLFLOW_TRACKING_URI or run `deepindex up`)"], err
    assert not _ray_started()


@pytest.mark.timeout(60)
def test_an_audit_with_its_tracking_server_down_runs_untracked_after_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    from deepindex.config import load_config
    from deepindex.net import free_port
    from deepindex.tracking.audit import open_audit_run

    cfg = load_config(None, ["audit.folds=3"])
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="deepindex.tracking"):
        assert open_audit_run(cfg, "a1", uri, recorded=None) is None
        assert open_audit_run(cfg, "a1", uri, recorded="0123abcd") is None
    assert [r.getMessage() for r in caplog.records] == [
        f"MLflow server {uri} is unreachable: the audit a1 runs untracked; its report stays on the Ray storage path"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["train"], ["tune", "--space", "smoke"]])
def test_train_and_tune_refuse_missing_data_before_ray_starts(command: list[str], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep used to start the cluster and fail every trial on the same missing folder."""
    cases = [(["data.dataset=image-folder", f"data.root={tmp_path / 'nowhere'}"],
              f"data.root: no such folder {tmp_path / 'nowhere'}"),
             (["data.dataset=image-folder", f"data.root={tmp_path / 'nowhere'}", "data.channels=3",
               "data.image_size=32"],  # nothing left to infer from the files: they are checked all the same
              f"data.root: no such folder {tmp_path / 'nowhere'}"),
             (["data.dataset=manifest", f"data.manifest={tmp_path / 'tags.csv'}"],
              "data.root: required for a manifest (paths in it are relative to the root)"),
             (["data.dataset=manifest", f"data.manifest={tmp_path / 'tags.csv'}", f"data.root={tmp_path}"],
              f"data.manifest: no such file {tmp_path / 'tags.csv'}")]
    for overrides, message in cases:
        assert main([*command, *overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"deepindex {command[0]}: error: {message}"], err
    assert not _ray_started()
