"""Transfer learning: ImageNet weights from torch's cache, frozen layers, a linear probe.

- ``model.pretrained=imagenet`` (torchvision backbones): the weights file torchvision would
  fetch (e.g. ``resnet18-f37072fd.pth``) is read from ``$TORCH_HOME/hub/checkpoints`` (torch's
  cache, ``~/.cache/torch/hub/checkpoints`` by default).  If it is missing, it is downloaded
  when the machine can reach download.pytorch.org; offline, the error is one line naming the
  file, the URL and the folder to put it in.  A first convolution for 1-channel data gets the
  sum of the RGB kernels (a gray image is R = G = B); the classifier is never loaded.
- ``model.freeze``: ``backbone`` freezes everything but the concept head (with
  ``model.pretrained`` or ``model.weights``: a linear probe); a module name (``layer2`` for
  ResNets, ``features.10`` for VGG, ``inception4a`` for GoogLeNet, ``body.1`` for the
  ConvNet's second block) freezes that module and every parameter registered before it,
  which for these models is every layer before it.  Frozen parts run in eval mode during
  training (batch-norm statistics and dropout stay as they were): :func:`keep_frozen_in_eval`.
- ``train.unfreeze_epoch``: from that epoch on every layer trains (:func:`unfreeze`).
"""
from __future__ import annotations

import logging
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

    from deepindex.config import Config, ModelConfig

log = logging.getLogger(__name__)

# Registered model name -> torchvision model name, for the models with ImageNet weights.
TORCHVISION = {n: n for n in ("resnet18", "resnet50", "vgg11_bn", "vgg16", "densenet121", "alexnet",
                               "googlenet")}
# Old DenseNet checkpoints name "norm.1" what the module calls "norm1" (torchvision remaps the same way).
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def current_key(key: str) -> str:
    """A state-dict key as today's torchvision modules name it (old DenseNet files: ``norm.1`` -> ``norm1``)."""
    return _DENSENET_KEY.sub(r"\1\2", key)


def pretrained_weights(name: str) -> WeightsEnum | None:
    """torchvision's default ImageNet weights entry for a registered model, or None."""
    if name not in TORCHVISION:
        return None
    from torchvision.models import get_model_weights

    return get_model_weights(TORCHVISION[name]).DEFAULT


def expects_imagenet_input(model_cfg: ModelConfig) -> bool:
    """Whether the weights a model starts from expect ImageNet-normalised input, as what
    ``data.normalize`` left unset resolves to: ImageNet weights (``model.pretrained``), or a
    torchvision state dict given as ``model.weights`` (the same weights, fetched by hand).  A file of
    ours (a checkpoint, a ConceptModel state dict) is no such claim."""
    if model_cfg.pretrained != "none":
        return True
    if not model_cfg.weights:
        return False
    from deepindex.models.backbones import is_torchvision_weights

    return is_torchvision_weights(model_cfg.weights)


def _weights_url(name: str) -> str:
    w = pretrained_weights(name)
    if w is None:
        raise ValueError(f"model.pretrained: {name} has no torchvision ImageNet weights")
    return str(w.url)


def weights_path(name: str) -> Path:
    """Where torch keeps the weights file of ``name``: ``<torch hub dir>/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _weights_url(name).rsplit("/", 1)[-1]


def ensure_pretrained(name: str, timeout_s: float = 10.0) -> Path:
    """The local weights file of ``name``, downloaded into torch's cache if missing and online."""
    path = weights_path(name)
    if path.is_file():
        return path
    url = _weights_url(name)
    try:
        # A short HEAD first: torch's downloader has no timeout and would hang on a silent network.
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s into %s", url, path.parent)
        prefix = re.search(r"-([a-f0-9]+)\.", path.name)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix.group(1) if prefix else None, progress=False)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        reason = getattr(e, "reason", None) or e
        raise FileNotFoundError(
            f"model.pretrained: {path.name} is not in {path.parent} and cannot be downloaded ({reason}); "
            f"fetch {url} where there is internet and put it in {path.parent} (or set TORCH_HOME to a "
            f"folder whose hub/checkpoints holds it)") from None
    return path


