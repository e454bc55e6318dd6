import pytest
import torch

from deepindex.config import load_config
from deepindex.models import build_model, min_input_size, registered_models
from deepindex.models.backbones import load_local_weights


def test_registry_holds_the_promised_models():
    assert {"convnet", "resnet18", "resnet50", "vgg11_bn", "densenet121"} <= set(registered_models())
    assert {"alexnet", "googlenet", "vgg16", "mlp"} <= set(registered_models())  # the seed's classics


@pytest.mark.parametrize("name", registered_models())
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_gives_logits_and_embeddings(name, channels):
    cfg = load_config(None, [f"model.name={name}", f"data.channels={channels}"]).model
    torch.manual_seed(0)
    m = build_model(cfg, num_concepts=7, in_channels=channels).eval()
    size = max(32, min_input_size(name))  # AlexNet's pools need 63 px; the rest run at 32
    x = torch.randn(2, channels, size, size)  # (B, C, H, W)
    with torch.no_grad():
        logits, emb = m.forward_with_embedding(x)
        assert logits.shape == (2, 7) and emb.shape == (2, m.embed_dim)
        assert torch.allclose(m(x), logits) and torch.allclose(m.embed(x), emb)
    # The head is the concept layer, so it can get its own learning rate.
    assert m.head.out_features == 7


@pytest.mark.parametrize("act", ["relu", "prelu", "tanh", "sigmoid"])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_convnet_variants_train_a_step(act, pool):
    cfg = load_config(None, [f"model.activation={act}", f"model.pool={pool}", "model.channels=[4,8]"]).model
    m = build_model(cfg, 3, 1)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    loss = torch.nn.functional.cross_entropy(m(x), y)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_stochastic_depth_drops_branches_in_training_only():
    cfg = load_config(None, ["model.name=resnet18", "model.stochastic_depth=0.9"]).model
    torch.manual_seed(0)
    m = build_model(cfg, 3, 1)
    x = torch.randn(4, 1, 32, 32)
    m.eval()
    with torch.no_grad():
        a, b = m(x), m(x)
    assert torch.allclose(a, b)  # eval: deterministic
    m.train()
    with torch.no_grad():
        c, d = m.embed(x), m.embed(x)
    assert not torch.allclose(c, d)  # train: branches dropped at random


def test_local_weights_transfer_skips_the_head(tmp_path):
    cfg = load_config(None, ["model.name=resnet18"]).model
    src = build_model(cfg, 10, 3)
    torch.save(src.body.net.state_dict(), tmp_path / "tv.pth")  # torchvision-style keys
    dst = build_model(cfg, 4, 1)  # other concept count and channel count
    n = load_local_weights(dst, tmp_path / "tv.pth")
    assert n > 50
    assert torch.equal(dst.body.net.layer1[0].conv1.weight, src.body.net.layer1[0].conv1.weight)
    assert dst.body.net.conv1.weight.shape[1] == 1  # mismatched first conv kept, not forced


def test_weights_file_must_exist(tmp_path):
    cfg = load_config(None, ["model.name=resnet18", f"model.weights={tmp_path / 'none.pth'}"]).model
    with pytest.raises(FileNotFoundError, match=r"model\.weights"):
        build_model(cfg, 3, 3)
