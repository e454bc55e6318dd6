"""ImageNet weights from torch's cache (a locally built file: nothing is downloaded), freezing,
the linear probe, unfreezing."""
import pytest
import torch
from torchvision import models as tvm

from deepindex.config import ConfigError, load_config
from deepindex.models import build_model
from deepindex.models.transfer import apply_freeze, keep_frozen_in_eval, unfreeze, weights_path


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _fake_imagenet_file(name: str, factory) -> dict:
    """What torchvision would download, built locally from a seeded random init."""
    torch.manual_seed(123)
    sd = factory(weights=None).state_dict()
    path = weights_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


@pytest.mark.timeout(120)
def test_pretrained_weights_come_from_torch_home(torch_home):
    sd = _fake_imagenet_file("resnet18", tvm.resnet18)
    assert weights_path("resnet18") == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cfg = load_config(None, ["model.name=resnet18", "model.pretrained=imagenet"]).model
    m = build_model(cfg, 4, 3)
    assert torch.equal(m.body.net.layer3[1].conv2.weight, sd["layer3.1.conv2.weight"])
    assert torch.equal(m.body.net.bn1.running_var, sd["bn1.running_var"])
    assert m.head.out_features == 4  # the ImageNet classifier is never loaded
    gray = build_model(cfg, 4, 1)  # one channel: the RGB kernels summed
    assert torch.allclose(gray.body.net.conv1.weight, sd["conv1.weight"].sum(dim=1, keepdim=True))


@pytest.mark.timeout(60)
def test_missing_weights_offline_fail_in_one_line_naming_file_and_folder(torch_home, monkeypatch):
    # Offline, made certain: every HTTP(S) request goes to a proxy port nobody listens on.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    cfg = load_config(None, ["model.name=resnet18", "model.pretrained=imagenet"]).model
    with pytest.raises(FileNotFoundError) as e:
        build_model(cfg, 4, 3)
    msg = str(e.value)
    folder = torch_home / "hub" / "checkpoints"
    assert "\n" not in msg and msg.startswith("model.pretrained: resnet18-f37072fd.pth is not in")
    assert str(folder) in msg and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert not folder.exists() or not any(folder.iterdir())  # nothing half-written


def test_pretrained_is_for_torchvision_backbones_only():
    with pytest.raises(ConfigError, match=r"^model\.pretrained: convnet has no torchvision ImageNet weights"):
        load_config(None, ["model.pretrained=imagenet"])
    with pytest.raises(ConfigError, match=r"^train\.unfreeze_epoch: needs model\.freeze"):
        load_config(None, ["train.unfreeze_epoch=2"])


@pytest.mark.timeout(120)
def test_googlenet_keeps_its_input_transform_when_rebuilt_from_a_checkpoint(torch_home, tmp_path, one_thread):
    from deepindex.checkpoint import load_model, save_checkpoint
    from deepindex.data.transforms import imagenet_stats

    _fake_imagenet_file("googlenet", lambda weights: tvm.googlenet(weights=weights, aux_logits=False,
                                                                   init_weights=True))
    cfg = load_config(None, ["model.name=googlenet", "model.pretrained=imagenet", "data.channels=3",
                             "data.image_size=64"])
    m = build_model(cfg.model, 3, 3).eval()
    assert m.body.net.transform_input
    save_checkpoint(tmp_path / "ck", model=m, config=cfg, stats=imagenet_stats(3), concepts=["a", "b", "c"],
                    multilabel=True, epoch=0)
    weights_path("googlenet").unlink()  # serving needs no ImageNet file: the checkpoint holds every weight
    lm = load_model(tmp_path / "ck")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(lm.model(x), m(x), atol=1e-5)


def _step(m, x, y):
    opt = torch.optim.SGD([p for p in m.parameters()], lr=0.1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_linear_probe_trains_the_head_only_and_keeps_batch_norm_statistics():
    cfg = load_config(None, ["model.freeze=backbone", "model.channels=[8,16]", "model.embed_dim=16"]).model
    torch.manual_seed(0)
    m = build_model(cfg, 3, 3)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    body = {k: v.clone() for k, v in m.body.state_dict().items()}
    head = m.head.weight.detach().clone()
    m.train()
    keep_frozen_in_eval(m)  # what train_one_epoch does after model.train()
    assert not m.body.training and m.training
    _step(m, torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8, 3)).float())
    assert all(torch.equal(body[k], v) for k, v in m.body.state_dict().items())  # weights and BN running stats
    assert not torch.equal(head, m.head.weight)


