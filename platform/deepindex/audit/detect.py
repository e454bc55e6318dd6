"""Suspect (item, concept) labels from out-of-fold probabilities, with cleanlab.

cleanlab's multi-label Confident Learning treats every concept as a one-vs-rest binary
task: per concept it estimates how many given 1s should be 0 ("wrong tag") and how many
given 0s should be 1 ("missing tag") from the out-of-fold probabilities, and flags that many
labels, least confident first (``audit.filter_by``, default ``prune_by_noise_rate``).  Its
per-concept noise estimates (``rank_classes_by_multilabel_quality``) summarise the labels.
Nothing here trains or touches Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Detection:
    flagged: np.ndarray  # (N, K) bool: suspect labels
    quality: np.ndarray  # (N, K) float: probability the given label is right (self-confidence)
    concepts: list[str]
    concept_noise: list[dict[str, Any]]  # per concept: cleanlab's estimated counts and rates of wrong/missing tags

    @property
    def items(self) -> np.ndarray:
        """(M,) indices of items with a suspect label, most suspect first."""
        idx = np.flatnonzero(self.flagged.any(1))
        worst = np.where(self.flagged, self.quality, np.inf).min(1)[idx]
        return idx[np.argsort(worst, kind="stable")]


def _label_lists(given: np.ndarray) -> list[list[int]]:
    return [np.flatnonzero(row).tolist() for row in given]


def detect(given: np.ndarray, probs: np.ndarray, concepts: list[str],
           filter_by: str = "prune_by_noise_rate") -> Detection:
    """Flag suspect labels of ``given`` (N, K 0/1) from out-of-fold ``probs`` (N, K)."""
    from cleanlab.multilabel_classification.dataset import rank_classes_by_multilabel_quality
    from cleanlab.multilabel_classification.filter import find_multilabel_issues_per_class
    from cleanlab.multilabel_classification.rank import get_label_quality_scores_per_class

    given = np.asarray(given) > 0.5
    probs = np.asarray(probs, dtype=np.float64)
    if given.shape != probs.shape or given.ndim != 2 or given.shape[1] != len(concepts):
        raise ValueError(f"audit: labels {given.shape} and probabilities {probs.shape} do not match "
                         f"{len(concepts)} concepts")
    labels = _label_lists(given)
    flagged = np.asarray(find_multilabel_issues_per_class(labels, probs, filter_by=filter_by), dtype=bool)
    quality = np.asarray(get_label_quality_scores_per_class(labels, probs, method="self_confidence"))
    if quality.shape != given.shape:  # documented as K arrays of (N,); 2.9 returns (N, K)
        quality = np.stack(list(quality), axis=1)
    table = rank_classes_by_multilabel_quality(labels, probs, class_names=list(concepts))
    rows = {int(r["Class Index"]): r for r in table.to_dict("records")}
    noise = []
    for k, name in enumerate(concepts):
        r = rows.get(k, {})
        noise.append({"concept": name, "given": int(given[:, k].sum()),
                      "wrong_tags_est": int(r.get("Label Issues", 0) or 0),
                      "missing_tags_est": int(r.get("Inverse Label Issues", 0) or 0),
                      "wrong_tag_rate_est": float(r.get("Label Noise", 0.0) or 0.0),
                      "missing_tag_rate_est": float(r.get("Inverse Label Noise", 0.0) or 0.0),
                      "flagged_wrong": int((flagged[:, k] & given[:, k]).sum()),
                      "flagged_missing": int((flagged[:, k] & ~given[:, k]).sum())})
    return Detection(flagged, quality, list(concepts), noise)


def detection_scores(flagged: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision and recall of flagged (item, concept) pairs against the known corrupted pairs."""
    flagged, truth = np.asarray(flagged, bool), np.asarray(truth, bool)
    tp = int((flagged & truth).sum())
    return {"precision": tp / max(int(flagged.sum()), 1), "recall": tp / max(int(truth.sum()), 1),
            "flagged": int(flagged.sum()), "corrupted": int(truth.sum()), "true_positives": tp}
