"""Evaluating a recovery plan: the compressed HVPs and the gather, eager or compiled.

# NOTE [prepared reuse]
``sparse_hessian(f, pattern=P)`` is a prepared evaluator. Its first call for a size
``n`` colours ``P``, builds the recovery plan (seed matrix, gather indices, the
substitution order and the CSR index arrays, all tensors kept in the plan), checks the
pattern with one extra HVP (NOTE [pattern check]) and races the HVP strategies on the
plan's seeds (NOTE [prepared strategy]). Every later call is the ``K`` batched HVPs of
the chosen strategy and one recovery (a gather, plus one cumulative sum for
substitution, NOTE [substitution]); no colouring, no checks, no memory probing.

# NOTE [prepared strategy]
Which way of batching ``K`` HVPs is fastest depends on ``f`` and ``K``: a ``vmap`` of
the double backward, ``K`` plain double backward passes through one gradient graph (no
batching machinery: for small ``K`` on large elementwise graphs, measured 1.3-2x
faster than the ``vmap`` at n=1e5 on Rosenbrock, the 5-point stencil and the
Brusselator, one thread of a loaded 2-core machine), or forward-over-reverse (``vmap`` of ``jvp`` of ``grad``). A prepared
evaluator runs each of :data:`STRATEGIES` twice on its first call (wall time, the
faster of two) and keeps the fastest for every later call; a strategy that fails
is skipped. Products under :data:`RACE_MIN_SECONDS` are not raced (the choice cannot
matter). A caller's ``chunk_size`` is kept in every strategy.

# NOTE [compiled reuse]
``compile=True`` compiles the whole repeated call, forward-over-reverse HVPs and
recovery, with ``torch.compile`` (Inductor: fused loops, no per-operator dispatch),
which removes most of the eager cost of the small elementwise operations sparse
problems are made of (a quiet 16-core x86 CPU, torch 2.11, in one process: Rosenbrock
n=1e5 1.5 ms compiled, 8.1 ms eager, 1.3 ms for asdex's jitted path; n=1e6 7.4, 79 and
10.8 ms; the 2-D Brusselator n=1e5 5.9, 79 and 38 ms). The
first compiled call is compared with the eager entries (within ``sqrt(eps)`` of their
scale); if compilation fails, or the values differ, a :class:`CompileFallbackWarning`
says why and the eager path serves every call. Compilation costs seconds to a minute
once per process (more on a loaded machine); new shapes or argument values that
``torch.compile`` specialises on recompile.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, jvp, vmap

from hesse._flat import FlatArgs
from hesse._hvp import FlatHVP, basis_rows, tensor_rows
from hesse.sparsity._recovery import Plan

#: ``(mode, chunk)`` raced by a prepared evaluator (NOTE [prepared strategy]); chunk
#: ``None``: all ``K`` products in one batched pass, ``1``: one plain pass each.
STRATEGIES: tuple[tuple[str, int | None], ...] = (
    ("reverse-over-reverse", None),
    ("reverse-over-reverse", 1),
    ("forward-over-reverse", None),
)

#: products faster than this are not raced (NOTE [prepared strategy]).
RACE_MIN_SECONDS = 2e-3


class CompileFallbackWarning(UserWarning):
    """``compile=True`` could not be honoured; the eager path runs (NOTE [compiled reuse])."""


def products(engine: FlatHVP, plan: Plan, chunk_size: int | None) -> torch.Tensor:
    """``B = H S``: the ``(K, n)`` products with the plan's seeds (basis rows for a dense
    plan, never materialised at once)."""
    k, x = plan.coloring.num_colors, engine.x
    if plan.coloring.kind == "dense":
        rows = basis_rows(engine.n, x, capacity=min(k, chunk_size or k))
    else:
        rows = tensor_rows(plan.seeds(x))
    return engine.apply(k, rows, chunk_size=chunk_size)


def entries(
    engine: FlatHVP, plan: Plan, chunk_size: int | None, estimate: bool = False
) -> tuple[torch.Tensor, float]:
    """The pattern's entries (CSR order) and substitution's error estimate (``0.0``
    without ``estimate``), NOTE [substitution]."""
    if plan.coloring.num_colors == 0 or len(plan.rows) == 0:
        return engine.x.new_zeros(len(plan.rows)), 0.0
    return plan.recover(products(engine, plan, chunk_size), estimate=estimate)


def clock(x: torch.Tensor) -> Callable[[], float]:
    """Wall time, after the device's queued work (NOTE [prepared strategy]): the user
    waits for wall time, and CPU time would count every thread of a parallel operator."""
    if x.device.type == "cpu":
        return time.perf_counter

    def synced() -> float:
        torch.cuda.synchronize(x.device)
        return time.perf_counter()

    return synced


class Prepared:
    """The repeated call of ``sparse_hessian(f, pattern=...)`` for one size ``n``
    (NOTE [prepared reuse])."""

    def __init__(
        self,
        f: Callable[..., torch.Tensor],
        argnums: Any,
        plan: Plan,
        *,
        chunk_size: int | None,
        compile: bool,
        call: str,
    ) -> None:
        self.f, self.argnums, self.plan, self.call = f, argnums, plan, call
        self.chunk_size = chunk_size
        self.mode = "auto"  # until the race (NOTE [prepared strategy])
        self.compile = compile
        self._compiled: Callable | None = None

    def engine(self, args: tuple, mode: str | None = None) -> FlatHVP:
        return FlatHVP(self.f, args, self.argnums, call=self.call, mode=mode or self.mode)

    def entries(self, args: tuple) -> torch.Tensor:
        """The pattern's entries at ``args``: the prepared call."""
        if self._compiled is not None:
            engine_inputs = FlatArgs.of(self.call, args, self.argnums)
            return self._compiled(engine_inputs.x(), engine_inputs.args)
        return entries(self.engine(args), self.plan, self.chunk_size)[0]

    def __call__(self, args: tuple) -> torch.Tensor:
        return self.plan.csr(self.entries(args))

    def settle(self, args: tuple, reference: torch.Tensor) -> None:
        """First-call work: race the strategies, compile (checked against ``reference``,
        the eager entries)."""
        if self.plan.coloring.num_colors == 0 or len(self.plan.rows) == 0:
            return  # nothing to evaluate: the eager path returns zeros at once
        self._race(args)
        if self.compile:
            self._compile(args, reference)

    def _race(self, args: tuple) -> None:
        best: tuple[float, str, int | None] | None = None
        for mode, chunk in STRATEGIES:
            if self.chunk_size is not None:
                chunk = self.chunk_size
            try:
                times = []
                for _ in range(2):
                    engine = self.engine(args, mode)
                    now = clock(engine.x)
                    start = now()
                    entries(engine, self.plan, chunk)
                    times.append(now() - start)
            except Exception:  # noqa: BLE001 - NOTE [prepared strategy]: skip a failing one
                continue
            if best is None or min(times) < best[0]:
                best = (min(times), mode, chunk)
            if best[0] < RACE_MIN_SECONDS:
                break  # too cheap to matter
        if best is not None:
            _, self.mode, self.chunk_size = best

    def _compile(self, args: tuple, reference: torch.Tensor) -> None:
        try:
            compiled = compiled_entries(self.f, self.argnums, self.plan, self.call)
            inputs = FlatArgs.of(self.call, args, self.argnums)
            got = compiled(inputs.x(), inputs.args)
        except Exception as err:  # noqa: BLE001 - NOTE [compiled reuse]: any failure
            self._fallback(
                f"torch.compile failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200] if str(err) else ''})"
            )
            return
        scale = float(reference.abs().max()) if reference.numel() else 0.0
        tol = torch.finfo(reference.dtype).eps ** 0.5 * max(scale, 1.0)
        err = float((got - reference).abs().max()) if reference.numel() else 0.0
        if not err <= tol:
            self._fallback(f"its values differ from the eager ones by {err:.3g} (> {tol:.3g})")
            return
        self._compiled = compiled

    def _fallback(self, why: str) -> None:
        warnings.warn(
            f"{self.call}: compile=True: {why}; using the eager path, which gives the same "
            "values more slowly.",
            CompileFallbackWarning,
            stacklevel=4,
        )
        self.compile = False


def compiled_entries(
    f: Callable[..., torch.Tensor], argnums: Any, plan: Plan, call: str
) -> Callable[[torch.Tensor, tuple], torch.Tensor]:
    """``torch.compile`` of ``(x, args) -> entries``: forward-over-reverse HVPs with the
    plan's seeds, then the recovery (NOTE [compiled reuse])."""
    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError("torch.compile is not supported on this Python/platform")

    def run(x: torch.Tensor, args: tuple) -> torch.Tensor:
        inputs = FlatArgs.of(call, args, argnums)
        seeds = plan.seeds(x)

        def g(v: torch.Tensor) -> torch.Tensor:
            return inputs.call(f, v).reshape(())

        B = vmap(lambda s: jvp(grad(g), (x,), (s,))[1])(seeds)
        return plan.recover(B)[0]

    return torch.compile(run, dynamic=False)
