"""Submitting the deepindex jobs to a running Ray cluster through the Jobs API.

``deepindex submit train data.dataset=digits`` is ``ray job submit -- python jobs/train.py
data.dataset=digits`` with the runtime environment this project needs: the working tree as
``working_dir`` (the job's entrypoint and configs), ``platform/deepindex`` as a ``py_module`` (so
the cluster need not have the library installed), excludes for local state and caches, and the
MLflow tracking URI.  Outside a project checkout (a folder of one's own with a recipe and images,
deepindex installed), the folder is the ``working_dir``, the installed library the ``py_module``,
and the entrypoint the CLI itself (``python -m deepindex.cli train ...``).  Ray's token
authentication is honoured the way Ray's own clients find the token: ``RAY_AUTH_TOKEN``, else the
file at ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``; the local platform's token file (which
``deepindex env`` exports) goes to the local platform alone.  ``--address`` wins over
``RAY_API_SERVER_ADDRESS`` and ``RAY_ADDRESS``, which Ray's own client would take instead.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    script: str  # its entrypoint in a project checkout, relative to the root
    command: tuple[str, ...]  # the same job in the CLI's words: python -m deepindex.cli COMMAND ...


# The job name on the command line -> how it runs.
JOBS: dict[str, Job] = {
    "train": Job("jobs/train.py", ("train",)),
    "tune": Job("jobs/tune.py", ("tune",)),
    "index": Job("jobs/build_index.py", ("index", "build")),
    "promote": Job("jobs/promote.py", ("promote",)),
    "audit": Job("jobs/audit.py", ("data", "audit")),
}

# Never uploaded: local state, caches and weights (jobs read data and write results on shared
# storage), and what only a developer's machine needs.  Gitignore-style patterns; Ray applies them
# to working_dir *and* to each py_module with that one as the base, so a pattern that could match
# inside platform/deepindex (e.g. "data", the package's data module) must never appear here.
# Ray also honours the root .gitignore (which already ignores /data and local state).
STATE_EXCLUDES: list[str] = [
    ".git", ".venv", "venv", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".hypothesis",
    ".deepindex", "mlruns", "mlartifacts", "ray_results", "*.pt", "*.pth", "*.ckpt", "*.faiss", "*.db",
]
# ... and in a project checkout, what only its developers need (a folder of one's own keeps its tests/).
EXCLUDES: list[str] = [
    *STATE_EXCLUDES, "/tests", "/k8s", "/build", "/dist", "/.whl", "/.gl", "/Dockerfile", "/.dockerignore",
]

# Environment variables passed through to the job when set here (--tracking-uri and --env win).
# Not DEEPINDEX_HOME: a local state folder means nothing on the cluster's nodes.
PASSTHROUGH_ENV: tuple[str, ...] = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")

# A head that has just started may not have registered its job agent yet (HTTP 500 with this text).
_AGENT_NOT_READY = "No available agent"


@dataclass(frozen=True)
class Submission:
    """What is sent to the Jobs API: enough to print, test or replay a submission."""

    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str | None = None


def is_project(d: Path) -> bool:
    """A deepindex checkout: its job entrypoints and the library's source."""
    return (d / "jobs").is_dir() and (d / "platform" / "deepindex").is_dir()


def find_project_root(start: str | Path | None = None) -> Path | None:
    """The nearest directory at or above ``start`` that holds ``jobs/`` and ``platform/deepindex``."""
    here = Path(start or Path.cwd()).resolve()
    return next((d for d in (here, *here.parents) if is_project(d)), None)


def folder_to_ship(project_dir: str | None = None) -> Path:
    """What a submission uploads as its working dir: ``--project-dir`` (which must be a checkout), else
    the checkout the working directory lies in, else the working directory itself (a folder of one's own)."""
    if project_dir is None:
        return find_project_root() or Path.cwd().resolve()
    root = find_project_root(project_dir)
    if root is None:
        raise ValueError(f"project-dir: no deepindex project (jobs/ and platform/deepindex/) at or above "
                         f"{Path(project_dir).resolve()}")
    return root


def library_dir() -> Path:
    """The deepindex package this client runs: the ``py_module`` shipped from a folder of one's own."""
    import deepindex

    return Path(deepindex.__file__).resolve().parent


