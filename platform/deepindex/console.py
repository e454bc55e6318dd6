"""The console: one line per event on the terminal, everything else in a log file.

``deepindex train | tune | index build | serve | up`` (and ``make demo``) call :func:`setup` first.
From then on:

- **events** — platform up, a trial ended, the sweep's summary, a promotion decision, the service
  ready — are INFO records of the ``deepindex.events`` logger (:func:`event`): they reach the
  console as plain lines, and the log file;
- warnings and errors of deepindex, and errors of any library, reach the console too;
- everything else — deepindex's own INFO logs, Ray's, Ray Tune's, Ray Train's, Ray Data's and
  MLflow's loggers (whose own console handlers are removed so their records reach ours), and the
  output of Ray's workers that Ray forwards to this driver (:func:`route_worker_output`) — goes to
  ``<state>/logs/<command>-<time>.log`` only.

``-v`` prints all of it on the console as well (Ray's own printing of its workers' output, Tune's
status tables, Ray Data's progress bars).  A command running as a Ray job (``ray job submit``,
``deepindex submit``) is always verbose: there the job's log is the place for everything.

A Ray worker (a Train controller, a trial) announces an event by printing a line that starts with
:data:`MARK`; the driver turns it into an event when Ray forwards it.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVENTS = "deepindex.events"
MARK = "[deepindex] "  # a forwarded worker line starting with this is an event
# Loggers that bring their own console handler (or none and stop propagating): their records are
# sent up to the root logger instead, where the handlers below decide.
_LIBRARY_LOGGERS = ("ray", "ray.data", "ray.serve", "ray.tune", "ray.train", "mlflow", "optuna")
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Ray Data configures its logger from this file instead of its default (a console handler, no propagation).
_RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")

log = logging.getLogger(__name__)


@dataclass
class _Active:
    command: str
    verbose: bool
    path: Path
    state: Path
    handlers: list[logging.Handler]
    env: dict[str, str | None]  # the variables setup() set, with their values before (teardown restores them)


_active: _Active | None = None
_plain_console = False  # plain() is on: a short command's console, no log file


Progress = Callable[[int, int], None]  # (items done so far, items in all); (0, n) first: a ProgressLine, say


class ProgressLine:
    """Progress of ``what`` over a known number of items, on stderr: one line per 10 % (a live line on a
    terminal) with the rate.  Called as ``(done, total)``; ``(0, total)`` first says the total."""

    def __init__(self, what: str, starting: str | None = None) -> None:
        self.what, self.starting = what, starting
        self.start = time.monotonic()
        self.shown = -1
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if done == 0:
            print(f"{self.what}: {total} items" + (f"; {self.starting}" if self.starting else ""),
                  file=sys.stderr, flush=True)
            return
        pct = int(100 * done / max(total, 1))
        if pct // 10 == self.shown // 10 and done < total:
            return
        self.shown = pct
        rate = done / max(time.monotonic() - self.start, 1e-6)
        line = f"{self.what}: {done}/{total} items ({pct}%), {rate:.0f} items/s"
        print(("\r" + line) if self.tty else line, end="" if self.tty and done < total else "\n",
              file=sys.stderr, flush=True)


def event(msg: str, *args: Any) -> None:
    """One line on the console (and in the log file): something the user waits for happened."""
    logging.getLogger(EVENTS).info(msg, *args)


def announce(in_trials_too: bool, msg: str, *args: Any) -> None:
    """A console event on a driver.  In a Ray actor (a sweep's trial) only ``in_trials_too`` lines are
    (printed with the console's mark, the sweep's driver shows them); the others go to the log."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        if in_trials_too:
            print(MARK + msg % args, flush=True)
        else:
            logging.getLogger(__name__).info(msg, *args)
        return
    event(msg, *args)


def report(result: Any, out: str | None = None) -> None:
    """A job's result as JSON on stdout (what a benchmark or a Ray job leaves), and in ``out`` if given."""
    import json

    text = json.dumps(result, indent=2, default=str)
    print(text, flush=True)
    if out:
        Path(out).write_text(text + "\n")


def verbose() -> bool:
    return _active is not None and _active.verbose


def log_path() -> Path | None:
    return _active.path if _active is not None else None


def in_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_SUBMISSION_ID"))


class _ConsoleHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture, a redirected stream)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