@pytest.mark.timeout(120)
def test_freezing_up_to_a_stage_and_unfreezing():
    cfg = load_config(None, ["model.name=resnet18", "model.freeze=layer2"]).model
    m = build_model(cfg, 3, 3)
    frozen = {n.split(".")[2] for n, p in m.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[2] for n, p in m.named_parameters() if p.requires_grad and n.startswith("body.")}
    assert frozen == {"conv1", "bn1", "layer1", "layer2"} and trainable == {"layer3", "layer4"}
    m.train()
    keep_frozen_in_eval(m)
    assert not m.body.net.layer2.training and m.body.net.layer3.training
    unfreeze(m)
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match=r"^model.freeze: no module 'layer9'; stages: none, backbone, conv1, bn1"):
        apply_freeze(build_model(load_config(None, ["model.name=resnet18"]).model, 3, 3), "layer9")
    conv = build_model(load_config(None, ["model.freeze=body.1"]).model, 3, 1)  # the ConvNet's first two blocks
    assert not conv.body[1][0].weight.requires_grad and conv.body[2][0].weight.requires_grad


@pytest.mark.timeout(120)
def test_unfreeze_epoch_in_local_training(one_thread):
    from deepindex.train.engine import local_training

    cfg = load_config(None, ["data.dataset=digits", "data.train_size=64", "data.val_size=8", "data.test_size=8",
                             "model.channels=[4]", "model.embed_dim=8", "model.freeze=backbone",
                             "train.unfreeze_epoch=1", "train.epochs=2", "train.batch_size=32"])
    run = local_training(cfg)
    before = run.model.body[0][0].weight.detach().clone()
    run.epoch(0)
    assert torch.equal(before, run.model.body[0][0].weight)  # frozen in epoch 0
    run.epoch(1)
    assert all(p.requires_grad for p in run.model.parameters())
    assert not torch.equal(before, run.model.body[0][0].weight)  # trained from epoch 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "factory", "last_bn"), [("resnet18", tvm.resnet18, "bn2"),
                                                            ("resnet50", tvm.resnet50, "bn3")])
def test_stochastic_depth_takes_every_imagenet_and_local_tensor(torch_home, tmp_path, name, factory, last_bn):
    """Stochastic depth wraps each residual branch's last batch norm (its keys ``bn2.0.*``): those tensors of
    the ImageNet file (and of a local ``model.weights``), named ``bn2.*``, were taken for the classifier's
    and skipped, leaving 32 of resnet18's batch-norm tensors at their initial values (found on review)."""
    from deepindex.models.backbones import load_local_weights

    _fake_imagenet_file(name, factory)
    # Batch norms as trained ones are, not at their initial 1 / 0 (which a skipped tensor keeps).
    sd = {k: v + torch.rand_like(v) if v.is_floating_point() else v
          for k, v in torch.load(weights_path(name), weights_only=True).items()}
    torch.save(sd, weights_path(name))
    plain = build_model(load_config(None, [f"model.name={name}", "model.pretrained=imagenet"]).model, 4, 3)
    cfg = load_config(None, [f"model.name={name}", "model.pretrained=imagenet", "model.stochastic_depth=0.2"]).model
    deep = build_model(cfg, 4, 3)
    block = deep.body.net.layer2[1]
    assert isinstance(getattr(block, last_bn), torch.nn.Sequential)  # the wrapper
    for key in (f"layer2.1.{last_bn}.weight", f"layer2.1.{last_bn}.running_var", f"layer4.0.{last_bn}.bias"):
        wrapped = key.replace(f"{last_bn}.", f"{last_bn}.0.")
        assert torch.equal(deep.body.net.state_dict()[wrapped], sd[key]), key
    # Every backbone tensor the plain model takes, the wrapped one takes too.
    assert load_local_weights(deep, weights_path(name)) == load_local_weights(plain, weights_path(name))
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in factory(weights=None).state_dict().items()},
               tmp_path / "local.pth")
    fresh = build_model(load_config(None, [f"model.name={name}", "model.stochastic_depth=0.2"]).model, 4, 3)
    load_local_weights(fresh, tmp_path / "local.pth")
    local = torch.load(tmp_path / "local.pth", weights_only=True)
    assert torch.equal(fresh.body.net.state_dict()[f"layer3.0.{last_bn}.0.running_mean"],
                       local[f"layer3.0.{last_bn}.running_mean"])


