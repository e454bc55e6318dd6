"""``deepindex data audit``: find suspect labels with K-fold out-of-fold predictions + cleanlab."""
from __future__ import annotations

import argparse

from deepindex.commands import run_name
from deepindex.commands.train import add_config_args


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("data", help="inspect training data: audit noisy labels")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    a = dsub.add_parser(
        "audit", help="K-fold out-of-fold predictions on the cluster, then cleanlab flags wrong and missing tags",
        description="Train audit.folds models of the configured model in parallel (Ray Tune, one trial per "
                    "fold), each predicting the fold it did not see; cleanlab then ranks suspect (item, concept) "
                    "labels. Writes <ray.storage_path>/<name>/report/ (suspects.csv, concepts.csv, "
                    "cleaned_labels.jsonl, suspects.png, audit.json) and an MLflow parent run with one child "
                    "run per fold. Train on the cleaned labels with data.label_filter=<report folder>.")
    add_config_args(a)
    a.add_argument("--name", type=run_name, help="audit name (A-Z a-z 0-9 . _ -); the same name and storage path "
                                                "resume an interrupted audit")
    a.add_argument("--tracking-uri",
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, then the local platform's)")
    a.set_defaults(func=run_audit_command)


def run_audit_command(args: argparse.Namespace) -> int:
    from deepindex.workflows import audit_main

    audit_main(args.config, args.overrides, name=args.name, tracking_uri=args.tracking_uri)
    return 0
