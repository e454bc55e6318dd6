"""``deepindex tune`` (a Ray Tune sweep) and ``deepindex promote`` (registry + champion alias)."""
from __future__ import annotations

import argparse

from deepindex.commands import run_name


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from deepindex.tune.space import shipped_spaces

    p = sub.add_parser("tune", help="run (or resume) a hyperparameter sweep with Ray Tune, tracked in MLflow")
    p.add_argument("--space", default="default",
                   help=f"a shipped space ({', '.join(shipped_spaces())}) or a search space YAML (default: default)")
    p.add_argument("--config", help="training YAML every trial starts from (replaces the space's `base`), "
                                    "e.g. the recipe `deepindex example photos` writes")
    p.add_argument("--name", type=run_name, help="sweep name (A-Z a-z 0-9 . _ -); the same name resumes an "
                                                "interrupted sweep")
    p.add_argument("--samples", type=int, help="override tune.num_samples")
    p.add_argument("--search", choices=["random", "grid", "optuna"], help="override tune.search")
    p.add_argument("--max-concurrent", type=int, help="override tune.max_concurrent_trials (0: sized to the cluster)")
    p.add_argument("--no-promote", action="store_true", help="do not promote the best trial at the end")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the base config; tune.KEY=VALUE sets the space's sweep setting "
                        "(e.g. tune.seed_defaults=false)")
    p.set_defaults(func=run_tune)

    q = sub.add_parser("promote", help="register a sweep's best trial; move alias `champion` only if it is better")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--sweep", help="sweep name (its best trial is promoted)")
    g.add_argument("--run", dest="run_id", help="an MLflow run id with a checkpoint/ artifact")
    q.add_argument("--model", help="registered model name (default: the run's own tracking.registered_model, "
                                   "deepindex unless its config set another)")
    q.add_argument("--experiment", default="deepindex", help="MLflow experiment of the sweep")
    q.add_argument("--min-qbe-map", type=float, metavar="MAP",
                   help="retrieval floor: refuse unless the candidate's query-by-example mAP@10 on a held-out "
                        "gallery reaches it (default: the candidate's tracking.promote_min_qbe_map)")
    q.set_defaults(func=run_promote)


def run_tune(args: argparse.Namespace) -> int:
    from deepindex.tune.main import tune_main

    settings = {k: v for k, v in {"num_samples": args.samples, "search": args.search,
                                  "max_concurrent_trials": args.max_concurrent}.items() if v is not None}
    out = tune_main(args.space, args.overrides, name=args.name, settings=settings,
                    promote=False if args.no_promote else None, config=args.config)
    return 3 if out["interrupted"] else 0


def run_promote(args: argparse.Namespace) -> int:
    from deepindex.workflows import promote_main

    promote_main(sweep=args.sweep, run_id=args.run_id, model=args.model, experiment=args.experiment,
                 min_qbe_map=args.min_qbe_map)
    return 0