def parse_env(items: list[str] | None) -> dict[str, str]:
    """``["KEY=value", ...]`` -> dict; a malformed item is a one-line error naming it."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ValueError(f"env: {item!r} must look like KEY=value")
        out[key] = value
    return out


def build_runtime_env(root: Path, *, tracking_uri: str | None = None,
                      env: dict[str, str] | None = None, ship_code: bool = True) -> dict[str, Any]:
    """The runtime environment of every deepindex job.

    ``root`` is a project checkout (its tree and ``platform/deepindex`` travel) or a folder of one's
    own (it travels with the installed library).  ``ship_code=False`` is for clusters whose image has
    the project installed (``k8s/``): then only the environment variables travel.
    """
    env_vars = {k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)}
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    env_vars.update(env or {})
    uri = env_vars.get("MLFLOW_TRACKING_URI", "")
    if (uri and "://" not in uri) or uri.startswith(("file:", "sqlite:")):
        # A path on this machine means nothing on the cluster's nodes unless it is shared storage.
        log.warning("MLFLOW_TRACKING_URI=%s is a local store; the job's runs land on the cluster's disk", uri)
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if ship_code:
        project = is_project(root)
        runtime_env.update(working_dir=str(root),
                           py_modules=[str(root / "platform" / "deepindex" if project else library_dir())],
                           excludes=list(EXCLUDES if project else STATE_EXCLUDES))
    return runtime_env


def build_submission(job: str, args: list[str], root: Path, *, tracking_uri: str | None = None,
                     env: dict[str, str] | None = None, ship_code: bool = True,
                     submission_id: str | None = None) -> Submission:
    """The entrypoint and runtime environment for ``job`` with its command-line ``args``: the job's script
    in a project checkout (and in the cluster's image, ``ship_code=False``), else the CLI."""
    if job not in JOBS:
        raise ValueError(f"job: unknown job {job!r}; one of {', '.join(JOBS)}")
    spec = JOBS[job]
    if not ship_code or is_project(root):
        if ship_code and not (root / spec.script).is_file():
            raise ValueError(f"job: {spec.script} does not exist under {root}")
        entrypoint = shlex.join(["python", spec.script, *args])
    else:
        entrypoint = shlex.join(["python", "-m", "deepindex.cli", *spec.command, *args])
    return Submission(entrypoint, build_runtime_env(root, tracking_uri=tracking_uri, env=env, ship_code=ship_code),
                      submission_id)


def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS`` (as ``ray job`` does), else the
    local platform's Jobs API when ``deepindex up`` runs one (its token is used too)."""
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not addr:
        from deepindex.localplatform import client_env, use_local_head_auth

        local = client_env()
        if "RAY_API_SERVER_ADDRESS" in local:
            use_local_head_auth()  # its token, not one the shell holds for another cluster
            return local["RAY_API_SERVER_ADDRESS"]
    if not addr or addr in ("auto", "local"):
        raise ValueError("address: no Ray cluster; pass --address http://HEAD:8265, set RAY_API_SERVER_ADDRESS "
                         "or start the local platform (deepindex up)")
    return addr


def read_auth_token() -> str | None:
    """The cluster token, looked up in Ray's order; ``None`` when there is none or auth is disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    p = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
    if path and not p.is_file():
        raise ValueError(f"RAY_AUTH_TOKEN_PATH: no such file {p}")
    return (p.read_text().strip() or None) if p.is_file() else None


def auth_headers() -> dict[str, str]:
    # Sent explicitly, so a client works without RAY_AUTH_MODE=token in its own environment.
    token = read_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


# Ray's JobSubmissionClient takes these, in this order, over the address it is given
# (ray.dashboard.utils.get_address_for_submission_client): `--address` was ignored in a shell that had
# run `eval $(deepindex env)`, and a job meant for another cluster went to the local platform.
ADDRESS_ENV: tuple[str, ...] = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


@contextlib.contextmanager
def _environ(changes: dict[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``changes`` (None: unset) for the block only; as it was afterwards."""
    saved = {k: os.environ.get(k) for k in changes}
    try:
        _set_environ(changes)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _same_address(a: str, b: str | None) -> bool:
    return b is not None and a.rstrip("/") == b.rstrip("/")


def client_environ(addr: str, given: bool) -> dict[str, str | None]:
    """The environment a client of ``addr`` is built in (None: unset): never Ray's address variables, so the
    address is the one used.  The token of an address given with ``--address`` is the shell's
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), except that the local platform's
    token file (``deepindex env`` exports it) goes to the local platform's Jobs API alone; there, it is the one."""
    changes: dict[str, str | None] = dict.fromkeys(ADDRESS_ENV)
    if not given:  # the address came from this environment (or is the local platform's): so does its token
        return changes
    from deepindex.localplatform import client_env, ray_client_env, token_path

    if _same_address(addr, client_env().get("RAY_API_SERVER_ADDRESS")):
        changes.update({"RAY_AUTH_TOKEN": None, **ray_client_env()})
        return changes
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and Path(path).expanduser().resolve() == token_path().resolve():
        changes["RAY_AUTH_TOKEN_PATH"] = None  # the local head's token is not sent to another cluster
    return changes


def connect(address: str | None = None) -> JobSubmissionClient:
    """A ``JobSubmissionClient`` for the cluster; connection and auth failures are one-line errors.
    ``address`` (``--address``) wins over ``RAY_API_SERVER_ADDRESS`` and ``RAY_ADDRESS``, which are
    left as they were for the rest of the command."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from deepindex.console import library_imported

    library_imported()  # Ray's loggers: our console's filter, not their own handler
    addr = resolve_address(address)
    where = f"{addr} (--address)" if address else addr
    with _environ(client_environ(addr, given=bool(address))):
        headers = auth_headers()
        try:
            return JobSubmissionClient(addr, headers=headers)
        except (ConnectionError, RuntimeError, AuthenticationError) as e:
            raise ValueError(f"address: cannot reach the Ray Jobs API at {where}: {server_message(e)}") from None
        except ValueError as e:  # not an address Ray can parse ("Invalid address format: x")
            raise ValueError(f"address: cannot reach the Ray Jobs API at {where}: {server_message(e)} (an address "
                             "looks like http://HEAD:8265)") from None


def submit(client: JobSubmissionClient, sub: Submission, *, metadata: dict[str, str] | None = None,
           retry_s: float = 60.0) -> str:
    """Submit and return the job id; retries while a new head's job agent is not yet up."""
    from ray.exceptions import AuthenticationError

    deadline = time.monotonic() + retry_s
    while True:
        try:
            return client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                                     submission_id=sub.submission_id, metadata=metadata or {})
        except (RuntimeError, AuthenticationError) as e:
            if _AGENT_NOT_READY in str(e) and time.monotonic() < deadline:
                log.info("the cluster's job agent is not ready yet; retrying")
                time.sleep(2)
                continue
            why = server_message(e)
            if sub.submission_id and "already exists" in why:
                raise ValueError(f"--submission-id: a job {sub.submission_id} already exists on the cluster: give "
                                 f"another id, or leave it out for a new one ({why})") from None
            raise ValueError(f"submit: {why}") from None


