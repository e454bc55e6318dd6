"""torchvision backbones by name, their classifier replaced by a concept head.

Nothing is downloaded: ``weights=None`` always, and transfer learning reads a local
state_dict file (``model.weights``), either torchvision's own or one of ours.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.ops import StochasticDepth

from deepindex.models import register
from deepindex.models.base import ConceptModel, global_pool

if TYPE_CHECKING:
    from deepindex.config import ModelConfig

log = logging.getLogger(__name__)


class _ResNetBody(nn.Module):
    def __init__(self, net: tvm.ResNet) -> None:
        super().__init__()
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 512 | 2048)

    # stage<N>: layer<N>'s output, globally average-pooled as the net pools layer4.  The
    # embedding is stage4, so last_but_two is stage3: the stage before it.
    feature_points = ("last_but_two", "stage1", "stage2", "stage3", "stage4")

    def forward_features(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        n, out = self.net, {}
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))  # the stem, as ResNet.forward runs it
        for i, layer in enumerate((n.layer1, n.layer2, n.layer3, n.layer4), 1):
            x = layer(x)  # (B, C_i, H_i, W_i)
            if f"stage{i}" in wanted or (i == 3 and "last_but_two" in wanted):
                out[f"stage{i}"] = global_pool(x)
        out["penultimate"] = out["stage4"] = torch.flatten(n.avgpool(x), 1)  # what forward() returns
        if "last_but_two" in wanted:
            out["last_but_two"] = out["stage3"]
        return out


class _VGGBody(nn.Module):
    def __init__(self, net: tvm.VGG) -> None:
        super().__init__()
        # Keep Linear-ReLU-Dropout-Linear-ReLU; the last Dropout and Linear become ours.
        net.classifier = net.classifier[:-2]
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 4096)

    # stage<N>: the conv features after the N-th max pool, globally average-pooled.  The
    # embedding is the second fully connected layer, so last_but_two is the first one (4096).
    feature_points = ("last_but_two", "stage1", "stage2", "stage3", "stage4", "stage5")

    def forward_features(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        n, out, stage = self.net, {}, 0
        for m in n.features:
            x = m(x)
            if isinstance(m, nn.MaxPool2d):
                stage += 1
                if f"stage{stage}" in wanted:
                    out[f"stage{stage}"] = global_pool(x)
        x = torch.flatten(n.avgpool(x), 1)  # (B, 512 * 7 * 7)
        fc1, relu1, drop, fc2, relu2 = n.classifier
        x = relu1(fc1(x))  # (B, 4096)
        out["last_but_two"] = x
        out["penultimate"] = relu2(fc2(drop(x)))  # (B, 4096), what forward() returns
        return out


class _DenseNetBody(nn.Module):
    def __init__(self, net: tvm.DenseNet) -> None:
        super().__init__()
        net.classifier = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1024)

    # stage<N>: dense block N's output, globally average-pooled; stage4 (after the final batch
    # norm and ReLU, as DenseNet.forward does) is the embedding, so last_but_two is stage3.
    feature_points = ("last_but_two", "stage1", "stage2", "stage3", "stage4")

    def forward_features(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in self.net.features.named_children():
            x = m(x)
            if name.startswith("denseblock"):
                i = int(name.removeprefix("denseblock"))
                if i < 4 and (f"stage{i}" in wanted or (i == 3 and "last_but_two" in wanted)):
                    out[f"stage{i}"] = global_pool(x)
        out["penultimate"] = out["stage4"] = global_pool(nn.functional.relu(x))  # what forward() returns
        if "last_but_two" in wanted:
            out["last_but_two"] = out["stage3"]
        return out


def _with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    # A Conv2d holds 2-tuples (torch's _pair); _ConvNd annotates them for any number of dimensions.
    return nn.Conv2d(in_channels, conv.out_channels, cast("tuple[int, int]", conv.kernel_size),
                     cast("tuple[int, int]", conv.stride), cast("str | tuple[int, int]", conv.padding),
                     bias=conv.bias is not None)


# Stochastic depth wraps a residual block's last batch norm (below): ``bn2`` (``bn3``) holds its tensors
# as ``bn2.0.*`` there.  A state dict of the plain network names them ``bn2.*``.
_WRAPPED_BN = re.compile(r"\.(bn[23])\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_UNWRAPPED_BN = re.compile(r"\.(bn[23])\.0\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def own_key(own: dict[str, torch.Tensor], key: str) -> str | None:
    """The key of ``own`` (a model's state dict) that ``key`` names: itself, or its batch norm's tensor
    inside stochastic depth's wrapper.  Without the second, ImageNet or ``model.weights`` tensors of every
    residual branch's last batch norm were taken for the classifier's and skipped without a word, leaving
    those layers at their initial values (found on review)."""
    if key in own:
        return key
    # ... and the other way: a checkpoint trained with stochastic depth into a model without it.
    for cand in (_WRAPPED_BN.sub(r".\1.0.\2", key), _UNWRAPPED_BN.sub(r".\1.\2", key)):
        if cand != key and cand in own:
            return cand
    return None


def _add_stochastic_depth(net: tvm.ResNet, p: float) -> None:
    """Drop each residual branch with a probability rising linearly to ``p`` (Huang et al. 2016)."""
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    for i, block in enumerate(blocks):
        prob = p * (i + 1) / len(blocks)
        # The branch's last batch norm feeds the addition with the identity: drop its output.
        name = "bn3" if isinstance(block, tvm.resnet.Bottleneck) else "bn2"
        setattr(block, name, nn.Sequential(getattr(block, name), StochasticDepth(prob, mode="row")))


def _resnet(factory: Callable[..., tvm.ResNet], cfg: ModelConfig, num_concepts: int, in_channels: int
            ) -> ConceptModel:
    net = factory(weights=None)
    net.conv1 = _with_in_channels(net.conv1, in_channels)
    if cfg.stochastic_depth > 0:
        _add_stochastic_depth(net, cfg.stochastic_depth)
    dim = net.fc.in_features
    return ConceptModel(_ResNetBody(net), dim, num_concepts, cfg.dropout)


@register("resnet18")
def resnet18(cfg: ModelConfig, num_concepts: int, in_channels: int) -> ConceptModel:
    return _resnet(tvm.resnet18, cfg, num_concepts, in_channels)


@register("resnet50")
def resnet50(cfg: ModelConfig, num_concepts: int, in_channels: int) -> ConceptModel:
    return _resnet(tvm.resnet50, cfg, num_concepts, in_channels)


@register("vgg11_bn")
def vgg11_bn(cfg: ModelConfig, num_concepts: int, in_channels: int) -> ConceptModel:
    net = tvm.vgg11_bn(weights=None)
    net.features[0] = _with_in_channels(net.features[0], in_channels)
    dim = net.classifier[-1].in_features
    return ConceptModel(_VGGBody(net), dim, num_concepts, cfg.dropout)


@register("densenet121")
def densenet121(cfg: ModelConfig, num_concepts: int, in_channels: int) -> ConceptModel:
    net = tvm.densenet121(weights=None)
    net.features.conv0 = _with_in_channels(net.features.conv0, in_channels)
    dim = net.classifier.in_features
    return ConceptModel(_DenseNetBody(net), dim, num_concepts, cfg.dropout)


class MissingWeights(FileNotFoundError, ValueError):
    """``model.weights`` names no file: a missing file, and a bad config value."""


def weights_file(path: str | Path) -> Path:
    """The ``model.weights`` file (``~`` expanded), checked on the driver and read by every worker."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingWeights(f"model.weights: no such file {path}")
    return p


def _read_state_dict(p: Path) -> Any:
    """The state dict in a ``model.weights`` file: the file itself, or the ``model`` of one of our
    checkpoints (which needs nothing else of it: no concepts, no config)."""
    sd = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # one of our checkpoints
    return sd


def _is_torchvision_state(sd: Any) -> bool:
    """A torchvision model's state dict (ImageNet weights as torchvision publishes them): its keys name
    the torchvision net's modules, where ours start with ``body.`` or ``head.``."""
    return isinstance(sd, dict) and bool(sd) and not any(str(k).startswith(("body.", "head.")) for k in sd)


def is_torchvision_weights(path: str | Path) -> bool:
    """Whether ``model.weights`` names a torchvision state dict, whose weights expect what ImageNet
    weights (``model.pretrained``) expect: ImageNet-normalised input (and GoogLeNet's transform_input).
    False for a file of ours, and for a missing or unreadable one (loading it says what is wrong)."""
    try:
        return _is_torchvision_state(_read_state_dict(weights_file(path)))
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, EOFError):
        return False