# Library errors that a line of ours reports already (a sweep's trial, an audit's fold: which one, and
# its error's last line): their tracebacks go to the log file only.
_REPORTED_ERRORS = (("ray.tune.execution.tune_controller", "Trial task failed"),
                    ("ray.tune.tune", "Trials did not complete"))


class _QuietFilter(logging.Filter):
    """The quiet console: events, deepindex's warnings and errors, and anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == EVENTS or record.name.startswith(EVENTS + "."):
            return True
        if record.levelno >= logging.ERROR:
            return not any(record.name == name and str(record.msg).startswith(text)
                           for name, text in _REPORTED_ERRORS)
        ours = record.name == "deepindex" or record.name.startswith("deepindex.")
        return ours and record.levelno >= logging.WARNING


class _ConsoleFormatter(logging.Formatter):
    """The records ``plain`` picks (events, by default) as plain lines; anything else with its level and origin."""

    def __init__(self, plain: Callable[[logging.LogRecord], bool] = lambda r: r.name == EVENTS) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.plain = plain

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if self.plain(record) else super().format(record)


class _PlainFilter(logging.Filter):
    """The short commands' console: deepindex's own lines, and anyone's warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == "deepindex" or record.name.startswith("deepindex.")


def plain(verbose: bool = False) -> Callable[[], None]:
    """The console of the short commands (``collection``, ``example``, ``tracking``, ``submit``, ...),
    which keep no log file: deepindex's own lines as they are, warnings and errors with their level
    and origin, the libraries' INFO chatter left out; ``verbose``: everything, with times.  Returns
    what removes it again (the CLI does when the command ends: tests run commands in one process)."""
    global _plain_console
    handler = _ConsoleHandler()
    if verbose:
        handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    else:
        handler.setFormatter(_ConsoleFormatter(plain=lambda r: r.levelno == logging.INFO))
        handler.addFilter(_PlainFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    _plain_console = True

    def undo() -> None:
        global _plain_console
        root.removeHandler(handler)
        root.setLevel(level)
        _plain_console = False

    return undo


def setup(command: str, verbose: bool = False) -> Path:
    """Send this process's logging to the console and ``<state>/logs/<command>-<time>.log``.

    Idempotent within a process: a nested call (``make demo`` runs ``up``, ``index build`` and
    ``serve`` in its own process) keeps the first call's log file and verbosity.
    """
    global _active
    from deepindex.paths import state_dir

    state = state_dir()
    if _active is not None and _active.state == state:
        return _active.path
    teardown()
    verbose = verbose or in_ray_job()
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{command.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}.log"

    env = _quiet_libraries(verbose)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    console = _ConsoleHandler()
    if verbose:
        console.setFormatter(logging.Formatter(_FILE_FORMAT))
    else:
        console.setFormatter(_ConsoleFormatter())
        console.addFilter(_QuietFilter())
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in (file_handler, console):
        root.addHandler(h)
    logging.getLogger("deepindex").setLevel(logging.DEBUG if verbose else logging.INFO)
    _active = _Active(command, verbose, path, state, [file_handler, console], env)
    log.info("deepindex %s (pid %d): log file %s", command, os.getpid(), path)
    return path


def teardown() -> None:
    """Remove the handlers :func:`setup` installed (tests call commands in one process)."""
    global _active
    if _active is None:
        return
    root = logging.getLogger()
    for h in _active.handlers:
        root.removeHandler(h)
        h.close()
    if "ray" in sys.modules:
        _restore_ray_printing()
    for k, v in _active.env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _active = None


def _quiet_libraries(verbose: bool) -> dict[str, str | None]:
    """Library loggers to the root logger; their own console output off unless ``verbose``.

    Environment variables cover what is configured when a library is first imported or run
    (MLflow's and Ray Data's loggers, Ray Data's progress bars, Tune's output engine); loggers
    configured already are reset by :func:`adopt_library_loggers`.  A variable set already wins.
    Returns the variables set, with their previous values.
    """
    wanted = {"MLFLOW_CONFIGURE_LOGGING": "false", "RAY_DATA_LOGGING_CONFIG": str(_RAY_DATA_LOGGING)}
    if not verbose:
        # Tune's current output engine prints its experiment table at verbose=0 too; its
        # previous one, which Ray keeps behind this switch, prints nothing at verbose=0.
        wanted.update({"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_AIR_NEW_OUTPUT": "0"})
        context = sys.modules.get("ray.data.context")
        if context is not None:  # imported already: the variable was read before it was set
            context.DataContext.get_current().enable_progress_bars = False
    changed = {k: os.environ.get(k) for k in wanted if k not in os.environ}
    os.environ.update({k: wanted[k] for k in changed})
    import ray  # noqa: F401 - its import installs the "ray" logger's console handler, replaced below

    adopt_library_loggers()
    return changed


def adopt_library_loggers() -> None:
    """Send the records of Ray's and MLflow's loggers to the root logger's handlers (file, console
    filter) instead of their own console handlers.  Ray Serve installs its handler when
    ``ray.serve`` is first imported: ``deepindex serve`` calls this again after that."""
    for name in _LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            lib.removeHandler(h)
        lib.propagate = True
    logging.getLogger("ray").setLevel(logging.INFO)


def library_imported() -> None:
    """A library imported after :func:`setup` or :func:`plain` that installs a console handler of its
    own goes to that console's handlers too (optuna, when an optuna search starts: `[I ...] A new study
    created in memory`; Ray, when ``deepindex submit`` imports its Jobs client: `INFO dashboard_sdk.py:423
    -- Package ... already exists`).  Outside a command's console (the Python API) the libraries keep
    their own handlers."""
    if _active is not None or _plain_console:
        adopt_library_loggers()


def _text_lines(error: object) -> list[str]:
    return [ln.strip() for ln in str(error).splitlines() if ln.strip()]


def error_line(error: object) -> str:
    """The last line of an error's text: a Ray task's traceback ends with the exception and its message."""
    lines = _text_lines(error)
    return lines[-1] if lines else type(error).__name__


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps, outermost first: a Ray task's error's ``cause`` (the exception the task
    raised), else ``__cause__`` (``raise ... from``)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not e for e in chain):
        chain.append(current)
        current = getattr(current, "cause", None) or current.__cause__
    return chain


