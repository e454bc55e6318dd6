"""``deepindex up`` / ``down`` / ``status`` / ``env``: the local Ray head and MLflow server."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from deepindex.commands import whole_number

# What each address is for, in the order `status` and `up` print them.
_ADDRESSES = {
    "ray": "Ray head (RAY_ADDRESS; deepindex jobs, ray.init, `ray status`)",
    "dashboard": "Ray dashboard + Jobs API (RAY_API_SERVER_ADDRESS; `ray job submit`, `deepindex submit`)",
    "client": "Ray Client (ray.init(\"ray://...\") from another machine's Python)",
    "mlflow": "MLflow tracking server (MLFLOW_TRACKING_URI)",
    "ui": "MLflow UI, on the runs table (model training, not the GenAI overview)",
    "serve": "Serve application (`deepindex serve`)",
    "docs": "Serve API docs",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from deepindex.localplatform import DEFAULT_DASHBOARD_PORT, DEFAULT_MLFLOW_PORT, DEFAULT_RAY_PORT

    p = sub.add_parser("up", help="start a local Ray head and MLflow tracking server (idempotent)")
    # Bad numbers are argparse's one-line error naming the option (exit 2), before anything starts.
    p.add_argument("--ray-port", type=_port, default=DEFAULT_RAY_PORT, help="Ray GCS port (0: any free port)")
    p.add_argument("--dashboard-port", type=_port, default=DEFAULT_DASHBOARD_PORT,
                   help="Ray dashboard and Jobs API port, on loopback (0: any free port)")
    p.add_argument("--mlflow-port", type=_port, default=DEFAULT_MLFLOW_PORT, help="MLflow port (0: any free port)")
    p.add_argument("--num-cpus", type=_cpus, default=None,
                   help="logical CPUs of the head (default: DEEPINDEX_NUM_CPUS, else the cores and at least 4: "
                        "a service, a sweep's trial and its Train workers each hold some)")
    p.set_defaults(func=run_up)
    d = sub.add_parser("down", help="stop the local platform's processes (by their recorded ids)")
    d.set_defaults(func=run_down)
    s = sub.add_parser("status", help="the local platform's services, every address to use them, and processes")
    s.add_argument("--json", action="store_true",
                   help='the full status as one JSON object: {"running", "services" (pids, logs, health), '
                        '"pending_journals"}')
    s.set_defaults(func=run_status)
    e = sub.add_parser("env", help="`export` lines that point ray, mlflow and deepindex at the local platform "
                                   "(and unset a remote cluster's RAY_AUTH_TOKEN): eval $(deepindex env)")
    e.set_defaults(func=run_env)


def _port(text: str) -> int:
    """A TCP port for `up`; 0 asks for any free one (localplatform.up picks it)."""
    from deepindex.localplatform import MAX_PORT

    n = whole_number(text)
    if not 0 <= n <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"a port must be 0-{MAX_PORT} (0: any free port), not {n}")
    return n


def _cpus(text: str) -> int:
    n = whole_number(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (leave it out for the default), not {n}")
    return n


def run_up(args: argparse.Namespace) -> int:
    from deepindex.console import event
    from deepindex.localplatform import PlatformError, up

    try:
        services = up(ray_port=args.ray_port, mlflow_port=args.mlflow_port, num_cpus=args.num_cpus,
                      dashboard_port=args.dashboard_port)
    except PlatformError as e:
        print(f"deepindex up: error: {e}", file=sys.stderr)
        return 1
    from deepindex.workflows import sync_pending

    ray, mlflow = services["ray"], services["mlflow"]
    sync_pending(None, mlflow.address)  # runs that ended while this server was down
    event("platform up: Ray head %s (pid %d), MLflow %s (pid %d)", ray.address, ray.pid, mlflow.address, mlflow.pid)
    urls = {**(ray.urls or {"ray": ray.address}), **_with_ui(mlflow.urls or {"mlflow": mlflow.address})}
    for name, url in urls.items():
        event("  %-10s %-28s %s", name, url, _ADDRESSES.get(name, ""))
    event("  other shells: eval $(deepindex env); stop with: deepindex down")
    return 0


def run_down(args: argparse.Namespace) -> int:
    from deepindex.localplatform import PlatformError, down

    try:
        stopped = down()
    except PlatformError as e:
        print(f"deepindex down: error: {e}", file=sys.stderr)
        return 1
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

    recorded = status()
    pending = [str(p) for p in pending_journals(storage_path(load_config(None, [])))]
    # A Serve application that stopped answering is reported, not a platform failure.  A platform without its
    # Ray head runs nothing (an `up` whose head failed to start leaves MLflow alone in the state file), as
    # `deepindex env` says; one without MLflow runs, its runs journaled until MLflow is up.
    running = recorded.get("ray", {}).get("state") == "running" and all(
        v["state"] == "running" for k, v in recorded.items() if k != "serve")
    st = _with_missing(recorded)  # a service left out is named, not passed over
    not_running = "the local platform is not running (start it with: deepindex up)"
    pending_line = f"runs with tracking journals not yet in MLflow (`deepindex tracking sync` logs them): {pending}"
    if args.json:
        # stdout is one JSON document, whatever the state; the sentences for people go to stderr.
        print(json.dumps({"running": running, "services": st, "pending_journals": pending}, indent=2))
        if pending:
            print(pending_line, file=sys.stderr)
        if not st:
            print(not_running, file=sys.stderr)
        return 0 if running else 1
    if pending:
        print(pending_line)
    if not st:
        print(not_running)
        return 1
    _print_status(st)
    return 0 if running else 1


_MISSING = {"state": "not running", "hint": "start it with: deepindex up"}


def _with_missing(st: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``st`` with each platform service that is not recorded (a half-started platform: `up` leaves out of the
    state file a service that failed to start) as not running; {} stays {} (the platform is not running)."""
    from deepindex.localplatform import SERVICES

    if not st:
        return st
    missing = {name: dict(_MISSING) for name in SERVICES if name not in st}
    return {**missing, **st} if missing else st