def _adapt(key: str, v: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    if own.shape == v.shape:
        return v
    # The first convolution of a 1-channel model: summed RGB kernels see a gray image as RGB did.
    if v.dim() == 4 and own.dim() == 4 and own.shape[1] == 1 and v.shape[1] == 3 and own.shape[0] == v.shape[0] \
            and own.shape[2:] == v.shape[2:]:
        return v.sum(dim=1, keepdim=True)
    return None


def load_pretrained(model: nn.Module, name: str) -> int:
    """Load ``name``'s ImageNet weights into ``model`` (its torchvision net is ``model.body.net``).

    Returns the number of tensors taken; fails if the file fits less than half the backbone.
    """
    path = ensure_pretrained(name)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which
        raise ValueError(f"model.pretrained: {path} is not a loadable state_dict ({e.__class__.__name__})") from None
    from deepindex.models.backbones import own_key

    own = model.state_dict()
    take, skipped = {}, []
    for k, v in sd.items():
        k = current_key(k)
        cand = own_key(own, f"body.net.{k}")  # stochastic depth's wrapped batch norms too
        if cand is None:
            continue  # the ImageNet classifier, replaced by the concept head (or aux heads)
        adapted = _adapt(cand, v, own[cand])
        if adapted is None:
            skipped.append(cand)
        else:
            take[cand] = adapted
    body = [k for k in own if k.startswith("body.") and not k.endswith("num_batches_tracked")]
    if len(take) < len(body) // 2:
        raise ValueError(f"model.pretrained: {path} fits only {len(take)} of {len(body)} tensors of {name}")
    model.load_state_dict(take, strict=False)
    log.info("ImageNet weights for %s: %d tensors from %s; %d of another shape skipped %s",
             name, len(take), path, len(skipped), skipped[:3])
    return len(take)


def _prefix_of(model: nn.Module, stage: str) -> str:
    """The qualified module name a ``model.freeze`` stage names (exact or a unique suffix)."""
    names = [n for n, _ in model.named_modules() if n]
    hits = [n for n in names if n == stage or n.endswith("." + stage)]
    if not hits:
        stages = ", ".join(freeze_stages(model))
        raise ValueError(f"model.freeze: no module {stage!r}; stages: none, backbone, {stages}")
    hits.sort(key=len)
    if len(hits) > 1 and len(hits[0]) == len(hits[1]):
        raise ValueError(f"model.freeze: {stage!r} is ambiguous ({hits[0]}, {hits[1]}); give the longer name")
    return hits[0]


def freeze_stages(model: nn.Module) -> list[str]:
    """Names a user can freeze up to: the children of the torchvision net, or of the body."""
    root = getattr(model.body, "net", None) if hasattr(model, "body") else None
    if root is not None:
        return [n for n, m in root.named_children() if any(True for _ in m.parameters())]
    body = getattr(model, "body", model)
    return [f"body.{n}" for n, m in body.named_children() if any(True for _ in m.parameters())]


def apply_freeze(model: nn.Module, freeze: str) -> int:
    """Freeze per ``model.freeze``; returns the number of frozen parameter tensors."""
    if freeze == "none":
        return 0
    params = list(model.named_parameters())
    if freeze == "backbone":
        body = [i for i, (n, _) in enumerate(params) if not n.startswith("head.")]
        if not body:
            raise ValueError("model.freeze: 'backbone': this model has no parameters before its concept head "
                             "(nothing to freeze)")
        cut = max(body)
    else:
        prefix = _prefix_of(model, freeze) + "."
        inside = [i for i, (n, _) in enumerate(params) if n.startswith(prefix)]
        if not inside:
            raise ValueError(f"model.freeze: {freeze!r} has no parameters to freeze")
        cut = max(inside)
    for n, p in params[: cut + 1]:
        if n.startswith("head."):
            raise ValueError(f"model.freeze: {freeze!r} would freeze the concept head")
        p.requires_grad_(False)
    log.info("model.freeze=%s: %d of %d parameter tensors frozen", freeze, cut + 1, len(params))
    return cut + 1


def has_frozen(model: nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def unfreeze_due(model: nn.Module, cfg: Config, epoch: int) -> bool:
    """Whether ``train.unfreeze_epoch`` lifts the freeze at (or, resuming, before) ``epoch``."""
    at = cfg.train.unfreeze_epoch
    return at is not None and epoch >= at and has_frozen(model)


def unfreeze(model: nn.Module) -> None:
    """Every parameter trains again (``train.unfreeze_epoch``)."""
    for p in model.parameters():
        p.requires_grad_(True)


def keep_frozen_in_eval(model: nn.Module) -> None:
    """After ``model.train()``: put every fully frozen module in eval mode.

    A frozen backbone must compute the features it was trained to compute: batch norm with
    its running statistics (not the batch's, which would also update them) and no dropout.  A
    module without parameters (dropout) is in the frozen part when the next layer with parameters,
    in the model's order, is frozen: AlexNet's first dropout, before a frozen ``classifier.1``.
    """
    def visit(m: nn.Module) -> None:
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()
            return
        for child in m.children():
            visit(child)

    if not has_frozen(model):
        return
    visit(model)
    next_frozen = False  # whether the next leaf with parameters (in forward order) is frozen
    for m in reversed([m for m in model.modules() if not any(True for _ in m.children())]):
        own = list(m.parameters(recurse=False))
        if own:
            next_frozen = not any(p.requires_grad for p in own)
        elif next_frozen:
            m.eval()
