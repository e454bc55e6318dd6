from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

# Feature points every model has, whatever its body: the concept output (as logits, and as
# probabilities: sigmoid for multi-label models, softmax for single-label ones) and the
# penultimate layer (the embedding).  Bodies add their own (``last_but_two``, ``stage<N>``).
HEAD_POINTS = ("probs", "logits", "penultimate")


@runtime_checkable
class FeatureBody(Protocol):
    """A body that taps its own feature points during its forward pass."""

    feature_points: tuple[str, ...]  # its own points (``last_but_two``, ``stage<N>``, ...)

    def forward_features(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        """(B, C, H, W) -> {name: (B, D_name)}: every name in ``wanted`` and always ``penultimate``."""
        ...


class ConceptModel(nn.Module):
    """features (B, C, H, W) -> embedding (B, D) -> dropout -> head -> logits (B, K)."""

    def __init__(self, body: nn.Module, embed_dim: int, num_concepts: int, dropout: float) -> None:
        super().__init__()
        self.body = body  # image -> (B, D) penultimate activations
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_concepts)
        self.embed_dim = embed_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))  # (B, K)

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embedding) from one pass: indexing and serving need both."""
        e = self.body(x)
        return self.head(self.dropout(e)), e

    def feature_points(self) -> tuple[str, ...]:
        """Names :meth:`features` accepts for this model (see the module's ``HEAD_POINTS``)."""
        if isinstance(self.body, FeatureBody):
            return HEAD_POINTS + tuple(self.body.feature_points)
        return HEAD_POINTS + (("last_but_two",) if _last_linear(self.body) is not None else ())

    def features(self, x: torch.Tensor, names: Sequence[str], *, multilabel: bool | None = None
                 ) -> dict[str, torch.Tensor]:
        """(B, C, H, W) -> {name: (B, D_name)} for the requested feature points, from one pass.

        ``probs`` needs ``multilabel`` (sigmoid or softmax): the model itself does not know how
        it was trained, the checkpoint does (``LoadedModel.multilabel``).
        """
        names = list(dict.fromkeys(names))
        have = self.feature_points()
        unknown = [n for n in names if n not in have]
        if unknown or not names:
            raise ValueError(f"features: unknown feature point(s) {unknown or names}; this model has {', '.join(have)}")
        if "probs" in names and multilabel is None:
            raise ValueError("features: 'probs' needs multilabel=True (sigmoid) or False (softmax)")
        wanted = {n for n in names if n not in HEAD_POINTS}
        if isinstance(self.body, FeatureBody):
            feats = self.body.forward_features(x, wanted)  # always holds "penultimate"
        else:
            feats = _features_by_hook(self.body, x, wanted)
        out = dict(feats)
        if "logits" in names or "probs" in names:
            out["logits"] = self.head(self.dropout(feats["penultimate"]))  # (B, K)
        if "probs" in names:
            out["probs"] = torch.sigmoid(out["logits"]) if multilabel else torch.softmax(out["logits"], dim=1)
        return {n: out[n] for n in names}


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C): the pooled stage output backbones expose as ``stage<N>``."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _last_linear(body: nn.Module) -> nn.Linear | None:
    linears = [m for m in body.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _features_by_hook(body: nn.Module, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
    """A body without ``forward_features``: ``last_but_two`` is the input of its last linear layer.

    That is the layer before the embedding for any body topped by a fully connected layer, so
    a new architecture has the seed's three descriptors before it writes its own taps; a
    forward pre-hook reads it during the one pass.
    """
    seen: dict[str, torch.Tensor] = {}
    handle = None
    lin = _last_linear(body) if "last_but_two" in wanted else None
    if lin is not None:  # feature_points() offers last_but_two only to a body with a linear layer
        def tap(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen["last_but_two"] = torch.flatten(args[0], 1)

        handle = lin.register_forward_pre_hook(tap)
    try:
        seen["penultimate"] = body(x)  # (B, D)
    finally:
        if handle is not None:
            handle.remove()
    return seen
