"""The ``hesse`` command: ``hesse analyze`` (a curvature report) and ``hesse bench``.

Each subcommand lives in its own module and is imported only when it runs, so
``hesse --help`` stays fast and ``hesse bench`` does not need matplotlib.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hesse`` command (both subcommands)."""
    from hesse import __version__
    from hesse.cli import _analyze, _bench

    parser = argparse.ArgumentParser(
        prog="hesse",
        description="Second derivatives for PyTorch: curvature reports and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"hesse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{analyze,bench}")
    _analyze.add_parser(sub)
    _bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hesse`` console script; returns the exit code.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, non-zero on bad input or failure (the message is on stderr).

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    args.command_line = shlex.join(["hesse", *argv])  # recorded in the report's provenance
    return int(args.run(args) or 0)


if __name__ == "__main__":  # python -m hesse.cli
    raise SystemExit(main())