def _package(error: BaseException) -> str:
    return type(error).__module__.split(".")[0]


# The end of the first exception of a Ray task's traceback text: "module.Type: message" (or "module.Type").
_RAISED = re.compile(r"^([A-Za-z_][\w.]*)(?:: (.*))?$")
_DIRECT_CAUSE = "The above exception was the direct cause of the following exception:"


def _raised_in_task(error: BaseException) -> str | None:
    """"Type: message" of the exception that Ray's own wrapper (the last of a Ray task's traceback text, which
    Ray's error carries) was raised from, or None.  Ray Data wraps a map function's exception in a
    UserCodeException ("UDF failed to process a data block") whose cause does not cross to the driver: only
    the text names it (after what that exception was itself raised from: PIL's own errors)."""
    head = str(error).rsplit(_DIRECT_CAUSE, 1)
    if len(head) < 2:
        return None
    lines = _text_lines(head[0])
    m = _RAISED.match(lines[-1]) if lines else None
    if m is None:
        return None
    name = m.group(1).rsplit(".", 1)[-1]
    return f"{name}: {m.group(2)[:300]}" if m.group(2) else name


def failure_line(error: BaseException) -> str:
    """An unexpected failure in one line: a Ray Train run's first failed worker (its rank, its exception)
    or the controller's error, else the exception itself; its type and the first line of its message.

    The exception named is the first of the chain of wrapped ones (a Ray task's ``cause``, ``raise ... from``)
    that deepindex raises (each names what failed: the file, the line, the key), else the one a Ray task's
    error wraps, else, when that is Ray's own wrapper, what the task's traceback text says it raised first: a
    Ray Data task's failure was "UserCodeException: UDF failed to process a data block", naming no file
    (found on review)."""
    failures: dict[int, BaseException] | None = getattr(error, "worker_failures", None)
    where = ""
    if failures:
        rank = min(failures)
        where, error = f"training failed in worker rank {rank}: ", failures[rank]
    elif getattr(error, "controller_failure", None) is not None:
        where, error = "training failed in its controller: ", error.controller_failure  # type: ignore[attr-defined]
    chain = _causes(error)
    ours = next((e for e in chain if _package(e) == "deepindex"), None)
    if ours is not None:
        error = ours
    else:
        error = getattr(error, "cause", None) or error  # a Ray task's error wraps the exception it raised
        raised = next(filter(None, map(_raised_in_task, chain)), None) if _package(error) == "ray" else None
        if raised is not None:
            return f"{where}{raised}"
    lines = _text_lines(error)
    return f"{where}{type(error).__name__}" + (f": {lines[0][:300]}" if lines else "")


