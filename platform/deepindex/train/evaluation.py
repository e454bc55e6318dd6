"""Scoring a checkpoint on a split, and the reports made from the scores (plain torch, no Ray).

``deepindex evaluate``, the end of every training run (test metrics, ``test_ap.csv``, the PR-curve
or confusion-matrix figure that tracking logs) and promotion all score through
:func:`score_checkpoint`.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deepindex.config import DataConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from deepindex.checkpoint import LoadedModel
    from deepindex.data import Splits


@dataclass
class Scored:
    metrics: dict[str, Any]  # "test_map"/"test_ap" or "test_top1_error"/"test_top5_error", "test_loss"
    logits: torch.Tensor  # (N, K)
    targets: torch.Tensor  # (N,) class ids | (N, K) 0/1
    concepts: list[str]
    multilabel: bool

    def named(self) -> dict[str, Any]:
        """The metrics as a person reads them: per-concept AP (``test_ap``) by concept name, not in the
        checkpoint's concept order (MLflow gets the list's table, ``test_ap.csv``)."""
        return {k: dict(zip(self.concepts, v, strict=True)) if k.endswith("_ap") and isinstance(v, list) else v
                for k, v in self.metrics.items()}


def model_splits(lm: LoadedModel, data: DataConfig) -> Splits:
    """The splits of ``data`` (which images, labels, folds) as the model ``lm`` sees an image: at its
    checkpoint's input keys (size, channels, preset, normalisation) and stats, with no train-time
    augmentation, so every read of an item is the same image serving would show it."""
    from deepindex.data import build_splits
    from deepindex.data.inspect import INPUT_KEYS

    mine = data.model_copy(update={k: getattr(lm.config.data, k) for k in INPUT_KEYS})
    return build_splits(mine, train_augment=False, stats=lm.stats)


def score_checkpoint(path: str | Path, split: str = "test", data: DataConfig | None = None,
                     batch_size: int = 256) -> Scored:
    """A checkpoint's logits and metrics on a split of ``data`` (default: its own data config).

    Promotion scores the candidate and the champion on the candidate's data config, so both
    figures come from the same images; each model sees them at its own input (size, channels,
    preset, normalisation: ``INPUT_KEYS`` and the stats of its checkpoint), as serving would show
    them to it.  A file collection that training read through Ray Data is
    scored from its decode cache (no image decoded again; the checkpoint's normalisation stats, which
    equal the ones the local path recomputes), unless ``data`` is given.
    """
    from torch.utils.data import DataLoader

    from deepindex.checkpoint import load_model
    from deepindex.data import build_splits
    from deepindex.train.engine import predict, scores_to_metrics
    from deepindex.train.losses import make_loss

    lm = load_model(path)
    found = None
    if data is None:  # its own data: from the decode cache its training read, where there is one
        from deepindex.data.ingest import cached_split
        from deepindex.train.trainer import storage_path

        found = cached_split(lm.config, storage_path(lm.config), split, lm.stats)
    if found is not None:
        dataset, concepts = found
    else:
        splits = build_splits(lm.config.data, train_augment=False) if data is None else model_splits(lm, data)
        dataset, concepts = getattr(splits, split), splits.concepts
    if list(concepts) != list(lm.concepts):
        raise ValueError(f"data.dataset: the checkpoint {path} knows {len(lm.concepts)} concepts, the split has "
                         f"{len(concepts)}: not comparable")
    logits, targets = predict(lm.model, DataLoader(dataset, batch_size=batch_size))
    metrics = scores_to_metrics(logits, targets, lm.multilabel, make_loss(lm.multilabel), prefix=f"{split}_")
    return Scored(metrics, logits, targets, list(lm.concepts), lm.multilabel)


def learnt_little_finding(scored: Scored) -> str | None:
    """``learnt next to nothing: test top-1 error 0.69, where always answering the most frequent class
    errs 0.62`` when a model's score on its split is hardly better than a guess's there
    (:func:`deepindex.train.metrics.learnt_little`), else None."""
    from deepindex.train.metrics import GUESS, chance_score, learnt_little

    if scored.multilabel:
        name, said, guess = "map", "mAP", GUESS[True] + " scores"
    else:
        name, said, guess = "top1_error", "top-1 error", GUESS[False] + " errs"
    key = next((k for k in scored.metrics if k.endswith("_" + name)), None)
    if key is None or len(scored.targets) == 0:
        return None
    score, chance = float(scored.metrics[key]), chance_score(scored.targets, scored.multilabel)
    if not learnt_little(score, chance, scored.multilabel):
        return None
    return f"learnt next to nothing: {key[: -len(name) - 1]} {said} {score:.4f}, where {guess} {chance:.4f}"


def learnt_little_warning(scored: Scored) -> str | None:
    """What a training says at its end of a model :func:`learnt_little_finding` finds: a run can finish,
    checkpoint and log everything and still hold a model that answers by chance (a few hundred photos
    at the default batch of 128 make a handful of steps)."""
    finding = learnt_little_finding(scored)
    if finding is None:
        return None
    return (f"the model {finding}. Train it longer (train.epochs), in more steps an epoch (a smaller "
            f"train.batch_size) or from ImageNet weights (model.pretrained=imagenet); `deepindex example photos` "
            f"writes a recipe that learns from a few hundred photos")


def evaluate_checkpoint(path: str | Path, split: str = "test", overrides: list[str] | None = None) -> dict[str, Any]:
    """A checkpoint's metrics on a split of its own dataset (per-concept AP by concept name); ``overrides``
    (``data.KEY=VALUE``) change that data config first: a collection that moved (``data.root=...``), or
    one of the same concepts."""
    data = None
    if overrides:
        from deepindex.checkpoint import read_checkpoint
        from deepindex.config import ConfigError, absolute_paths, from_dict, parse_overrides

        for key in parse_overrides(overrides):
            if not key.startswith("data."):
                raise ConfigError(f"{key}: evaluate changes only data.* keys (the model is the checkpoint's)")
        data = absolute_paths(from_dict(read_checkpoint(path)["config"]).override(overrides)).data
    return score_checkpoint(path, split, data=data).named()


def ap_table(scored: Scored) -> str:
    """CSV of concept, AP, positives: ranked by the sigmoid's logits (multi-label) or one-vs-rest by the
    log-softmax (the probabilities' order, without float32's ties at 1.0)."""
    from deepindex.train.metrics import per_concept_ap

    if scored.multilabel:
        ranks, onehot = scored.logits, scored.targets
    else:
        ranks = torch.log_softmax(scored.logits.double(), dim=1)
        onehot = torch.nn.functional.one_hot(scored.targets.long(), ranks.shape[1])
    ap = per_concept_ap(ranks, onehot)
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["concept", "ap", "positives"])
    for name, a, n in zip(scored.concepts, ap.tolist(), onehot.sum(0).tolist(), strict=True):
        w.writerow([name, "" if a != a else f"{a:.4f}", int(n)])
    return out.getvalue()


def curve_figure(scored: Scored) -> Figure:
    """Precision-recall curves (multi-label; micro average + up to 10 concepts) or a confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix, precision_recall_curve

    if scored.multilabel:
        probs, t = torch.sigmoid(scored.logits).numpy(), scored.targets.int().numpy()
        fig, ax = plt.subplots(figsize=(6, 5))
        p, r, _ = precision_recall_curve(t.ravel(), probs.ravel())
        ax.plot(r, p, color="black", lw=2, label="micro average")
        for k, name in enumerate(scored.concepts[:10]):
            if t[:, k].any():
                p, r, _ = precision_recall_curve(t[:, k], probs[:, k])
                ax.plot(r, p, lw=1, alpha=0.7, label=name)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"test mAP {scored.metrics.get('test_map', float('nan')):.3f}")
        ax.legend(fontsize=7, loc="lower left")
    else:
        k = len(scored.concepts)
        cm = confusion_matrix(scored.targets.numpy(), scored.logits.argmax(1).numpy(), labels=list(range(k)))
        fig, ax = plt.subplots(figsize=(6, 5))
        im = ax.imshow(cm, cmap="Blues")
        fig.colorbar(im, ax=ax)
        ticks = range(k) if k <= 30 else []
        ax.set_xticks(list(ticks), [scored.concepts[i] for i in ticks], rotation=90, fontsize=7)
        ax.set_yticks(list(ticks), [scored.concepts[i] for i in ticks], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"test top-1 error {scored.metrics.get('test_top1_error', float('nan')):.3f}")
    fig.tight_layout()
    return fig
