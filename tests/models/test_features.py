"""Named feature points (descriptors for query by example), for every registered model."""
import numpy as np
import pytest
import torch

from deepindex.config import load_config
from deepindex.models import build_model, registered_models

pytestmark = pytest.mark.timeout(120)


def _model(name: str, channels: int = 3):
    cfg = load_config(None, [f"model.name={name}", f"data.channels={channels}"]).model
    torch.manual_seed(0)
    return build_model(cfg, num_concepts=7, in_channels=channels).eval()


@pytest.mark.parametrize("name", registered_models())
def test_every_model_gives_its_feature_points_from_one_pass(name):
    m = _model(name)
    points = m.feature_points()
    assert {"probs", "logits", "penultimate", "last_but_two"} <= set(points)
    first_conv = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d))
    calls = []
    first_conv.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 32, 32)  # (B, C, H, W)
    with torch.no_grad():
        f = m.features(x, points, multilabel=True)
        assert len(calls) == 1  # every point from the same single pass
        assert list(f) == list(points)
        for n, v in f.items():
            assert v.ndim == 2 and v.shape[0] == 2 and torch.isfinite(v).all(), n
        # The named points are the layers the model already uses, not look-alikes.
        assert torch.allclose(f["penultimate"], m.embed(x), atol=1e-5)
        assert torch.allclose(f["logits"], m(x), atol=1e-5)
        assert torch.allclose(f["probs"], torch.sigmoid(f["logits"]))
        single = m.features(x, ["probs"], multilabel=False)["probs"]
        assert torch.allclose(single.sum(dim=1), torch.ones(2)) and torch.allclose(single, torch.softmax(f["logits"], 1))
    assert f["probs"].shape[1] == 7 and f["penultimate"].shape[1] == m.embed_dim
    # last_but_two is another layer: another width, or (VGG's two 4096 layers) other values.
    assert f["last_but_two"].shape != f["penultimate"].shape or not torch.allclose(f["last_but_two"], f["penultimate"])


@pytest.mark.parametrize("name", [n for n in registered_models() if n != "convnet"])
def test_torchvision_backbones_expose_pooled_stages(name):
    m = _model(name, channels=1)
    stages = [p for p in m.feature_points() if p.startswith("stage")]
    assert len(stages) >= 4
    with torch.no_grad():
        f = m.features(torch.randn(2, 1, 32, 32), stages + ["last_but_two", "penultimate"])
    widths = [f[s].shape[1] for s in stages]
    assert widths[0] < widths[-1]  # deeper stages are wider in every torchvision family here
    if name.startswith(("resnet", "densenet")):  # the embedding is the last pooled stage
        assert torch.allclose(f[stages[-1]], f["penultimate"]) and torch.allclose(f["stage3"], f["last_but_two"])


def test_convnet_last_but_two_is_the_pooled_last_conv_block():
    cfg = load_config(None, ["model.channels=[8,16]", "model.embed_dim=12"]).model
    m = build_model(cfg, 3, 1).eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        f = m.features(x, ["last_but_two", "penultimate"])
        pooled = m.body[:4](x)  # two blocks, global max pool, flatten: (B, 16)
    assert f["last_but_two"].shape == (4, 16) and torch.allclose(f["last_but_two"], pooled)
    assert f["penultimate"].shape == (4, 12)


def test_bad_feature_requests_name_the_problem():
    m = _model("convnet", 1)
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match="unknown feature point.*'stage9'"):
        m.features(x, ["penultimate", "stage9"])
    with pytest.raises(ValueError, match="probs.*multilabel"):
        m.features(x, ["probs"])
    with pytest.raises(ValueError, match="features"):
        m.features(x, [])


def test_infer_unit_features_match_the_old_return():
    from deepindex.checkpoint import LoadedModel
    from deepindex.data.transforms import NormStats
    from deepindex.index.embed import infer_unit

    cfg = load_config(None, ["model.channels=[8,16]", "model.embed_dim=12"])
    model = build_model(cfg.model, 10, 1).eval()
    lm = LoadedModel(model, cfg, NormStats((0.2,), (0.3,)), [str(i) for i in range(10)], True, 0, {})
    unit = np.random.default_rng(0).random((5, 1, 32, 32), dtype=np.float32)
    probs, emb = infer_unit(lm, unit)
    f = infer_unit(lm, unit, features=["probs", "penultimate", "last_but_two"])
    np.testing.assert_allclose(f["probs"], probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f["penultimate"], emb, rtol=1e-5, atol=1e-6)
    assert f["last_but_two"].dtype == np.float32 and f["last_but_two"].shape == (5, 16)
