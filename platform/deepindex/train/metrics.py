"""Quality metrics: top-k error (single-label) and (mean) average precision (multi-label)."""
from __future__ import annotations

import torch
from torchmetrics.functional.classification import multilabel_average_precision


def topk_error(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose target is not among the k highest logits.  (N, K), (N,)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (N, k)
    hit = (top == targets.view(-1, 1)).any(dim=1)
    return 1.0 - hit.float().mean().item()


def per_concept_ap(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """AP per concept, (K,); NaN for a concept with no positive in ``targets``.

    Same definition as ``sklearn.metrics.average_precision_score`` (step-wise area under
    the precision-recall curve, no interpolation).
    """
    t = targets.int()
    ap = multilabel_average_precision(scores.float(), t, num_labels=t.shape[1], average=None)
    ap = ap.clone().float()
    ap[t.sum(dim=0) == 0] = float("nan")  # undefined without positives: left out of the mean
    return ap


def mean_ap(scores: torch.Tensor, targets: torch.Tensor) -> float:
    ap = per_concept_ap(scores, targets)
    return float(ap[~ap.isnan()].mean()) if (~ap.isnan()).any() else float("nan")