# What Ray's job manager writes into a job's log itself (`2026-12-06 09:47:28,996 INFO
# job_manager.py:581 -- Runtime env is setting up.`): Ray's internals, shown with -v only.
_RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(?:DEBUG|INFO)\s+\S+\.py:\d+ -- ")


class JobLogLines:
    """A job's log, chunk by chunk, as the console shows it: whole lines, without Ray's own INFO
    lines (in the debug log) unless ``keep_ray`` (``-v``)."""

    def __init__(self, keep_ray: bool = False) -> None:
        self.keep_ray = keep_ray
        self._part = ""

    def feed(self, chunk: str) -> str:
        lines = (self._part + chunk).split("\n")
        self._part = lines.pop()  # a line the chunk cut short waits for its end
        return "".join(self._line(line + "\n") for line in lines)

    def end(self) -> str:
        rest, self._part = self._part, ""
        return self._line(rest) if rest else ""

    def _line(self, line: str) -> str:
        if not self.keep_ray and _RAY_LOG_LINE.match(line):
            log.debug("job log: %s", line.rstrip())
            return ""
        return line


def follow(client: JobSubmissionClient, job_id: str, out: TextIO = sys.stdout) -> None:
    """Stream the job's logs to ``out`` until it ends (Ray's own lines only with ``-v``)."""
    from deepindex.console import verbose

    lines = JobLogLines(keep_ray=verbose())

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(lines.feed(chunk))
            out.flush()
        out.write(lines.end())
        out.flush()

    asyncio.run(tail())


def wait(client: JobSubmissionClient, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None
         ) -> JobDetails:
    """Poll until the job reaches a terminal status; returns its ``JobDetails``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {info.status} after {timeout_s}s")
        time.sleep(poll_s)


def exit_status(info: JobDetails) -> int:
    """0 for a job that succeeded; else the driver's exit code when known, else 1."""
    from ray.job_submission import JobStatus

    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


_TRACEBACK = "Traceback (most recent call last):"


def server_message(e: BaseException) -> str:
    """An error in one line.  The Jobs API answers a failed request with the server's traceback
    (``Request failed with status code 500: Traceback (most recent call last): ... ValueError: Job with
    submission_id x already exists...``, and a last line ``.``): its reason is the traceback's last line,
    after the status its first line gives."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().strip(".")]
    if not lines:
        return e.__class__.__name__
    first = lines[0]
    if _TRACEBACK in text and len(lines) > 1:
        status = first.split(_TRACEBACK, 1)[0].strip().rstrip(":")
        return f"{status}: {lines[-1]}" if status else lines[-1]
    return first
