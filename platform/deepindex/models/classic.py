"""The seed's classic architectures: AlexNet, GoogLeNet (Inception v1), VGG-16, and an MLP on pixels.

The three CNNs are torchvision's, built with ``weights=None`` (``model.pretrained=imagenet``
loads ImageNet weights from torch's cache, :mod:`deepindex.models.transfer`), their first
convolution rebuilt for the data's channel count and their 1000-class layer replaced by the
concept head.  Their penultimate activations are the embedding, as the seed's "last hidden
layer": 4096 for AlexNet and VGG-16, 1024 for GoogLeNet.

The MLP is the seed's first model: pixels -> fully connected layers -> concepts.  It
average-pools the image to ``model.mlp_input_size`` squared first, so its first layer has a
fixed width whatever ``data.image_size`` is.

Feature points (:meth:`ConceptModel.features`, all from one forward pass).  The seed's
descriptors count layers back from the output: the output (``probs``), the last hidden layer
(``penultimate``, the embedding) and the layer before it, ``last_but_two``:

- AlexNet: ``last_but_two`` is fc6, the first 4096-wide fully connected layer (after its
  ReLU); the embedding is fc7.  ``stage1``..``stage5`` are the five conv layers' outputs as the
  net hands them on (after the ReLU, and after the max pool for conv1, conv2 and conv5: Caffe's
  pool1, pool2, conv3, conv4, pool5), globally average-pooled: 64, 192, 384, 256, 256 wide.
- VGG-16: as VGG-11 (:mod:`deepindex.models.backbones`): ``last_but_two`` is fc6, the first
  4096 layer, the embedding fc7; ``stage<N>`` the conv features after the N-th max pool,
  pooled: 64, 128, 256, 512, 512.
- GoogLeNet: the embedding is inception 5b's output, globally average-pooled (1024), so
  ``last_but_two`` is the layer before it, inception 5a (832), pooled the same way.
  ``stage1``..``stage4`` are the last module at each resolution before the net's max pools
  shrink it, pooled: the stem (conv3, 192), inception 3b (480), 4e (832) and 5b (1024, equal to
  ``penultimate``, as ResNet's and DenseNet's last stage is).
- MLP: ``hidden<N>`` is the N-th hidden layer (after its activation); the last is the
  embedding and ``last_but_two`` the one before it.  With one hidden layer the layer before it
  is the input layer (the pooled pixels, flattened); with none the MLP is a linear model on
  pixels, whose embedding is the pixels and which has no ``last_but_two``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchvision import models as tvm

from deepindex.models import register
from deepindex.models.backbones import _VGGBody, _with_in_channels
from deepindex.models.base import ConceptModel, global_pool

if TYPE_CHECKING:
    from deepindex.config import ModelConfig


class _AlexNetBody(nn.Module):
    """torchvision's AlexNet without its 1000-class layer: image -> fc7 activations (B, 4096)."""

    feature_points = ("last_but_two", "stage1", "stage2", "stage3", "stage4", "stage5")

    def __init__(self, net: tvm.AlexNet) -> None:
        super().__init__()
        # classifier: Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear(4096, 1000): the last goes.
        net.classifier = net.classifier[:-1]
        self.net = net
        # A conv layer's stage ends where the next conv takes over: after its max pool if one
        # follows its ReLU, else after the ReLU.  features index -> stage name.
        feats: list[nn.Module | None] = list(net.features)
        after = [*feats[1:], None]
        ends = [i for i, m in enumerate(feats)
                if isinstance(m, nn.MaxPool2d) or (isinstance(m, nn.ReLU) and not isinstance(after[i], nn.MaxPool2d))]
        self._stage_at = {i: f"stage{s}" for s, i in enumerate(ends, 1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 4096)

    def forward_features(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        n, out = self.net, {}
        for i, m in enumerate(n.features):
            x = m(x)
            if self._stage_at.get(i) in wanted:
                out[self._stage_at[i]] = global_pool(x)  # (B, C_i)
        x = torch.flatten(n.avgpool(x), 1)  # (B, 256 * 6 * 6)
        drop6, fc6, relu6, drop7, fc7, relu7 = n.classifier
        x = relu6(fc6(drop6(x)))  # (B, 4096): fc6
        out["last_but_two"] = x
        out["penultimate"] = relu7(fc7(drop7(x)))  # (B, 4096): fc7, what forward() returns
        return out


class _GoogLeNetBody(nn.Module):
    """torchvision's GoogLeNet without dropout and classifier: image -> pooled inception 5b (B, 1024)."""

    feature_points = ("last_but_two", "stage1", "stage2", "stage3", "stage4")
    transform_input: torch.Tensor  # 0-dim buffer: 1.0 when torchvision's transform_input is on

    def __init__(self, net: tvm.GoogLeNet) -> None:
        super().__init__()
        net.dropout = nn.Identity()  # the concept head has its own dropout
        net.fc = nn.Identity()
        self.net = net
        # torchvision's transform_input is a constructor flag, in no state dict: it is kept here as a
        # 0-dim buffer, so it travels with the weights (checkpoint, resume, model.weights of ours).  A
        # model built from a config alone gets it from model.pretrained; a torchvision weights file given
        # as model.weights turns it on when loaded (load_local_weights), which the config does not say.
        self.register_buffer("transform_input", torch.tensor(float(net.transform_input)))

    def set_transform_input(self, on: bool) -> None:
        self.transform_input.fill_(float(on))
        self.net.transform_input = on

    def torchvision_weights_loaded(self) -> None:
        """torchvision's ImageNet GoogLeNet weights were loaded (``model.weights``): feed them as
        ``model.pretrained`` does, through transform_input, for RGB input (1-channel: off, as there)."""
        self.set_transform_input(self.net.conv1.conv.in_channels == 3)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "transform_input"
        if key not in state_dict:
            # A checkpoint from before the flag was kept (or a partial state dict, as model.weights
            # loads): the value built from the config stays, as batch norm does for num_batches_tracked.
            state_dict[key] = self.transform_input
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.transform_input.is_meta:
            self.net.transform_input = bool(self.transform_input.item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1024)

    def forward_features(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        # GoogLeNet._forward's steps, tapped; the aux heads are not built (aux_logits=False).
        n, out = self.net, {}
        x = n.conv3(n.conv2(n.maxpool1(n.conv1(n._transform_input(x)))))  # (B, 192, H/4, W/4)
        if "stage1" in wanted:
            out["stage1"] = global_pool(x)
        x = n.inception3b(n.inception3a(n.maxpool2(x)))  # (B, 480, H/8, W/8)
        if "stage2" in wanted:
            out["stage2"] = global_pool(x)
        x = n.maxpool3(x)
        for block in (n.inception4a, n.inception4b, n.inception4c, n.inception4d, n.inception4e):
            x = block(x)  # (B, 832, H/16, W/16) after 4e
        if "stage3" in wanted:
            out["stage3"] = global_pool(x)
        x = n.inception5a(n.maxpool4(x))  # (B, 832, H/32, W/32)
        if "last_but_two" in wanted:
            out["last_but_two"] = global_pool(x)
        x = n.inception5b(x)  # (B, 1024, H/32, W/32)
        out["penultimate"] = out["stage4"] = torch.flatten(n.avgpool(x), 1)  # what forward() returns
        return out


class _MLPBody(nn.Sequential):
    """Average pool to s x s -> flatten -> (linear -> activation) per hidden layer: (B, D).

    A Sequential, as the MLP always was, so checkpoints keep their ``body.<i>`` keys.
    """

    def __init__(self, pool: nn.Module, hidden: list[tuple[nn.Linear, nn.Module]]) -> None:
        super().__init__(pool, nn.Flatten(), *(m for pair in hidden for m in pair))  # (B, C * s * s) after Flatten
        self.n_hidden = len(hidden)
        names = [f"hidden{i}" for i in range(1, self.n_hidden + 1)]
        self.feature_points: tuple[str, ...] = (("last_but_two",) if hidden else ()) + tuple(names)

    def forward_features(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        layers = list(self)
        x = layers[1](layers[0](x))  # (B, C * s * s): the input layer
        taps = [x]  # the input layer, then every hidden layer's activations
        for linear, act in zip(layers[2::2], layers[3::2], strict=True):
            x = act(linear(x))  # (B, H_i)
            taps.append(x)
        out = {f"hidden{i}": t for i, t in enumerate(taps[1:], 1) if f"hidden{i}" in wanted}
        out["penultimate"] = x  # what forward() returns
        if self.n_hidden:
            out["last_but_two"] = taps[-2]
        return out


@register("alexnet", min_input_size=63)  # 11x11/4 conv and three 3x3/2 pools: 63 px is the smallest
def alexnet(cfg: ModelConfig, num_concepts: int, in_channels: int) -> ConceptModel:
    net = tvm.alexnet(weights=None)
    net.features[0] = _with_in_channels(net.features[0], in_channels)
    return ConceptModel(_AlexNetBody(net), 4096, num_concepts, cfg.dropout)


@register("vgg16")
def vgg16(cfg: ModelConfig, num_concepts: int, in_channels: int) -> ConceptModel:
    net = tvm.vgg16(weights=None)
    net.features[0] = _with_in_channels(net.features[0], in_channels)
    # The body keeps Linear-ReLU-Dropout-Linear-ReLU; the last Dropout and Linear become ours.
    return ConceptModel(_VGGBody(net), 4096, num_concepts, cfg.dropout)


@register("googlenet")
def googlenet(cfg: ModelConfig, num_concepts: int, in_channels: int) -> ConceptModel:
    # ImageNet GoogLeNet weights were ported from a net fed (x - 0.5) / 0.5; torchvision's
    # transform_input maps ImageNet-normalised RGB onto that.  It is part of the architecture
    # (kept when a checkpoint is rebuilt), so it follows model.pretrained, not whether the
    # weights are being loaded now; the body's state dict holds it too (a torchvision file as
    # model.weights turns it on, and a checkpoint of that model keeps it: _GoogLeNetBody).
    transform = cfg.pretrained == "imagenet" and in_channels == 3
    net = tvm.googlenet(weights=None, aux_logits=False, transform_input=transform, init_weights=True)
    net.conv1.conv = _with_in_channels(net.conv1.conv, in_channels)
    return ConceptModel(_GoogLeNetBody(net), 1024, num_concepts, cfg.dropout)


# activation name -> module; one PReLU slope per layer, as the MLP has always had
_ACT: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True), "prelu": nn.PReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


@register("mlp", min_input_size=1)
def mlp(cfg: ModelConfig, num_concepts: int, in_channels: int) -> ConceptModel:
    s = cfg.mlp_input_size
    hidden, width = [], in_channels * s * s
    for h in cfg.mlp_hidden:
        hidden.append((nn.Linear(width, h), _ACT[cfg.activation]()))
        width = h
    # The embedding is the last hidden layer (the pixels themselves when there is none).
    return ConceptModel(_MLPBody(nn.AdaptiveAvgPool2d(s), hidden), width, num_concepts, cfg.dropout)
