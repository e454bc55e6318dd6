"""``deepindex`` command line.  Subcommands live in :mod:`deepindex.commands`, one module each.

Every module there defines ``register(subparsers)`` that adds its subcommand and sets
``func``.  Errors a user can fix (bad config key, missing file, bad manifest line) end as
one line on stderr and exit status 2, never a traceback.  The commands that run Ray work print
one line per event and keep the rest in a log file (:mod:`deepindex.console`; ``-v`` prints it all);
any other failure of theirs (a Train worker's error) is one line naming the log file, exit status 1; the
other commands keep no log file, and their other failures are one line too (``-v`` raises the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import re
import sys

from deepindex.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    import deepindex.commands as commands

    parser = argparse.ArgumentParser(prog="deepindex",
                                     description="Train, tune, track, index and serve image concept detectors on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print everything (Ray's, Tune's and MLflow's output, debug logs), not only events")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"deepindex.commands.{mod.name}").register(sub)
    return parser


# Commands whose console is quiet (deepindex.console): one line per event, the rest in a log file.
QUIET = ("train", "tune", "promote", "index", "serve", "up", "data")


# A ``key=value`` override: a dotted key, never an option.
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\-]*=")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, and ``key=value`` overrides may stand between options
    (``train a=1 --name N b=2``): argparse stops a ``nargs="*"`` positional at the first option and
    calls what follows unrecognized; those overrides join the command's own, in order.  Any other
    leftover is argparse's usual error."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = getattr(args, "overrides", None)
        if not isinstance(overrides, list) or not all(_OVERRIDE.match(a) for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        overrides.extend(extra)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    from deepindex import console

    undo = None
    if args.command in QUIET:
        action = next((v for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str)), None)
        console.setup("-".join(filter(None, [args.command, action])), args.verbose)
    else:
        undo = console.plain(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if args.verbose:
            raise
        print(f"deepindex {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepindex {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # any other failure: one line on the console, the traceback in the log file (or -v)
        if args.verbose:
            raise
        path = console.log_path()
        if path is None:  # a short command keeps no log file: -v prints the traceback
            print(f"deepindex {args.command}: failed: {console.failure_line(e)} (deepindex -v {args.command} ... "
                  "prints the traceback)", file=sys.stderr)
            return 1
        logging.getLogger(__name__).info("deepindex %s failed", args.command, exc_info=True)  # the log file only
        print(f"deepindex {args.command}: failed: {console.failure_line(e)} (the traceback is in {path})",
              file=sys.stderr)
        return 1
    finally:
        if undo is not None:
            undo()


if __name__ == "__main__":
    sys.exit(main())
