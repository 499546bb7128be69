"""The dense Hessian with its columns split across ranks and gathered on every rank."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

from hesse._chunking import default_memory_budget, format_bytes
from hesse._hvp import FlatHVP, basis_rows
from hesse._validation import call_form, fail
from hesse.distributed._context import agree, checksum, gather_rows, resolve


def split_counts(n: int, world_size: int) -> list[int]:
    """``n`` items over ``world_size`` ranks as evenly as possible (the first get one more)."""
    base, extra = divmod(n, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def hessian(
    f: Callable[..., torch.Tensor],
    argnums: int | tuple[int, ...] = 0,
    *,
    process_group: Any = None,
    chunk_size: int | None = None,
    memory_budget: int | float | None = None,
    mode: str = "auto",
    timeout: float | timedelta | None = None,
) -> Callable[..., Any]:
    """:func:`hesse.hessian` with the ``n`` basis columns split across ranks.

    Rank ``r`` of ``R`` computes the Hessian-vector products with a contiguous
    block of about ``n / R`` basis vectors (the Hessian's rows ``H e_i``), then the
    blocks are all-gathered, so that every rank returns the whole Hessian, exactly
    what ``hesse.hessian(f, argnums)(*args)`` returns. Every rank must call it
    with the same ``f`` and the same arguments (checked: the sizes and a checksum
    of the point must agree). Without an initialised ``torch.distributed`` (and
    without ``process_group``) it is :func:`hesse.hessian`.

    Args:
        f: a function returning a real scalar tensor.
        argnums: which positional arguments to differentiate (int or tuple).
        process_group: the ranks to split over (default: the default group).
        chunk_size: basis vectors per vectorised pass on each rank (``None``: sized
            from ``memory_budget``).
        memory_budget: bytes the result, the gather buffers and one chunk may use
            on each rank (default: half the free memory of the device).
        mode: as in :func:`hesse.hessian`.
        timeout: the most (seconds or a timedelta) the gather may wait for the
            other ranks; default the process group's timeout.

    Returns:
        A function of ``*args`` returning the Hessian in ``torch.func.hessian``'s
        structure, identical on every rank.

    Raises:
        MemoryError: before any work, if the result and the gather buffers
            (about ``2 n^2`` entries) exceed ``memory_budget``.
        hesse.distributed.DistributedError: another rank raised, disappeared,
            stalled past the timeout, or called with different arguments.

    Cost: ``n / R`` HVPs per rank, then one all-gather of ``n^2`` entries; memory
    about ``2 n^2`` entries per rank (the gathered blocks and the result).

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> hessian(lambda x: x @ A @ x)(torch.ones(2, dtype=torch.float64))
        tensor([[4., 1.],
                [1., 6.]], dtype=torch.float64)
    """

    def wrapped(*args: Any) -> Any:
        call = call_form("hesse.distributed.hessian", len(args))
        ctx = resolve(call, process_group, timeout)
        engines: list[FlatHVP] = []

        def setup() -> list[float]:
            engine = FlatHVP(f, args, argnums, call=call, mode=mode)
            engines.append(engine)
            return [engine.n, checksum(engine.x)]

        # The engine is built inside a guarded step: a rank whose f or arguments are
        # rejected releases the others instead of leaving them at the gather.
        agree(ctx, call, "the size and the point (n, checksum of x)", setup, width=2)
        engine = engines[0]
        n, x = engine.n, engine.x
        counts = split_counts(n, ctx.world_size)
        start = sum(counts[: ctx.rank])
        mine = counts[ctx.rank]
        held = (
            n * n * x.element_size()
            if ctx.alone
            else 2 * max(counts) * ctx.world_size * n * x.element_size()
        )
        budget = memory_budget or default_memory_budget(x.device)
        basis = basis_rows(n, x)

        def compute() -> torch.Tensor:
            # Checked inside the guarded step: budgets may differ between machines.
            if held > budget:
                fail(
                    call,
                    f"the dense Hessian has {n} x {n} entries; with the gather buffers each "
                    f"rank holds {format_bytes(held)} in {x.dtype}, more than the memory budget "
                    f"of {format_bytes(budget)}. Use matrix-free products "
                    "(hesse.hessian_operator), or raise memory_budget if the memory is there.",
                    MemoryError,
                )
            if mine == 0:  # more ranks than columns
                return x.new_empty((0, n))
            return engine.apply(
                mine,
                lambda s, e: basis(start + s, start + e),
                chunk_size=chunk_size,
                memory_budget=budget,
                fixed_bytes=held,
            )

        full = gather_rows(
            ctx, call, compute, counts=counts, width=n, dtype=x.dtype, device=x.device
        )
        return engine.flat.unflatten_blocks(full)

    return wrapped
