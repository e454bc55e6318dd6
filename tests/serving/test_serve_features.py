"""`features` (the descriptors the service's indexes hold) checked against the model before anything deploys,
by the one check `deepindex index build` makes (deepindex.index.build.index_features).  Found on review:
`deepindex serve --arg 'features=[bogus]'` printed "service ready", exited 0 and replaced a working service
with one whose every index build failed, retried forever, every search a 503."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def small_model(tmp_path: Path, tiny_cfg) -> Path:
    """An untrained checkpoint of the tiny ConvNet: which descriptors a model has needs no training."""
    from deepindex.checkpoint import save_checkpoint
    from deepindex.data.transforms import NormStats
    from deepindex.models import build_model

    return save_checkpoint(tmp_path / "model", model=build_model(tiny_cfg.model, 10, 1), config=tiny_cfg,
                           stats=NormStats((0.1,), (0.2,)), concepts=[str(i) for i in range(10)], multilabel=True,
                           epoch=0, metrics={})


def test_build_app_refuses_a_descriptor_the_model_lacks_as_index_build_does(small_model: Path) -> None:
    from deepindex.checkpoint import load_model
    from deepindex.index.build import check_features, index_features
    from serving.app import build_app

    known = load_model(small_model).model.feature_points()
    with pytest.raises(ValueError) as built:
        index_features(["bogus"], known)  # what build_index raises
    message = str(built.value)
    assert message.startswith("features: 'bogus' is not a descriptor of this model; choose from penultimate")
    with pytest.raises(ValueError) as served:
        build_app({"model": str(small_model), "api_token_file": None, "features": ["bogus"]})
    assert str(served.value) == message
    # probs alone (by its mission name) is no descriptor to keep: one line, the model's descriptors named.
    with pytest.raises(ValueError, match=r"^features: probs \(output\) is in every index; list the descriptors "
                                         r"to keep beside it \(penultimate"):
        build_app({"model": str(small_model), "api_token_file": None, "features": ["output"]})
    # What the model has passes, by either name; the default needs no model at all.
    assert check_features(["last_but_one", "last_but_two", "probs"], str(small_model)) == ["penultimate",
                                                                                             "last_but_two"]
    assert check_features(None, "/no/such/model.pt") == ["penultimate"]
    build_app({"model": str(small_model), "api_token_file": None, "features": ["penultimate", "last_but_two"]})


def test_serve_refuses_it_in_one_line_exit_2_before_it_connects(small_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before the command connects to a cluster: a running application is left as it is."""
    import deepindex.cluster
    from deepindex.cli import main

    def never(*args: object, **kw: object) -> None:
        raise AssertionError("serve connected to a cluster for args it refuses")

    monkeypatch.setattr(deepindex.cluster, "connect", never)
    assert main(["serve", "--model", str(small_model), "--arg", "features=[bogus]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepindex serve: error: features: 'bogus' is not a descriptor of this model; choose "
                          "from penultimate") and err.count("\n") == 1, err
