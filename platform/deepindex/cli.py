"""``deepindex`` command line.  Subcommands live in :mod:`deepindex.commands`, one module each.

Every module there defines ``register(subparsers)`` that adds its subcommand and sets
``func``.  Errors a user can fix (bad config key, missing file, bad manifest line) end as
one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from deepindex.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    import deepindex.commands as commands

    parser = argparse.ArgumentParser(prog="deepindex",
                                     description="Train, tune, track, index and serve image concept detectors on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"deepindex.commands.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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


if __name__ == "__main__":
    sys.exit(main())
