"""deepindex.index.embed.optimized_forward: the traced, inference-optimized graph a serving replica
runs answers as the eager model does, at any batch size; a model it cannot trace, or whose graph
answers otherwise, keeps the eager forward."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from deepindex.checkpoint import LoadedModel, load_model
from deepindex.index.embed import infer_unit, optimized_forward

pytestmark = pytest.mark.timeout(120)


def _units(lm: LoadedModel, b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((b, lm.channels, lm.image_size, lm.image_size), dtype=np.float32)


@pytest.mark.parametrize("names", [("probs",), ("probs", "penultimate", "last_but_two", "logits")])
def test_the_graph_answers_as_the_model_at_every_batch_size(small_model: Path, names: tuple[str, ...]) -> None:
    lm = load_model(small_model)
    forward, optimized = optimized_forward(lm, names)
    assert optimized
    for b in (1, 5, 32):  # traced at 4: the graph is not tied to its batch size
        unit = _units(lm, b, seed=b)
        got, want = forward(unit), infer_unit(lm, unit, names)
        assert list(got) == list(names)
        for n in names:
            assert got[n].dtype == np.float32 and got[n].shape == want[n].shape
            np.testing.assert_allclose(got[n], want[n], atol=1e-5)


def test_a_graph_that_answers_otherwise_leaves_the_eager_forward(small_model: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A forward that branches in Python on the batch size: the trace keeps the branch it saw (batch 4)."""
    lm = load_model(small_model)
    features = lm.model.features

    def branchy(x: torch.Tensor, names: list[str], *, multilabel: bool | None = None) -> dict[str, torch.Tensor]:
        out = features(x, names, multilabel=multilabel)
        return {k: v * 2 if x.shape[0] == 4 else v for k, v in out.items()}

    lm.model.features = branchy  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="deepindex.index.embed"):
        forward, optimized = optimized_forward(lm, ("probs",))
    assert not optimized
    assert "answers otherwise than the model at batch size 1" in caplog.text
    for b in (1, 4):
        unit = _units(lm, b)
        np.testing.assert_array_equal(forward(unit)["probs"], infer_unit(lm, unit, ["probs"])["probs"])


def test_a_model_the_tracer_cannot_take_serves_eagerly(small_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A forward with an operation the tracer refuses (here: raised only while tracing)."""
    lm = load_model(small_model)
    features = lm.model.features

    def untraceable(x: torch.Tensor, names: list[str], *, multilabel: bool | None = None) -> dict[str, torch.Tensor]:
        if torch.jit.is_tracing():
            raise RuntimeError("this operation cannot be traced")
        return features(x, names, multilabel=multilabel)

    lm.model.features = untraceable  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="deepindex.index.embed"):
        forward, optimized = optimized_forward(lm, ("probs", "penultimate"))
    assert not optimized and "not optimized (RuntimeError: this operation cannot be traced)" in caplog.text
    unit = _units(lm, 3)
    got, want = forward(unit), infer_unit(lm, unit, ["probs", "penultimate"])
    assert list(got) == ["probs", "penultimate"]
    for n in got:
        np.testing.assert_array_equal(got[n], want[n])


def test_optimize_false_is_the_eager_forward(small_model: Path) -> None:
    """What the benchmarks time as the plain model call: infer_unit itself, not a graph."""
    lm = load_model(small_model)
    forward, optimized = optimized_forward(lm, ("probs", "penultimate"), optimize=False)
    assert not optimized
    unit = _units(lm, 3)
    got, want = forward(unit), infer_unit(lm, unit, ["probs", "penultimate"])
    for n in ("probs", "penultimate"):
        np.testing.assert_array_equal(got[n], want[n])
