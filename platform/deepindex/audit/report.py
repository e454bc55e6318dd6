"""An audit's report: files a person reads and a filter reads back (no Ray, no MLflow).

A report folder holds:

- ``suspects.csv``: one row per suspect (item, concept) label, most suspect first:
  ``rank, index, item, concept, issue (wrong_tag | missing_tag), given, pred_prob, quality``
  (+ ``corrupted`` when the noise is synthetic and the truth is known);
- ``concepts.csv``: per concept, cleanlab's estimated wrong/missing tag counts and rates
  and what was flagged (+ the detection's precision and recall when the truth is known);
- ``cleaned_labels.jsonl``: every train item's given and cleaned tags (``data.label_filter``
  with ``label_filter_mode=flip`` trains on exactly these); for a manifest dataset also
  ``cleaned_manifest.jsonl`` (``{"path", "tags", "split"}``), a manifest ``data.manifest`` accepts:
  every item of the collection, the train items with their cleaned tags, the val and test items
  with the tags they were given, each in the split it was in, so training on it keeps the splits;
- ``oof_probs.npy``: the (N, K) out-of-fold probabilities; ``audit.json``: settings, data
  fingerprint, summary; ``suspects.png``: the most suspect items as an image grid.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from deepindex.atomic import write_file
from deepindex.audit.detect import Detection
from deepindex.data.label_view import AUDIT_FILE, SUSPECT_COLUMNS, SUSPECTS_FILE
from deepindex.train.metrics import GUESS, learnt_little

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from deepindex.data import Splits
    from deepindex.data.transforms import NormStats

CONCEPTS_FILE = "concepts.csv"
CLEANED_FILE = "cleaned_labels.jsonl"
CLEANED_MANIFEST = "cleaned_manifest.jsonl"
PROBS_FILE = "oof_probs.npy"
GRID_FILE = "suspects.png"


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    return f.getvalue()


def suspect_rows(det: Detection, given: np.ndarray, probs: np.ndarray, ids: list[str],
                 truth: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One row per flagged pair, lowest label quality first."""
    items, concepts = np.nonzero(det.flagged)
    order = np.lexsort((concepts, items, det.quality[items, concepts]))
    rows = []
    for rank, j in enumerate(order, start=1):
        i, k = int(items[j]), int(concepts[j])
        g = int(given[i, k] > 0.5)
        row = {"rank": rank, "index": i, "item": ids[i], "concept": det.concepts[k],
               "issue": "wrong_tag" if g else "missing_tag", "given": g,
               "pred_prob": round(float(probs[i, k]), 5), "quality": round(float(det.quality[i, k]), 5)}
        if truth is not None:
            row["corrupted"] = int(bool(truth[i, k]))
        rows.append(row)
    return rows


