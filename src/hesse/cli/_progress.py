"""Progress and timing of ``hesse analyze``'s steps, and the warnings they raise.

# NOTE [analyze progress]
On a terminal the job shows tqdm bars (one over the steps, one over the products
of each long computation). When stderr is not a terminal (a log file, a pipe, CI)
bars would be carriage returns and escape codes, so each finished step prints one
plain line instead. ``--no-progress`` prints nothing. Either way every step's
wall time goes into ``report.json``.

# NOTE [analyze warnings]
Warnings raised while the job runs are recorded, not printed as they come: one
torch warning raised inside a loop would otherwise appear once per product. Each
distinct message is kept once, with its count and the steps that raised it, in
``report.json``, the HTML page and the terminal. Deprecation warnings raised
inside torch itself (e.g. when it loads its forward-mode rules) say nothing about
the user's model and are left to Python's default filter, which hides them.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import torch

from hesse.operators import LinearOperator


@contextmanager
def recording() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised inside, except torch's own deprecations (NOTE [analyze warnings])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch(\.|$)")
        yield caught


def progress_mode(enabled: bool, stream: TextIO | None = None) -> str:
    """``"bars"`` on a terminal, ``"lines"`` elsewhere, ``"off"`` when disabled."""
    if not enabled:
        return "off"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bars" if callable(isatty) and isatty() else "lines"


class Steps:
    """The job's steps: progress (NOTE [analyze progress]), timings and warnings."""

    def __init__(self, mode: str, total: int, timings: dict[str, float]) -> None:
        self.mode, self.total, self.timings = mode, total, timings
        self.done = 0
        self.bar: Any = None
        self.wrappers: list[ProgressOperator] = []
        self.warnings: dict[tuple[str, str], dict[str, Any]] = {}
        if mode == "bars":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="hesse analyze", unit="step", file=sys.stderr)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as step ``name``; record the warnings it raises (NOTE [analyze warnings])."""
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        start = time.perf_counter()
        with recording() as caught:
            try:
                yield
            finally:
                self.timings[name] = round(time.perf_counter() - start, 4)
                for w in self.wrappers:
                    w.close()
                self.wrappers.clear()
                self._record(name, caught)
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.mode == "lines":
            print(
                f"hesse analyze: [{self.done}/{self.total}] {name} ({self.timings[name]:.2f} s)",
                file=sys.stderr,
                flush=True,
            )

    def _record(self, step: str, caught: list[warnings.WarningMessage]) -> None:
        for w in caught:
            message = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
            key = (w.category.__name__, message)
            entry = self.warnings.setdefault(
                key, {"category": key[0], "message": message, "count": 0, "steps": []}
            )
            entry["count"] += 1
            if step not in entry["steps"]:
                entry["steps"].append(step)

    def recorded_warnings(self) -> list[dict[str, Any]]:
        """Each distinct warning once: category, message, count, the steps that raised it."""
        return list(self.warnings.values())

    def counted(self, op: LinearOperator, total: int, desc: str) -> ProgressOperator:
        """``op`` with a progress bar over ``total`` products (bars mode only)."""
        wrapped = ProgressOperator(op, total=total, desc=desc, enabled=self.mode == "bars")
        self.wrappers.append(wrapped)
        return wrapped

    def close(self) -> None:
        for w in self.wrappers:
            w.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ProgressOperator(LinearOperator):
    """``op`` itself (same products, tags and layout) with a tqdm bar counting its products."""

    def __init__(self, op: LinearOperator, *, total: int, desc: str, enabled: bool) -> None:
        self.op = op
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.tags, self.layout, self.chunk_size = op.tags, op.layout, op.chunk_size
        self.total, self.desc, self.enabled = total, desc, enabled
        self.quiet = False
        self.bar: Any = None

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        out = self.op._matmat(X)
        if self.enabled and not self.quiet:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=self.total, desc=self.desc, unit="matvec", leave=False, file=sys.stderr
                )
            self.bar.update(X.shape[1])
        return out

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.op._rmatmat(X)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
