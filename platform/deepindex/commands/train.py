"""``deepindex train`` and ``deepindex evaluate``."""
from __future__ import annotations

import argparse
import json

from deepindex.commands import run_name


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults apply to what it leaves out)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.1")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train a model with Ray Train on the connected cluster")
    add_config_args(p)
    p.add_argument("--name", type=run_name, help="run name (A-Z a-z 0-9 . _ -); the same name and storage path "
                                                "resume a run")
    p.set_defaults(func=run_train)

    e = sub.add_parser("evaluate", help="a model's metrics on a split of its dataset")
    e.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a checkpoint (its folder or "
                                 "checkpoint.pt)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--tracking-uri", help="MLflow tracking URI for a models:/ URI (default: the local platform's)")
    e.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE",
                   help="change the checkpoint's data config, e.g. data.root=/new/place for a collection that moved")
    e.set_defaults(func=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    from deepindex.workflows import train_main

    train_main(args.config, args.overrides, name=args.name)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from deepindex.tracking.registry import resolve_model
    from deepindex.train.evaluation import evaluate_checkpoint

    resolved = resolve_model(args.model, args.tracking_uri)
    print(json.dumps(evaluate_checkpoint(resolved.checkpoint_path, args.split, args.overrides), indent=2))
    return 0
