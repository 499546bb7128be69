"""``hesse analyze``: a curvature report for a model (work in progress)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "analyze", help="a curvature report for a model (report.json, plots, report.html)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print("hesse analyze: not available yet in this version.", file=sys.stderr)
    return 2