def trial_error(trial: Any) -> str:
    """What a failed Tune trial's error says, in one line (its traceback is in the trial's folder and the log
    file, where Tune's own record of it goes)."""
    try:  # Tune writes it to the trial's local staging folder first (get_error() reads the synced copy)
        return error_line(Path(trial.error_file).read_text()) if trial.error_file else "see the log file"
    except Exception:  # noqa: BLE001 - the line matters more than its detail
        return "see the log file"


def failure_lines(describe: Callable[[Any], str], logger: logging.Logger) -> type:
    """A Tune callback class (to subclass) that puts a failed trial on the console in one line:
    ``describe(trial)`` names it (``trial 1a2b failed after 0/4 epochs``), its error's last line follows;
    a failure Tune retries is a warning, the last one an error."""
    from ray import tune

    class FailureLines(tune.Callback):
        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            logger.error("%s: %s (the log file has its traceback)", describe(trial), trial_error(trial))

        def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            logger.warning("%s: %s; starting it again", describe(trial), trial_error(trial))

    return FailureLines


def tune_verbosity() -> int:
    """Ray Tune's ``RunConfig(verbose=...)``: its status tables only with ``-v``."""
    return 1 if verbose() or _active is None else 0


def route_worker_output() -> None:
    """Send the worker output Ray forwards to this driver (``log_to_driver``) to the log file.

    Ray prints each forwarded line itself (a handler of its stream dispatcher), and the raylet's
    notices to the driver ("N PYTHON worker processes have been started...") through the same
    printing function.  In a quiet console both go to :func:`_log_worker_lines` instead, which
    logs each line to ``ray.workers`` (the log file), except lines starting with :data:`MARK`,
    which become events.  With ``-v`` Ray keeps printing and the lines also reach the file.
    Ray 2.60 has no public hook for this: when its internals are not where this looks for them,
    Ray's own printing stays (a noisy console, nothing lost).
    """
    if _active is None:
        return
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        log.debug("Ray's worker output dispatcher not found: Ray prints its workers' output itself")
        return
    adopt_library_loggers()  # ray.init's logger set-up ran since setup()
    _restore_ray_printing()
    dispatcher.add_handler("deepindex", _log_worker_lines)
    if not _active.verbose:
        _ray_printing["handlers"] = [h for h in dispatcher.handlers if h[0] == "ray_print_logs"]
        dispatcher.remove_handler("ray_print_logs")
        if hasattr(ray_worker, "print_to_stdstream"):  # what the driver's error-message listener calls
            _ray_printing["print_to_stdstream"] = ray_worker.print_to_stdstream
            ray_worker.print_to_stdstream = _raylet_notices


# What route_worker_output changed in Ray, for teardown to put back.
_ray_printing: dict[str, Any] = {}


def _restore_ray_printing() -> None:
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    dispatcher.remove_handler("deepindex")
    for name, handler in _ray_printing.pop("handlers", []):
        dispatcher.add_handler(name, handler)
    if "print_to_stdstream" in _ray_printing:
        ray_worker.print_to_stdstream = _ray_printing.pop("print_to_stdstream")


def _raylet_notices(data: dict[str, Any], ignore_prefix: bool = False) -> None:
    _log_worker_lines(data)


_workers = logging.getLogger("ray.workers")


def _log_worker_lines(data: dict[str, Any]) -> None:
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}) "
    level = logging.WARNING if data.get("is_err") else logging.INFO
    printed_by_ray = verbose()  # then an event line is on the console already, as Ray prints it
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its whole status every few seconds: keep its events, as Ray does
        events = getattr(sys.modules.get("ray._private.worker"), "filter_autoscaler_events", None)
        lines = list(events(lines)) if events is not None else []
    for line in lines:
        if line.startswith(MARK) and not printed_by_ray:
            event("%s", line[len(MARK):])
        elif "__ray_tqdm_magic_token__" not in line:  # Ray's distributed progress bars: not for a file
            _workers.log(level, "%s%s", prefix, line)
