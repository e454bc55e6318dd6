"""The configurable ConvNet: blocks of conv -> batch norm -> activation -> pooling."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from deepindex.models import register
from deepindex.models.base import ConceptModel

if TYPE_CHECKING:
    from deepindex.config import ModelConfig

# activation name -> (channels -> module): PReLU learns one slope per channel
ACTIVATIONS: dict[str, Callable[[int], nn.Module]] = {
    "relu": lambda c: nn.ReLU(inplace=True), "prelu": nn.PReLU, "tanh": lambda c: nn.Tanh(),
    "sigmoid": lambda c: nn.Sigmoid()}
POOLS: dict[str, Callable[[int], nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def _block(c_in: int, c_out: int, convs: int, activation: str, pool: str) -> nn.Sequential:
    # convs x (3x3 conv -> BN -> activation), then halve the resolution.  No conv bias: BN has one.
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), ACTIVATIONS[activation](c_out)]
    return nn.Sequential(*layers, POOLS[pool](2))


@register("convnet")
def convnet(cfg: ModelConfig, num_concepts: int, in_channels: int) -> ConceptModel:
    blocks, c = [], in_channels
    for width in cfg.channels:
        blocks.append(_block(c, width, cfg.convs_per_block, cfg.activation, cfg.pool))
        c = width
    body = nn.Sequential(
        *blocks,  # (B, C, H / 2^n, W / 2^n)
        nn.AdaptiveMaxPool2d(1) if cfg.global_pool == "max" else nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (B, C)
        # Feature point last_but_two is this layer's input: the last conv block, globally pooled
        # (B, C).  ConceptModel taps the last linear layer's input, so the convnet needs no code
        # for it, and the layer is the seed's "last but two" (output, hidden layer, this one).
        nn.Linear(c, cfg.embed_dim),
        ACTIVATIONS[cfg.activation](cfg.embed_dim),  # (B, D): the embedding
    )
    return ConceptModel(body, cfg.embed_dim, num_concepts, cfg.dropout)
