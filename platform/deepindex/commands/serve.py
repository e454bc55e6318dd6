"""``deepindex serve``: run ``serving/config.yaml``'s application on the connected Ray cluster."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from deepindex.config import ConfigError

log = logging.getLogger(__name__)


def ensure_api_token() -> Path:
    """The local service's API token file (``<state>/serving/api_token``, mode 0600), made on first use."""
    import secrets

    from deepindex.paths import state_dir

    d = state_dir() / "serving"
    d.mkdir(parents=True, exist_ok=True)
    p = d / "api_token"
    if not (p.is_file() and p.read_text().strip()):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return p


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve tagging, keyword and similar-image search over HTTP (Ray Serve)")
    p.add_argument("--config", help="Serve config file (its first application; default: the serving package's "
                                    "config.yaml, wherever this command runs)")
    p.add_argument("--model", help="override args.model (models:/NAME@champion, models:/NAME/VERSION, a checkpoint)")
    p.add_argument("--collection", help="override args.collection (the collection served)")
    p.add_argument("--index", dest="index_dir", help="override args.index_dir (the collection's index folder)")
    p.add_argument("--host", help="override http_options.host")
    p.add_argument("--port", type=int, help="override http_options.port")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="override any build_app arg")
    p.add_argument("--detach", action="store_true", help="return once the app is up (it runs on until shut down)")
    p.set_defaults(func=run_serve)


def _mapping(value: Any, key: str, path: Path) -> dict[str, Any]:
    """``value`` (the YAML at ``key``; None: empty) as a dict, or a ConfigError naming the key and the file."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping (key: value lines), not {_a(value)}, in {path}")
    return value


def _a(value: Any) -> str:
    """What a YAML value is, for an error: "a list", "an int"."""
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _read_serve_config(cfg_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Serve config file's top level and its first application, each checked to be a mapping (with
    its ``args`` and ``http_options``) before anything starts: a malformed file is one line naming the key."""
    from deepindex.config import read_yaml

    cfg = _mapping(read_yaml(cfg_path, "config"), "config", cfg_path)
    apps = cfg.get("applications")
    if apps is not None and not isinstance(apps, list):
        raise ConfigError(f"applications: must be a list of applications, not {_a(apps)}, in {cfg_path}")
    if not apps:
        raise ValueError(f"serve: {cfg_path} defines no application")
    app = _mapping(apps[0], "applications[0]", cfg_path)
    _mapping(app.get("args"), "applications[0].args", cfg_path)
    _mapping(cfg.get("http_options"), "http_options", cfg_path)
    name = app.get("name", "deepindex")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"applications[0].name: must be a non-empty string, not {name!r}, in {cfg_path}")
    return cfg, app


def _app_args(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], str]:
    from deepindex.config import parse_overrides
    from serving.schemas import HERE

    cfg_path = Path(args.config) if args.config else HERE / "config.yaml"
    cfg, app = _read_serve_config(cfg_path)
    app_args = dict(app.get("args") or {})
    # Paths given on this command line are relative to where it runs, not to the repo.
    if args.model:
        m = args.model
        app_args["model"] = m if m.startswith("models:/") else str(Path(m).expanduser().resolve())
    if args.index_dir:
        app_args["index_dir"] = str(Path(args.index_dir).expanduser().resolve())
    if args.collection:
        app_args["collection"] = args.collection
    app_args.update(parse_overrides(args.arg))
    http = dict(cfg.get("http_options") or {})
    if args.host:
        http["host"] = args.host
    if args.port is not None:
        http["port"] = args.port
    port = http.get("port", 8000)
    if not (isinstance(port, int) and 1 <= port <= 65535):
        raise ValueError(f"port: {port!r} is not a TCP port (1-65535)")
    return app_args, http, app.get("name", "deepindex")


def write_token(app_args: dict[str, Any]) -> None:
    """The service's write token, unless the config names one: this environment's DEEPINDEX_API_TOKEN,
    handed to the replicas as its sha256 (a cluster started before this command gives them another
    environment, without the variable: writes were open there, found on review), else the token file
    under the state folder (made on first use)."""
    if app_args.get("api_token_file") or app_args.get("api_token_sha256"):
        return
    from serving.schemas import token_digest

    digest = token_digest(os.environ.get("DEEPINDEX_API_TOKEN") or "")
    if digest:
        app_args["api_token_sha256"] = digest
    else:
        app_args["api_token_file"] = str(ensure_api_token())