def cleaned(given: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """The flip view: every suspect label replaced by its opposite."""
    g = np.asarray(given) > 0.5
    return g ^ np.asarray(flagged, bool)


# An audit that flags more than this share of the items is read as one of weak fold models, not of noisy
# labels: cleanlab flags where the out-of-fold predictions disagree with the given labels, and a model
# that has not learnt the concepts disagrees everywhere.  Web labels with half their items wrong are rare
# (digit-scenes with 50 % of the items' tags corrupted and the out-of-fold probabilities of a good model,
# made as tests/audit/test_detect_report.py makes them: 49 % of the items flagged; probabilities at
# chance: all of them; the example photos' exact labels after a real 2-epoch audit per fold: 91 %).
WEAK_MODEL_SHARE = 0.5


def weak_model_warning(det: Detection, oof_map: float) -> str | None:
    """What to tell the user when the flags say more about the fold models than about the labels."""
    n, items = int(det.flagged.any(1).sum()), len(det.flagged)
    if n <= WEAK_MODEL_SHARE * items:
        return None
    return (f"{n} of {items} items ({100 * n / items:.0f} %) have a suspect label, more than label noise usually "
            f"explains: the fold models (out-of-fold mAP {oof_map:.4f} against the given labels) are likely too weak "
            "to tell their own errors from wrong labels. Train them longer (train.epochs) or from ImageNet weights "
            "(model.pretrained=imagenet) before training on this report")


def weak_folds_warning(scores: list[float], chance: float, multilabel: bool) -> str | None:
    """Folds whose model scored on the test split hardly better than ``chance``
    (:func:`deepindex.train.metrics.chance_score`), named."""
    weak = [k for k, s in enumerate(scores) if learnt_little(s, chance, multilabel)]
    what, guess = ("test mAP" if multilabel else "test top-1 error"), GUESS[multilabel]
    if not weak:
        return None
    names = " and ".join(", ".join(str(k + 1) for k in weak).rsplit(", ", 1))
    they = "it" if len(weak) == 1 else "they"
    return (f"fold{'s' if len(weak) > 1 else ''} {names} of {len(scores)} learnt next to nothing ({what} "
            f"{', '.join(f'{scores[k]:.4f}' for k in weak)}; {guess}: {chance:.4f}): the items {they} predicted are "
            f"judged by a guess, so their flags are noise. Train the folds longer (train.epochs), from ImageNet "
            f"weights (model.pretrained=imagenet) or with another train.seed, and audit again")


def combine_warnings(*warnings: str | None) -> str | None:
    """The warnings given (None: none), one text: each a sentence of its own, ended by a full stop (they
    ran together: "... and audit again 226 of 300 items ...")."""
    said = [w.strip() for w in warnings if w and w.strip()]
    return " ".join(w if w.endswith((".", "!", "?")) else f"{w}." for w in said) or None


def summary_table(det: Detection, scores: dict[str, float] | None = None,
                  per_concept: list[dict[str, Any]] | None = None, warning: str | None = None) -> str:
    """A fixed-width table: per concept, estimated and flagged wrong/missing tags (and ``warning`` last)."""
    head = f"{'concept':>10} {'tagged':>7} {'est.wrong':>9} {'est.missing':>11} {'flag.wrong':>10} {'flag.missing':>12}"
    if per_concept:
        head += f" {'corrupted':>9} {'precision':>9} {'recall':>7}"
    lines = [head, "-" * len(head)]
    for k, c in enumerate(det.concept_noise):
        line = (f"{c['concept']:>10} {c['given']:>7} {c['wrong_tags_est']:>9} {c['missing_tags_est']:>11} "
                f"{c['flagged_wrong']:>10} {c['flagged_missing']:>12}")
        if per_concept:
            p = per_concept[k]
            line += f" {p['corrupted']:>9} {p['precision']:>9.3f} {p['recall']:>7.3f}"
        lines.append(line)
    n_items = int(det.flagged.any(1).sum())
    lines.append(f"{int(det.flagged.sum())} suspect labels on {n_items} of {len(det.flagged)} items")
    if scores:
        lines.append(f"against the known corruptions: precision {scores['precision']:.3f}, "
                     f"recall {scores['recall']:.3f} ({scores['true_positives']} of {scores['flagged']} flagged "
                     f"pairs corrupted; {scores['corrupted']} corrupted pairs)")
    if warning:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


# The splits a cleaned manifest lists besides train: split -> (ids, (n, K) given tags).
HeldSplits = dict[str, tuple[list[str], np.ndarray]]


def held_splits(splits: Splits, root: str | None) -> HeldSplits:
    """The val and test items of ``splits`` as the cleaned manifest lists them: their ids (paths
    relative to ``root``, as the train items' ids are) and the tags they were given."""
    from deepindex.data.label_view import item_ids, targets_of
    from deepindex.data.noise import multi_hot

    k = len(splits.concepts)
    return {name: (item_ids(ds, name, root), multi_hot(targets_of(ds), k).numpy())
            for name, ds in (("val", splits.val), ("test", splits.test))}


def write_report(out: str | Path, *, det: Detection, given: np.ndarray, probs: np.ndarray, ids: list[str],
                 meta: dict[str, Any], truth: np.ndarray | None = None, per_concept: list[dict[str, Any]] | None = None,
                 manifest: bool = False, held: HeldSplits | None = None) -> Path:
    """Write every report file but the image grid into ``out``; returns the folder.

    ``manifest``: also ``cleaned_manifest.jsonl``, which needs ``held`` (:func:`held_splits`): a
    manifest of the train items alone made whoever trained on it carve new val and test splits
    from the audited train items (found on review)."""
    if manifest and held is None:
        raise ValueError("audit report: a cleaned manifest needs the val and test items (held)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = suspect_rows(det, given, probs, ids, truth)
    cols = SUSPECT_COLUMNS + (["corrupted"] if truth is not None else [])
    # Each file written whole and synced (deepindex.atomic): a reader, or a filter, never sees half of one.
    write_file(out / SUSPECTS_FILE, _csv(rows, cols))
    table = [dict(c, **(per_concept[k] if per_concept else {})) for k, c in enumerate(det.concept_noise)]
    write_file(out / CONCEPTS_FILE, _csv(table, list(table[0])))

    clean = cleaned(given, det.flagged)
    g = np.asarray(given) > 0.5
    lines, manifest_lines = [], []
    for i, item in enumerate(ids):
        tags = [det.concepts[k] for k in np.flatnonzero(clean[i])]
        lines.append(json.dumps({"item": item, "index": i, "tags": tags,
                                 "given": [det.concepts[k] for k in np.flatnonzero(g[i])]}))
        if manifest:
            manifest_lines.append(json.dumps({"path": item, "tags": tags, "split": "train"}))
    write_file(out / CLEANED_FILE, "\n".join(lines) + "\n")
    if manifest and held is not None:
        # Every item in the split it was in (the split column pins them: none is carved again), the
        # train items first and in the audit's order, so the train split read back is the audit's, item
        # for item.  The val tags are the ones the audit's config gave (data.label_noise included).
        for split, (split_ids, split_tags) in held.items():
            tagged = np.asarray(split_tags) > 0.5
            manifest_lines.extend(json.dumps({"path": item, "tags": [det.concepts[k] for k in np.flatnonzero(row)],
                                              "split": split}) for item, row in zip(split_ids, tagged, strict=True))
        write_file(out / CLEANED_MANIFEST, "\n".join(manifest_lines) + "\n")
    npy = io.BytesIO()
    np.save(npy, np.asarray(probs, dtype=np.float32), allow_pickle=False)
    write_file(out / PROBS_FILE, npy.getvalue())
    # Written last: a folder with audit.json is a complete report (the label filter needs both).
    write_file(out / AUDIT_FILE, json.dumps(meta, indent=2, default=str))
    return out


def _unnormalize(x: torch.Tensor, stats: NormStats) -> torch.Tensor:
    mean = torch.tensor(stats.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(stats.std, dtype=x.dtype).view(-1, 1, 1)
    return (x * std + mean).clamp(0, 1)


def suspects_grid(dataset: Dataset[tuple[torch.Tensor, torch.Tensor]], stats: NormStats, det: Detection,
                  given: np.ndarray, probs: np.ndarray, ids: list[str], n: int = 24,
                  truth: np.ndarray | None = None, exclusive: bool = False) -> Figure:
    """A matplotlib figure: the ``n`` most suspect items, each with its given tags, the tags the
    model predicts (p > 0.5; exclusive classes: its most probable class), and the suspect labels:
    ``-c`` a wrong tag, ``+c`` a missing one
    (red when the noise is known and the flag is a false alarm, green when it is right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    items = det.items[:n]
    cols = min(6, max(1, len(items)))
    rows = max(1, -(-len(items) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.6 * rows), squeeze=False)
    g = np.asarray(given) > 0.5
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), items, strict=False):
        x = _unnormalize(dataset[int(i)][0].float(), stats)  # (C, H, W)
        img = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
        ax.imshow(img, cmap="gray" if x.shape[0] == 1 else None, vmin=0, vmax=1)
        names = det.concepts
        given_t = " ".join(names[k] for k in np.flatnonzero(g[i])) or "-"
        predicted = [int(probs[i].argmax())] if exclusive else np.flatnonzero(probs[i] > 0.5)
        pred_t = " ".join(names[k] for k in predicted) or "-"
        ax.set_title(f"{ids[i]}\ngiven: {given_t}\npred:  {pred_t}", fontsize=7, loc="left", family="monospace")
        flags = np.flatnonzero(det.flagged[i])
        flags = flags[np.argsort(det.quality[i, flags], kind="stable")]  # most suspect first
        for j, k in enumerate(flags[:4]):
            label = f"{'-' if g[i, k] else '+'}{names[k]} ({probs[i, k]:.2f})"
            color = "black" if truth is None else ("green" if truth[i, k] else "red")
            ax.text(0.02, 0.02 + 0.13 * j, label, transform=ax.transAxes, fontsize=7, color=color,
                    family="monospace", bbox={"facecolor": "white", "alpha": 0.8, "pad": 1, "linewidth": 0})
    fig.suptitle(f"most suspect of {int(det.flagged.any(1).sum())} flagged items: -c wrong tag, +c missing tag "
                 "(model probability)", fontsize=8)
    fig.tight_layout()
    return fig
