"""The ``hesse analyze`` run shared by the command's tests (one per test process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

#: the seed of the shared run.
SEED = 3


def hesse_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``hesse ARGS`` in a subprocess (stdout and stderr are pipes, not a terminal)."""
    code = "import sys; from hesse.cli import main; raise SystemExit(main(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # bitwise-equal float sums
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


@pytest.fixture(scope="session")
def default_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess, Path]:
    """``hesse analyze --quick --seed 3`` on the built-in model: (process, output folder)."""
    out = tmp_path_factory.mktemp("default") / "report"
    proc = hesse_command(
        "analyze", "--quick", "--seed", str(SEED), "--out", str(out), cwd=out.parent
    )
    return proc, out
