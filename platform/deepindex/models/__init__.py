"""One model registry: ``build_model(cfg, num_concepts, in_channels)`` by name.

Every model is a :class:`ConceptModel`: ``forward(x)`` gives concept logits (B, K) and
``embed(x)`` the penultimate activations (B, D) used for query by example.  ``head`` is the
final linear layer, so optimisers can give it its own learning rate.
``features(x, names, multilabel=)`` returns named feature points from one pass (``probs``,
``logits``, ``penultimate``, ``last_but_two``, and ``stage<N>`` for torchvision backbones);
``feature_points()`` lists a model's.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from deepindex.models.base import ConceptModel

if TYPE_CHECKING:
    from deepindex.config import ModelConfig

    # (model config, number of concepts, input channels) -> model
    ModelFactory = Callable[[ModelConfig, int, int], ConceptModel]

_REGISTRY: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def deco(fn: ModelFactory) -> ModelFactory:
        _REGISTRY[name] = fn
        return fn

    return deco


def registered_models() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def build_model(model_cfg: ModelConfig, num_concepts: int, in_channels: int) -> ConceptModel:
    """Build the registered model ``model_cfg.name`` (a :class:`deepindex.config.ModelConfig`)."""
    _load()
    if model_cfg.name not in _REGISTRY:
        raise ValueError(f"model.name: unknown model {model_cfg.name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[model_cfg.name](model_cfg, num_concepts, in_channels)
    if model_cfg.weights:
        from deepindex.models.backbones import load_local_weights

        load_local_weights(model, model_cfg.weights)
    return model


def _load() -> None:
    # Import the modules that register models on first use, not at import of this package.
    from deepindex.models import backbones, convnet  # noqa: F401 - imported for their @register side effect


__all__ = ["ConceptModel", "build_model", "register", "registered_models"]
