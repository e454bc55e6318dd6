"""``deepindex tracking sync``: replay the tracking journals of runs that ended while MLflow was down."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tracking", help="MLflow tracking housekeeping")
    tsub = p.add_subparsers(dest="tracking_command", required=True, metavar="ACTION")
    s = tsub.add_parser("sync", help="log the journaled epochs and final results of runs that ended while the "
                                     "tracking server was unreachable, and end those runs")
    s.add_argument("--storage", help="Ray storage path the runs wrote to (default: <state dir>/ray_results)")
    s.add_argument("--tracking-uri",
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the local platform's)")
    s.set_defaults(func=run_sync)


def run_sync(args: argparse.Namespace) -> int:
    from deepindex.tracking.uri import reachable, resolve_tracking_uri
    from deepindex.workflows import sync_journals

    uri = args.tracking_uri or resolve_tracking_uri(warn=False)
    if uri is None or not reachable(uri):
        raise ValueError(f"tracking-uri: no reachable MLflow server ({uri or 'none configured'})")
    done = sync_journals(args.storage, uri)
    print(json.dumps([vars(d) for d in done], indent=2))
    return 0 if all(d.status == "synced" for d in done) else 1