def run_serve(args: argparse.Namespace) -> int:
    app_args, http, name = _app_args(args)
    from deepindex.cluster import lasting_cluster

    if args.detach and lasting_cluster() is None:
        # The cluster this command would start is its own: the service would die as it returns.
        raise ValueError("--detach: no cluster outlives this command (the local platform is not up and RAY_ADDRESS "
                         "is not set), so the service would stop as it returns: start the platform first "
                         "(deepindex up), or leave --detach out to serve until Ctrl-C")
    write_token(app_args)
    from ray import serve

    from deepindex.cluster import connect, wait_for_resources
    from deepindex.config import validate_as
    from deepindex.console import adopt_library_loggers, event
    from serving.app import build_app
    from serving.schemas import ServeArgs

    adopt_library_loggers()  # importing ray.serve gave its logger a console handler of its own
    # Validates the args, that the model is there and has the descriptors `features` lists, before anything
    # starts: a running application is left as it is.
    app = build_app(app_args)
    note = collection_note(app_args)
    if note:
        log.warning("%s", note)
    connect()
    existed = _app_exists(name)
    if not existed:  # a running one is updated in place, with the CPUs it holds
        need = validate_as(ServeArgs, app_args).cpus()
        wait_for_resources({"CPU": need}, f"the service ({need:g} CPU for its replicas)")
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    serve.start(http_options={"host": host, "port": port})
    host, port = serve_address(host, port, args.host, args.port)
    # Until the service answers (and is recorded), a Ctrl-C or a failure deletes an application this command
    # created: it would keep its CPUs, unlisted by `deepindex status` (found on review).  One it updated
    # in place is left as it is.
    try:
        try:
            serve.run(app, name=name, route_prefix="/")
        except RuntimeError as e:  # Serve's "Deploying application ... failed", which does not say why
            print(f"deepindex serve: error: {why_not_running(name) or e}", file=sys.stderr)
            if not existed:
                serve.delete(name)
            return 1
        # 0.0.0.0 listens everywhere; this machine reaches it on loopback.
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        if not _answers(url):
            raise RuntimeError(f"serve: the application is deployed but {url}/healthz does not answer")
        on_platform = _record_on_platform(url, name)
    except BaseException:
        if not existed:
            with contextlib.suppress(Exception):
                serve.delete(name)
        raise
    event("service ready: %s/ (API docs %s/docs)%s", url, url,
          "; `deepindex status` lists it" if on_platform else "")
    if app_args.get("api_token_file"):
        event("writes (POST/DELETE /v1/items) need: Authorization: Bearer $(cat %s)", app_args["api_token_file"])
    elif app_args.get("api_token_sha256"):
        event("writes (POST/DELETE /v1/items) need: Authorization: Bearer $DEEPINDEX_API_TOKEN")
    if args.detach:
        return 0
    event("serving until Ctrl-C")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(name)
        if on_platform:
            from deepindex.localplatform import forget_serve

            forget_serve()
        event("service stopped: application %s deleted", name)
    return 0


def serve_address(host: str, port: int, asked_host: str | None, asked_port: int | None) -> tuple[str, int]:
    """Where Serve listens on the connected cluster: ``serve.start`` keeps a running Serve's address and
    only logs that new ``http_options`` do not apply, so ``--port 8001`` deployed on 8000 and then waited a
    minute for 8001 (found on review).  An address asked for on the command line that Serve cannot take
    is refused in one line; one from the config file gives way to the running one."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:  # serve.start just ran: never
        return host, port
    cfg = client.http_config
    running = (str(cfg.host), int(cfg.port))
    if running == (host, port):
        return running
    clash = [f"--{k} {v}" for k, v, now in (("host", asked_host, running[0]), ("port", asked_port, running[1]))
             if v is not None and v != now]
    if clash:
        raise ValueError(f"{clash[0].split()[0]}: Serve runs on this cluster already, at {running[0]}:{running[1]}, "
                         f"and keeps its address: leave {' and '.join(clash)} out to serve there, or shut Serve down "
                         f"first (`serve shutdown`)")
    log.info("Serve runs on this cluster already, at %s:%d (not %s:%d): serving there", *running, host, port)
    return running


def _app_exists(name: str) -> bool:
    """Whether Serve runs an application ``name`` on the connected cluster (without starting Serve)."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return name in serve.status().applications


def collection_note(app_args: dict[str, Any]) -> str | None:
    """What to say when the collection to serve does not exist yet: the service creates it empty
    (serving what is added over HTTP), which a mistyped name would also do, silently."""
    from deepindex.collection import list_collections
    from serving.schemas import ServeArgs

    name = app_args.get("collection") or ServeArgs.model_fields["collection"].default
    known = [c["name"] for c in list_collections(app_args.get("catalogue_url"))]
    if name in known:
        return None
    return (f"collection {name} does not exist yet: the service creates it empty and serves what is added over "
            f"HTTP (collections: {', '.join(known) or 'none yet'}; import images with: deepindex collection "
            f"import {name} ...)")


def why_not_running(name: str) -> str:
    """Why the application's deployments did not start, one clause each: the last line of what
    Serve recorded (a replica's exception), or "" if Serve recorded nothing."""
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return ""
    why = []
    for deployment, st in app.deployments.items():
        lines = [ln.strip() for ln in (st.message or "").splitlines() if ln.strip()]
        if st.status != "HEALTHY" and lines:
            why.append(f"{deployment}: {lines[-1]}")
    return f"{name} did not start; {'; '.join(why)}" if why else ""


def _answers(url: str, timeout: float = 60.0) -> bool:
    """Serve reports the application RUNNING before the HTTP path in front of it (HAProxy) has it."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return True
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _record_on_platform(url: str, name: str) -> bool:
    """On the local platform's head, record the URL for `deepindex status` and `deepindex env`."""
    import os

    from deepindex.localplatform import record_serve, running_service

    head = running_service("ray")
    if head is None or os.environ.get("RAY_ADDRESS", head.address) != head.address:
        return False
    record_serve(url, name)
    return True