def load_local_weights(model: nn.Module, path: str | Path) -> int:
    """Load a local state_dict into ``model``; returns how many tensors were taken.

    Accepts our own state_dicts and torchvision's (keys without the ``body.net.`` prefix).
    Tensors whose shape differs (a first conv for another channel count, a classifier for
    another concept count) are skipped and logged: that is what transfer learning wants.
    A torchvision file is fed as ``model.pretrained`` feeds ImageNet weights: GoogLeNet's
    transform_input goes on (for RGB input), which its config alone does not say.
    """
    p = weights_file(path)
    sd = _read_state_dict(p)
    from deepindex.models.transfer import current_key

    own = model.state_dict()
    take, skipped = {}, []
    for k, v in sd.items():
        k = current_key(k)  # torchvision's DenseNet files hold the old key names, as ImageNet's do
        for name in (k, f"body.net.{k}", f"body.{k}"):
            cand = own_key(own, name)
            if cand is not None:
                if own[cand].shape == v.shape:
                    take[cand] = v
                else:
                    skipped.append(cand)
                break
    if not take:
        raise ValueError(f"model.weights: {p} shares no tensor with model")
    model.load_state_dict(take, strict=False)
    # GoogLeNet's body: torchvision's weights expect transform_input, as model.pretrained builds it (one of
    # our files holds the body's own flag, loaded above).  It used to stay off here (found on review).
    on_torchvision = getattr(getattr(model, "body", None), "torchvision_weights_loaded", None)
    if callable(on_torchvision) and _is_torchvision_state(sd):
        on_torchvision()
    log.info("loaded %d tensors from %s; skipped %d of another shape: %s", len(take), p, len(skipped), skipped[:5])
    return len(take)
