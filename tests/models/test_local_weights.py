"""``model.weights`` files (torchvision's and ours) against ``model.pretrained``, and checkpoints
that lack what a rebuild reads.  Every weights file is made here: nothing is downloaded."""
import pytest
import torch
from torchvision import models as tvm

from deepindex.checkpoint import load_model, read_checkpoint, save_checkpoint
from deepindex.config import load_config
from deepindex.data.transforms import imagenet_stats
from deepindex.models import build_model
from deepindex.models.transfer import expects_imagenet_input, weights_path

_GOOGLENET = ["model.name=googlenet", "data.channels=3", "data.image_size=64"]


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _torchvision_googlenet_file(path):
    """What torchvision publishes for GoogLeNet (with its aux heads' tensors), from a seeded random init."""
    torch.manual_seed(123)
    sd = tvm.googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


@pytest.mark.timeout(120)
def test_googlenet_from_a_local_torchvision_file_is_fed_as_from_imagenet_weights(torch_home, tmp_path, one_thread):
    """torchvision's GoogLeNet weights as model.weights (model.pretrained off) were built without
    transform_input: the net saw ImageNet-normalised input where its weights expect (x - 0.5) / 0.5."""
    local = _torchvision_googlenet_file(tmp_path / "googlenet-local.pth")
    _torchvision_googlenet_file(weights_path("googlenet"))  # the same weights, as model.pretrained reads them
    cfg = load_config(None, [*_GOOGLENET, f"model.weights={local}"])
    pre = build_model(load_config(None, [*_GOOGLENET, "model.pretrained=imagenet"]).model, 3, 3).eval()
    m = build_model(cfg.model, 3, 3).eval()
    assert pre.body.net.transform_input and m.body.net.transform_input
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = pre.features(x, ["stage1", "penultimate"])
        got = m.features(x, ["stage1", "penultimate"])
        assert all(torch.equal(got[k], want[k]) for k in want)  # the same net, fed the same way
        m.body.set_transform_input(False)
        assert not torch.equal(m.features(x, ["stage1"])["stage1"], want["stage1"])  # what it used to compute
        m.body.set_transform_input(True)
    # The config does not say it: a checkpoint of that model keeps it when rebuilt without the file ...
    save_checkpoint(tmp_path / "ck", model=m, config=cfg, stats=imagenet_stats(3), concepts=["a", "b", "c"],
                    multilabel=True, epoch=0)
    local.unlink()
    lm = load_model(tmp_path / "ck")
    assert lm.model.body.net.transform_input
    with torch.no_grad():
        assert torch.equal(lm.model.embed(x), m.embed(x))
    # ... and so does the next model fine-tuned from that checkpoint (model.weights of ours).
    again = build_model(load_config(None, [*_GOOGLENET, f"model.weights={tmp_path / 'ck'}/checkpoint.pt"]).model, 5, 3)
    assert again.body.net.transform_input


@pytest.mark.timeout(120)
def test_googlenet_local_file_input_transform_follows_the_file(tmp_path, one_thread):
    """Only torchvision's files turn transform_input on, and only for RGB input (as model.pretrained)."""
    tv = _torchvision_googlenet_file(tmp_path / "tv.pth")
    gray = build_model(load_config(None, ["model.name=googlenet", f"model.weights={tv}"]).model, 3, 1)
    assert not gray.body.net.transform_input  # transform_input maps RGB: off for one channel, as with ImageNet's
    scratch = build_model(load_config(None, ["model.name=googlenet"]).model, 3, 3)
    torch.save(scratch.state_dict(), tmp_path / "ours.pth")  # a model of ours trained without it
    ours = build_model(load_config(None, ["model.name=googlenet", f"model.weights={tmp_path / 'ours.pth'}"]).model,
                       3, 3)
    assert not ours.body.net.transform_input
    # A checkpoint written before the flag was in the state dict: the rebuilt model keeps what its config says.
    old = {k: v for k, v in scratch.state_dict().items() if k != "body.transform_input"}
    pre_cfg = load_config(None, ["model.name=googlenet", "model.pretrained=imagenet"]).model
    for model_cfg, on in ((load_config(None, ["model.name=googlenet"]).model, False), (pre_cfg, True)):
        m = build_model(model_cfg, 3, 3, load_weights=False)
        m.load_state_dict(old)  # strict: no missing key
        assert m.body.net.transform_input is on


def test_a_local_torchvision_file_expects_imagenet_normalisation_as_pretrained_weights_do(tmp_path):
    """What data.normalize left unset should resolve to (data.inspect.resolve_config): ImageNet's mean
    and std for ImageNet weights, whether model.pretrained reads them or model.weights names them."""
    tv = tmp_path / "resnet18-local.pth"
    torch.save(tvm.resnet18(weights=None).state_dict(), tv)
    ours = tmp_path / "ours.pth"
    torch.save(build_model(load_config(None, ["model.name=resnet18"]).model, 3, 3).state_dict(), ours)

    def expects(*overrides: str) -> bool:
        return expects_imagenet_input(load_config(None, ["model.name=resnet18", *overrides]).model)

    assert expects("model.pretrained=imagenet") and expects(f"model.weights={tv}")
    assert not expects() and not expects(f"model.weights={ours}")


_TINY = ["model.channels=[4]", "model.embed_dim=8", "data.channels=1", "data.image_size=32", "data.preset=digit"]


def _tiny_checkpoint(tmp_path, drop: str):
    cfg = load_config(None, _TINY)
    path = save_checkpoint(tmp_path / "ck", model=build_model(cfg.model, 2, 1), config=cfg,
                           stats=imagenet_stats(1), concepts=["a", "b"], multilabel=False, epoch=0)
    state = torch.load(path, weights_only=True)
    del state[drop]
    torch.save(state, path)
    return cfg, path


def test_a_checkpoint_without_concepts_is_one_line_naming_the_file(tmp_path):
    """load_model (serving, indexing, evaluation) failed with a bare KeyError: 'concepts'."""
    _, path = _tiny_checkpoint(tmp_path, "concepts")
    for read in (load_model, read_checkpoint):
        with pytest.raises(ValueError) as e:
            read(tmp_path / "ck")
        msg = str(e.value)
        assert msg.startswith(f"checkpoint: {path} has no concepts (a deepindex checkpoint holds "), msg
        assert "\n" not in msg


def test_a_checkpoint_without_concepts_still_gives_backbone_weights(tmp_path):
    """As model.weights only its model is read: no concepts needed."""
    _, path = _tiny_checkpoint(tmp_path, "concepts")
    m = build_model(load_config(None, [*_TINY, f"model.weights={path}"]).model, 5, 1)
    src = torch.load(path, weights_only=True)["model"]
    assert torch.equal(m.body[0][0].weight, src["body.0.0.weight"])