def _with_ui(urls: dict[str, str]) -> dict[str, str]:
    from deepindex.tracking.uri import experiment_ui_url

    return {**urls, "ui": experiment_ui_url(urls["mlflow"])} if "mlflow" in urls else urls


def _print_status(st: dict[str, dict[str, Any]]) -> None:
    for name, info in st.items():
        if info["state"] == _MISSING["state"]:
            print(f"{name}: not running ({info['hint']})")
            continue
        extra = f"pid {info['pid']}, {len(info['processes'])} processes" if "pid" in info else f"app {info['app']}"
        health = "" if info.get("healthy", True) else ", not healthy"
        print(f"{name}: {info['state']} ({extra}{health})")
        urls = info.get("urls") or {}
        for what, url in (_with_ui(urls) if info["state"] == "running" else urls).items():
            print(f"  {what:<10} {url:<28} {_ADDRESSES.get(what, '')}")
        if "hint" in info:
            print(f"  {info['hint']}; log: {info['log']}")
    print("other shells: eval $(deepindex env)")


def run_env(args: argparse.Namespace) -> int:
    from deepindex.localplatform import client_env

    env = client_env()
    if "RAY_ADDRESS" not in env:
        print("deepindex env: the local platform is not running (start it with: deepindex up)", file=sys.stderr)
        return 1
    # One command per line, each ended by ";": the README's `eval $(deepindex env)` (unquoted) joins the lines.
    for k, v in env.items():
        print(f"export {k}={shlex.quote(v)};")
    # A shell set up for a remote cluster (the README's remote steps export RAY_AUTH_TOKEN) would go on
    # presenting that token to this head: Ray's clients read it before the token file named above.
    print("unset RAY_AUTH_TOKEN;")
    return 0
