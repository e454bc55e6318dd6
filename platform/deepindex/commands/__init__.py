"""CLI subcommands: one module per command, each with ``register(subparsers)``."""

import argparse


def whole_number(text: str) -> int:
    """An argparse type: an integer, else argparse's one-line error naming the option (exit 2)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (a seed)."""
    n = whole_number(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {n}")
    return n


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    n = whole_number(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {n}")
    return n


def run_name(text: str) -> str:
    """An argparse type: the name of a training run, sweep or audit (one folder under the storage path,
    :func:`deepindex.restore.name_problem`), checked before anything is made or Ray starts."""
    from deepindex.restore import name_problem

    why = name_problem(text)
    if why:
        raise argparse.ArgumentTypeError(why)
    return text
