"""Quality metrics: top-k error (single-label) and (mean) average precision (multi-label).

Average precision is computed here in torch (a sort and a cumulative sum per concept) rather than
with torchmetrics: every Train worker scores its validation shard each epoch, and importing
torchmetrics pulls in torchvision and ``torch._dynamo`` (about 1.7 s of CPU per worker process,
paid at every run's start).  tests/train/test_metrics.py holds it to scikit-learn's definition.
"""
from __future__ import annotations

import torch


def topk_error(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose target is not among the k highest logits.  (N, K), (N,)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (N, k)
    hit = (top == targets.view(-1, 1)).any(dim=1)
    return 1.0 - hit.float().mean().item()


def _average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AP of one concept: (N,) scores, (N,) 0/1, at least one positive.

    ``sklearn.metrics.average_precision_score``: the sum over distinct score thresholds (highest
    first) of precision at the threshold times the recall it adds; tied scores form one threshold.
    """
    s, order = torch.sort(scores.double(), descending=True, stable=True)
    tp = positive.double()[order].cumsum(0)  # true positives among the top i+1
    end = torch.ones_like(s, dtype=torch.bool)  # the last row of each group of tied scores
    end[:-1] = s[:-1] != s[1:]
    ranks = torch.arange(1, len(s) + 1, dtype=torch.float64)
    tp_at = tp[end]
    precision = tp_at / ranks[end]
    recall_added = torch.diff(tp_at, prepend=tp_at.new_zeros(1)) / tp[-1]
    return float((precision * recall_added).sum())


def per_concept_ap(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """AP per concept, (K,); NaN for a concept with no positive in ``targets``.  (N, K), (N, K) 0/1."""
    t = targets.int()
    ap = torch.full((t.shape[1],), float("nan"))  # undefined without positives: left out of the mean
    for k in range(t.shape[1]):
        if t[:, k].any():
            ap[k] = _average_precision(scores[:, k], t[:, k])
    return ap


def mean_ap(scores: torch.Tensor, targets: torch.Tensor) -> float:
    ap = per_concept_ap(scores, targets)
    return float(ap[~ap.isnan()].mean()) if (~ap.isnan()).any() else float("nan")


# A model that closes less than this share of the way from a guess to a perfect test score has learnt
# next to nothing (an audit's fold: its flags are noise; a training: its model is a guess).
LEARNT_LITTLE_GAIN = 0.25
# The guess :func:`chance_score` scores, by the model's kind (multi-label or not), in people's words.
GUESS = {True: "a random ranking", False: "always answering the most frequent class"}


def random_ap(n: int, positives: int) -> float:
    """A random ranking's expected AP of a concept with ``positives`` of ``n`` items:
    (H_n + (R - 1) / (n - 1) * (n - H_n)) / n, H_n the n-th harmonic number.  Its prevalence R / n,
    which stood for it, is lower (0.10 against 0.22 for 2 of 20; found on review)."""
    if positives <= 0 or n <= 0:
        return float("nan")
    if n == 1:
        return 1.0
    h = float(torch.arange(1, n + 1, dtype=torch.float64).reciprocal().sum())
    return (h + (positives - 1) / (n - 1) * (n - h)) / n


def chance_score(targets: torch.Tensor, multilabel: bool) -> float:
    """What a model that learnt nothing scores on a split: a random ranking's expected mAP
    (:func:`random_ap`, over the concepts present), or the top-1 error of always answering the most
    frequent class."""
    y = torch.as_tensor(targets)
    if multilabel:
        counts = y.double().sum(dim=0)
        present = [random_ap(len(y), int(c)) for c in counts.tolist() if c > 0]
        return sum(present) / len(present) if present else 0.0
    return float(1.0 - torch.bincount(y.long()).max() / len(y)) if len(y) else 1.0


def learnt_little(score: float, chance: float, multilabel: bool) -> bool:
    """``score`` (test mAP, or top-1 error) closes less than :data:`LEARNT_LITTLE_GAIN` of the gap from
    ``chance`` (:func:`chance_score`) to a perfect score; an unscored (NaN) one is not judged."""
    if score != score:
        return False
    if multilabel:
        return score < chance + LEARNT_LITTLE_GAIN * (1.0 - chance)
    return score > (1.0 - LEARNT_LITTLE_GAIN) * chance
