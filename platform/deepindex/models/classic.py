"""The seed's classic architectures: AlexNet, GoogLeNet (Inception v1), VGG-16, and an MLP on pixels.

The three CNNs are torchvision's, built with ``weights=None`` (``model.pretrained=imagenet``
loads ImageNet weights from torch's cache, :mod:`deepindex.models.transfer`), their first
convolution rebuilt for the data's channel count and their 1000-class layer replaced by the
concept head.  Their penultimate activations are the embedding, as the seed's "last hidden
layer": 4096 for AlexNet and VGG-16, 1024 for GoogLeNet.

The MLP is the seed's first model: pixels -> fully connected layers -> concepts.  It
average-pools the image to ``model.mlp_input_size`` squared first, so its first layer has a
fixed width whatever ``data.image_size`` is.
"""
from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from deepindex.models import register
from deepindex.models.base import ConceptModel


def _conv_for(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None)


class _TorchvisionBody(nn.Module):
    """A torchvision classifier whose last layer has been removed: image -> (B, D)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)  # (B, D)


@register("alexnet", min_input_size=63)  # 11x11/4 conv and three 3x3/2 pools: 63 px is the smallest
def alexnet(cfg, num_concepts: int, in_channels: int) -> ConceptModel:
    net = tvm.alexnet(weights=None)
    net.features[0] = _conv_for(net.features[0], in_channels)
    # classifier: Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear(4096, 1000): the last goes.
    net.classifier = net.classifier[:-1]
    return ConceptModel(_TorchvisionBody(net), 4096, num_concepts, cfg.dropout)


@register("vgg16")
def vgg16(cfg, num_concepts: int, in_channels: int) -> ConceptModel:
    net = tvm.vgg16(weights=None)
    net.features[0] = _conv_for(net.features[0], in_channels)
    # Keep Linear-ReLU-Dropout-Linear-ReLU; the last Dropout and Linear become ours.
    net.classifier = net.classifier[:-2]
    return ConceptModel(_TorchvisionBody(net), 4096, num_concepts, cfg.dropout)


@register("googlenet")
def googlenet(cfg, num_concepts: int, in_channels: int) -> ConceptModel:
    # ImageNet GoogLeNet weights were ported from a net fed (x - 0.5) / 0.5; torchvision's
    # transform_input maps ImageNet-normalised RGB onto that.  It is part of the architecture
    # (kept when a checkpoint is rebuilt), so it follows model.pretrained, not whether the
    # weights are being loaded now.
    transform = cfg.pretrained == "imagenet" and in_channels == 3
    net = tvm.googlenet(weights=None, aux_logits=False, transform_input=transform, init_weights=True)
    net.conv1.conv = _conv_for(net.conv1.conv, in_channels)
    net.dropout = nn.Identity()  # the concept head has its own dropout
    net.fc = nn.Identity()
    return ConceptModel(_TorchvisionBody(net), 1024, num_concepts, cfg.dropout)


_ACT = {"relu": lambda: nn.ReLU(inplace=True), "prelu": nn.PReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


@register("mlp", min_input_size=1)
def mlp(cfg, num_concepts: int, in_channels: int) -> ConceptModel:
    s = cfg.mlp_input_size
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(s), nn.Flatten()]  # (B, C * s * s)
    width = in_channels * s * s
    for h in cfg.mlp_hidden:
        layers += [nn.Linear(width, h), _ACT[cfg.activation]()]
        width = h
    return ConceptModel(nn.Sequential(*layers), width, num_concepts, cfg.dropout)  # embedding: last hidden layer
