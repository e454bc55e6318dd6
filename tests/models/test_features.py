"""Named feature points (descriptors for query by example), for every registered model."""
import numpy as np
import pytest
import torch

from deepindex.config import load_config
from deepindex.models import ConceptModel, build_model, min_input_size, registered_models

pytestmark = pytest.mark.timeout(120)

# Every registered CNN but the configurable ConvNet: each exposes pooled conv stages.
CNN_BACKBONES = [n for n in registered_models() if n not in ("convnet", "mlp")]


def _model(name: str, channels: int = 3) -> ConceptModel:
    cfg = load_config(None, [f"model.name={name}", f"data.channels={channels}"]).model
    torch.manual_seed(0)
    return build_model(cfg, num_concepts=7, in_channels=channels).eval()


@pytest.mark.parametrize("name", registered_models())
def test_every_model_gives_its_feature_points_from_one_pass(name):
    m = _model(name)
    points = m.feature_points()
    assert {"probs", "logits", "penultimate", "last_but_two"} <= set(points)
    # The first layer with weights: a convolution, or the MLP's first fully connected layer.
    first = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear))
    calls = []
    first.register_forward_hook(lambda *_: calls.append(1))
    size = max(32, min_input_size(name))  # AlexNet's pools need 63 px; the rest run at 32
    x = torch.randn(2, 3, size, size)  # (B, C, H, W)
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
        assert torch.allclose(single.sum(dim=1), torch.ones(2))
        assert torch.allclose(single, torch.softmax(f["logits"], 1))
    assert f["probs"].shape[1] == 7 and f["penultimate"].shape[1] == m.embed_dim
    # last_but_two is another layer: another width, or (VGG's two 4096 layers) other values.
    assert f["last_but_two"].shape != f["penultimate"].shape or not torch.allclose(f["last_but_two"], f["penultimate"])


@pytest.mark.parametrize("name", CNN_BACKBONES)
def test_torchvision_backbones_expose_pooled_stages(name):
    m = _model(name, channels=1)
    stages = [p for p in m.feature_points() if p.startswith("stage")]
    assert len(stages) >= 4
    size = max(32, min_input_size(name))
    with torch.no_grad():
        f = m.features(torch.randn(2, 1, size, size), [*stages, "last_but_two", "penultimate"])
    widths = [f[s].shape[1] for s in stages]
    assert widths[0] < widths[-1]  # deeper stages are wider in every torchvision family here
    if name.startswith(("resnet", "densenet")):  # the embedding is the last pooled stage
        assert torch.allclose(f[stages[-1]], f["penultimate"]) and torch.allclose(f["stage3"], f["last_but_two"])
    if name == "googlenet":  # so is GoogLeNet's; last_but_two is inception 5a, not a stage
        assert torch.allclose(f[stages[-1]], f["penultimate"]) and f["last_but_two"].shape[1] == 832


def _output_of(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``module`` hands on during ``model.embed(x)``, read by a forward hook."""
    seen = []
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.clone()))
    try:
        model.embed(x)
    finally:
        handle.remove()
    return seen[0]


# model -> (the module whose output last_but_two is, pooled or not, stage<N> -> the module whose output it is)
_TAPS = {
    # fc6 and its ReLU: the first 4096 layer (classifier[2] is the in-place ReLU after fc6)
    "alexnet": ("classifier.2", {"stage1": "features.2", "stage2": "features.5", "stage3": "features.7",
                                 "stage4": "features.9", "stage5": "features.12"}),
    "vgg16": ("classifier.1", {"stage1": "features.4", "stage5": "features.30"}),
    "vgg11_bn": ("classifier.1", {"stage1": "features.3", "stage5": "features.28"}),
    "googlenet": ("inception5a", {"stage1": "conv3", "stage2": "inception3b", "stage3": "inception4e",
                                  "stage4": "inception5b"}),
    "resnet18": ("layer3", {"stage1": "layer1", "stage4": "layer4"}),
    "densenet121": ("features.denseblock3", {"stage1": "features.denseblock1"}),
}


@pytest.mark.parametrize("name", sorted(_TAPS))
def test_backbone_points_are_the_layers_they_name(name):
    """last_but_two is the layer before the embedding, stage<N> the named stage's output, pooled."""
    m = _model(name, channels=1)
    size = max(32, min_input_size(name))
    x = torch.randn(2, 1, size, size)
    lb2, stages = _TAPS[name]
    net = m.body.net
    with torch.no_grad():
        f = m.features(x, ["last_but_two", *stages])
        for point, module in [("last_but_two", lb2), *stages.items()]:
            want = _output_of(m, net.get_submodule(module), x)
            want = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(want, 1), 1) if want.ndim == 4 else want
            assert torch.allclose(f[point], want, atol=1e-5), (point, module)
    if name in ("alexnet", "vgg16", "vgg11_bn"):  # fc6 and fc7: two 4096 layers
        assert f["last_but_two"].shape == (2, 4096)


def test_mlp_points_are_its_hidden_layers():
    cfg = load_config(None, ["model.name=mlp", "model.mlp_input_size=4", "model.mlp_hidden=[16,8,6]"]).model
    m = build_model(cfg, 3, 1).eval()
    assert m.feature_points() == ("probs", "logits", "penultimate", "last_but_two", "hidden1", "hidden2", "hidden3")
    x = torch.randn(5, 1, 20, 20)
    with torch.no_grad():
        f = m.features(x, ["hidden1", "hidden2", "hidden3", "last_but_two", "penultimate"])
        h, hidden = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 4), 1), []  # (B, 16): the input layer
        for i in range(3):
            h = torch.relu(m.body[2 + 2 * i](h))  # linear -> activation
            hidden.append(h)
        assert torch.allclose(f["penultimate"], m.embed(x))
    assert [f[f"hidden{i}"].shape[1] for i in (1, 2, 3)] == [16, 8, 6]
    for i in (1, 2, 3):
        assert torch.allclose(f[f"hidden{i}"], hidden[i - 1], atol=1e-6)
    # The embedding is the last hidden layer; last_but_two is the hidden layer before it.
    assert torch.allclose(f["penultimate"], f["hidden3"]) and torch.allclose(f["last_but_two"], f["hidden2"])


def test_mlp_with_one_hidden_layer_has_the_input_layer_before_it():
    cfg = load_config(None, ["model.name=mlp", "model.mlp_input_size=3", "model.mlp_hidden=[10]"]).model
    m = build_model(cfg, 3, 2).eval()
    x = torch.randn(4, 2, 12, 12)
    with torch.no_grad():
        f = m.features(x, ["last_but_two", "hidden1", "penultimate"])
    pixels = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 3), 1)  # (B, 2 * 3 * 3)
    assert torch.allclose(f["last_but_two"], pixels) and torch.allclose(f["hidden1"], f["penultimate"])
    linear = load_config(None, ["model.name=mlp", "model.mlp_hidden=[]"]).model  # pixels -> concepts
    assert "last_but_two" not in build_model(linear, 3, 1).feature_points()


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
    with pytest.raises(ValueError, match=r"unknown feature point.*'stage9'"):
        m.features(x, ["penultimate", "stage9"])
    with pytest.raises(ValueError, match=r"probs.*multilabel"):
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
