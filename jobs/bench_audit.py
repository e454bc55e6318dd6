"""Benchmark: a label audit on digit-scenes with 30 % label noise, and what its cleaned labels buy.

For each K in --folds: the audit's wall time (K trainings on the connected Ray cluster, then
cleanlab), the precision and recall of its flagged (item, concept) labels against the known
corruptions; then the same model trained on the noisy, the audit-filtered (one per K) and the
clean labels, each scored on the clean test split (mAP; with --classes, single-label digits with
30 % of the items filed under another class, the top-1 error).  Prints JSON.

    python jobs/bench_audit.py [--classes] [--folds 3 5] [--seeds 0 1] [--name bench] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from deepindex.audit.bench import NOISY_CLASSES, NOISY_DIGITS, label_views, train_and_score
    from deepindex.audit.run import check_config, run_audit
    from deepindex.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", action="store_true", help="exclusive classes: NOISY_CLASSES, not NOISY_DIGITS")
    ap.add_argument("--folds", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--name", default=time.strftime("bench-audit-%Y%m%d-%H%M%S"))
    ap.add_argument("--tracking-uri")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setting = NOISY_CLASSES if args.classes else NOISY_DIGITS
    base = load_config(None, [*setting, *args.overrides])
    audits: dict[str, dict[str, Any]] = {}
    reports: dict[int, str] = {}
    threads = base.train.threads or 1  # one process trains the views one after the other
    for k in args.folds:
        cfg = base.override({"audit.folds": k})
        check_config(cfg)
        out = run_audit(cfg, name=f"{args.name}-k{k}", tracking_uri=args.tracking_uri)
        print(out.summary, flush=True)
        s = out.scores  # None only where the overrides turned the synthetic noise off
        audits[f"k{k}"] = {"wall_s": round(out.wall_s, 1), "flagged_labels": out.flagged,
                           "precision": round(s["precision"], 4) if s else None,
                           "recall": round(s["recall"], 4) if s else None,
                           "oof_map_given": round(out.oof_map, 4),
                           "oof_map_clean": round(out.meta.get("oof_map_clean", float("nan")), 4),
                           "fold_test_score": [None if f.test_score is None else round(f.test_score, 4)
                                               for f in out.folds],
                           "report": str(out.report), "mlflow_parent_run_id": out.parent_run_id}
        reports[k] = str(out.report)
    views = label_views("")
    test_score: dict[str, list[float]] = {}  # test mAP, or top-1 error with --classes
    for seed in args.seeds:
        for name in ("noisy", "clean"):
            test_score.setdefault(name, []).append(
                train_and_score(base.override({**views[name], "train.seed": seed}), threads))
        for k, report in reports.items():
            cfg = base.override({**label_views(report)["filtered"], "train.seed": seed})
            test_score.setdefault(f"filtered_k{k}", []).append(train_and_score(cfg, threads))
    mean = {name: round(sum(v) / len(v), 4) for name, v in test_score.items()}
    metric = "test_map" if base.multilabel else "test_top1_error"
    result = {"setting": setting + list(args.overrides), "seeds": args.seeds, "audits": audits,
              f"{metric}_mean": mean, metric: {k: [round(x, 4) for x in v] for k, v in test_score.items()}}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
