"""``deepindex up`` / ``down`` / ``status``: the local Ray head and MLflow server."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from deepindex.localplatform import DEFAULT_MLFLOW_PORT, DEFAULT_RAY_PORT

    p = sub.add_parser("up", help="start a local Ray head and MLflow tracking server (idempotent)")
    p.add_argument("--ray-port", type=int, default=DEFAULT_RAY_PORT, help="Ray GCS port (0: any free port)")
    p.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT, help="MLflow port (0: any free port)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the head (default: the cores; more lets Train+Tune overlap on few cores)")
    p.set_defaults(func=run_up)
    d = sub.add_parser("down", help="stop the local platform's processes (by their recorded ids)")
    d.set_defaults(func=run_down)
    s = sub.add_parser("status", help="the local platform's services, addresses and processes")
    s.set_defaults(func=run_status)


def run_up(args: argparse.Namespace) -> int:
    from deepindex.localplatform import PlatformError, up

    try:
        services = up(ray_port=args.ray_port, mlflow_port=args.mlflow_port, num_cpus=args.num_cpus)
    except PlatformError as e:
        print(f"deepindex up: error: {e}", file=sys.stderr)
        return 1
    from deepindex.workflows import sync_pending

    ray, mlflow = services["ray"], services["mlflow"]
    sync_pending(None, mlflow.address)  # runs that ended while this server was down
    print(f"Ray head:      {ray.address}  (pid {ray.pid}; jobs in this project connect to it)")
    print(f"MLflow server: {mlflow.address}  (pid {mlflow.pid}; open it in a browser for the UI)")
    print("stop with: deepindex down")
    return 0


def run_down(args: argparse.Namespace) -> int:
    from deepindex.localplatform import down

    stopped = down()
    if not stopped:
        print("the local platform was not running")
    for name, pids in stopped.items():
        print(f"{name}: stopped {len(pids)} processes" if pids else f"{name}: was not running")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from deepindex.config import load_config
    from deepindex.localplatform import status
    from deepindex.tracking.tracker import pending_journals
    from deepindex.train.trainer import storage_path

    st = status()
    pending = [str(p) for p in pending_journals(storage_path(load_config(None, [])))]
    if pending:
        print(f"runs with tracking journals not yet in MLflow (`deepindex tracking sync` logs them): {pending}")
    if not st:
        print("the local platform is not running (start it with: deepindex up)")
        return 1
    print(json.dumps(st, indent=2))
    return 0 if all(v["state"] == "running" for v in st.values()) else 1
