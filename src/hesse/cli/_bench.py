"""``hesse bench``: the benchmark runner of the source checkout (``benchmarks/run.py``).

The benchmarks sit outside the package (they import peers that are not
dependencies), so the command looks for them next to the package's source tree,
i.e. in an editable install or a checkout on the path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def find_benchmarks() -> Path | None:
    """The ``benchmarks`` folder of the checkout this package was installed from, if any."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "benchmarks" / "run.py"
        if candidate.is_file() and (parent / "pyproject.toml").is_file():
            return candidate.parent
    return None


def _runner() -> Any:
    """The ``benchmarks.run`` module of the checkout, or ``None``."""
    folder = find_benchmarks()
    if folder is None:
        return None
    root = str(folder.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import run as runner

    return runner


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmark hesse against the usual PyTorch ways (prints a table)",
        description="Benchmark hesse against the usual ways of computing second derivatives "
        "in PyTorch; prints one table (time, ratio to hesse in the same run, peak memory).",
    )
    runner = _runner()
    if runner is not None:
        runner.add_arguments(parser)  # the runner owns its options
    else:  # any options are accepted, then run() explains what is missing
        parser.set_defaults(accepts_unknown=True)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    runner = _runner()
    if runner is None:
        print(
            "hesse bench: the benchmarks/ folder was not found next to the installed package. "
            "It ships with the source checkout: clone the repository, run "
            "pip install -e . in it, and run hesse bench there.",
            file=sys.stderr,
        )
        return 2
    return runner.execute(args)
