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
_MIN_INPUT: dict[str, int] = {}  # the smallest input side a model accepts (its pools must not reach 0)


def register(name: str, *, min_input_size: int = 32) -> Callable[[ModelFactory], ModelFactory]:
    def deco(fn: ModelFactory) -> ModelFactory:
        _REGISTRY[name] = fn
        _MIN_INPUT[name] = min_input_size
        return fn

    return deco


def min_input_size(name: str) -> int:
    _load(name)
    return _MIN_INPUT[name]


def is_registered(name: str) -> bool:
    _load(name)
    return name in _REGISTRY


def registered_models() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def build_model(model_cfg: ModelConfig, num_concepts: int, in_channels: int,
                load_weights: bool = True) -> ConceptModel:
    """Build the registered model ``model_cfg.name`` (a :class:`deepindex.config.ModelConfig`).

    Then, in order: ImageNet weights (``model.pretrained``), a local state_dict
    (``model.weights``), and the frozen layers (``model.freeze``).  ``load_weights=False``
    skips both weight files: a checkpoint being rebuilt holds every weight already.
    """
    _load(model_cfg.name)
    if model_cfg.name not in _REGISTRY:
        raise ValueError(f"model.name: unknown model {model_cfg.name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[model_cfg.name](model_cfg, num_concepts, in_channels)
    if load_weights and getattr(model_cfg, "pretrained", "none") != "none":
        from deepindex.models.transfer import load_pretrained

        load_pretrained(model, model_cfg.name)
    if load_weights and model_cfg.weights:
        from deepindex.models.backbones import load_local_weights

        load_local_weights(model, model_cfg.weights)
    if getattr(model_cfg, "freeze", "none") != "none":
        from deepindex.models.transfer import apply_freeze

        apply_freeze(model, model_cfg.freeze)
    return model


def _load(name: str | None = None) -> None:
    """Import the modules that register models on first use, not at import of this package; the
    ConvNet's alone when ``name`` is one of its (the others import torchvision: ~1 s of every Train
    worker's start-up)."""
    from deepindex.models import convnet  # noqa: F401 - imported for its @register side effect

    if name is None or name not in _REGISTRY:
        from deepindex.models import backbones, classic  # noqa: F401 - the same


__all__ = ["ConceptModel", "build_model", "is_registered", "min_input_size", "register", "registered_models"]