@pytest.mark.timeout(120)
def test_a_stochastic_depth_checkpoint_loads_whole_into_a_model_without_it(tmp_path):
    """The other way round: ``bn2.0.*`` of a checkpoint trained with stochastic depth into a plain resnet18.
    Those 40 batch-norm tensors stayed at their initial values, not even listed as skipped (found on review)."""
    from deepindex.models.backbones import load_local_weights

    deep = build_model(load_config(None, ["model.name=resnet18", "model.stochastic_depth=0.2"]).model, 4, 3)
    with torch.no_grad():
        for v in deep.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.rand_like(v))
    torch.save({"model": deep.state_dict()}, tmp_path / "ours.pt")
    plain = build_model(load_config(None, ["model.name=resnet18"]).model, 4, 3)
    assert load_local_weights(plain, tmp_path / "ours.pt") == len(deep.state_dict())
    got, saved = plain.body.net.state_dict(), deep.body.net.state_dict()
    assert torch.equal(got["layer1.0.bn2.weight"], saved["layer1.0.bn2.0.weight"])
    assert torch.equal(got["layer4.1.bn2.running_var"], saved["layer4.1.bn2.0.running_var"])


@pytest.mark.timeout(120)
def test_torchvisions_densenet_file_loads_whole_as_model_weights(tmp_path):
    """torchvision's densenet121 file names ``norm.1``/``conv.1`` what the modules call ``norm1``/``conv1``:
    ``model.weights`` took 29 of its 727 tensors without a word (found on review); ImageNet's path renamed them."""
    from deepindex.models.backbones import load_local_weights

    torch.manual_seed(0)
    sd = tvm.densenet121(weights=None).state_dict()
    old = {k.replace(".norm1.", ".norm.1.").replace(".conv1.", ".conv.1.").replace(".norm2.", ".norm.2.")
           .replace(".conv2.", ".conv.2."): v + 1 if v.is_floating_point() else v for k, v in sd.items()
           if not k.endswith("num_batches_tracked")}  # a file from before batch norm counted its batches
    assert sum(".norm.1." in k for k in old) > 100  # the old names, as in densenet121-a639ec97.pth
    torch.save(old, tmp_path / "densenet121.pth")
    m = build_model(load_config(None, ["model.name=densenet121"]).model, 4, 3)
    taken = load_local_weights(m, tmp_path / "densenet121.pth")
    assert taken == len(old) - 2  # all but the ImageNet classifier's weight and bias
    layer = "features.denseblock2.denselayer3"
    assert torch.equal(m.body.net.state_dict()[f"{layer}.norm1.running_mean"], old[f"{layer}.norm.1.running_mean"])


def test_freezing_the_backbone_of_a_model_without_one_says_so():
    with pytest.raises(ValueError, match=r"^model.freeze: 'backbone': this model has no parameters before its"):
        build_model(load_config(None, ["model.name=mlp", "model.mlp_hidden=[]", "model.freeze=backbone"]).model, 3, 1)


@pytest.mark.timeout(120)
def test_dropout_inside_the_frozen_layers_runs_in_eval_mode():
    """AlexNet frozen up to ``classifier.1`` (fc6): the dropout before fc6 is in the frozen part, the one
    before fc7 is not.  The first stayed in train mode: the frozen fc6 saw dropped-out inputs (found on review)."""
    m = build_model(load_config(None, ["model.name=alexnet", "model.freeze=classifier.1"]).model, 3, 3)
    m.train()
    keep_frozen_in_eval(m)
    c = m.body.net.classifier
    assert [type(x).__name__ for x in c[:5]] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert not c[0].training and not c[1].training  # fc6's input dropout and fc6: frozen
    assert c[3].training and c[4].training  # fc7's: trained
    assert m.head.training


def test_a_bad_freeze_or_weights_file_fails_on_the_driver(tmp_path):
    """Checked before any worker starts: a layer the model lacks, or a missing ``model.weights``, used to fail
    in every Train worker (retried ``ray.max_failures`` times) after the cluster started (found on review)."""
    from deepindex.train.trainer import check_model_options

    with pytest.raises(ValueError, match=r"^model.freeze: no module 'layer5'; stages: none, backbone, conv1"):
        check_model_options(load_config(None, ["model.name=resnet18", "model.freeze=layer5", "data.channels=3"]))
    with pytest.raises(ValueError, match=rf"^model.weights: no such file {tmp_path}/gone.pt$"):
        check_model_options(load_config(None, [f"model.weights={tmp_path}/gone.pt"]))
    check_model_options(load_config(None, ["model.name=resnet18", "model.freeze=layer2", "data.channels=3"]))
