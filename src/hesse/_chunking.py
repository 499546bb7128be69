"""The one chunked, vectorised loop, and the memory arithmetic that sizes its chunks.

# NOTE [chunking]
Every batched product in hesse (Hessian columns, compressed HVPs, operator
matmats, probe vectors) goes through :func:`map_chunks`. It applies a batched
function to ``chunk_size`` rows at a time and writes each result into one
preallocated output, so the peak is ``output + one chunk`` rather than the
``2 x output`` of a concatenation. When the batched function fails (a function
that ``vmap`` cannot batch: in-place updates of captured tensors, BatchNorm in
train mode, data-dependent control flow), it warns once, names the cause, and
continues with the unbatched function row by row: same answer, slower.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 1024**3
MiB = 1024**2

#: Cap on the estimated working set of one chunk (in the units of NOTE [memory
#: estimate], which overstate the real use about 4x), for jobs where splitting pays
#: (NOTE [when to split]).
EFFICIENT_CHUNK_BYTES = 128 * MiB
#: Splitting pays only when a row's intermediates outweigh its output this many times.
SPLIT_MIN_RATIO = 4

# NOTE [when to split]
# A job that fits the memory budget in one pass is split into cache-sized chunks
# (EFFICIENT_CHUNK_BYTES) only when that is cheaper. A split costs one more copy of
# every output row (each chunk's result is written into the result: the row's bytes
# read and written once more) and a pass over the graph per chunk; it saves, per
# row, the trips to memory of the intermediate tensors the product creates, which a
# chunk that fits in cache keeps there and one large pass does not. So it pays when a
# row's intermediates (the saved tensors a product carries per vector) outweigh its
# output by a clear factor, SPLIT_MIN_RATIO. Measured at one thread, interleaved,
# with glibc's default allocator (freed memory reused): Rosenbrock (n = 1,000-2,000,
# intermediates 8 output rows) 1.3-1.9x and MLP parameter Hessians (10-45; 1,042 and
# 4,810 parameters) 1.2-2.1x faster in chunks than in one pass; sum(sin(x)) (2) and the
# forum MLP w.r.t. its input (under 0.5) the same or slower in chunks. With every
# allocation of 64 KiB or more fresh from the system (the sweep's peak-memory setting,
# benchmarks/_measure.py) page faults dominate and the split gains nothing at these
# sizes (one pass 1.0-1.15x faster), so the rule splits only where the cache gain is
# large. Not yet in the rule: at several threads each chunk also pays one
# parallel-region hand-off per operator (on a loaded two-core machine Rosenbrock's
# chunks were 2-3x slower than one pass at two threads); a per-chunk cost (graph
# nodes x threads) would need measurements on a quiet machine.


class LoopFallbackWarning(UserWarning):
    """A batched (vmap) path failed and hesse fell back to a slower loop."""


def map_chunks(
    batched: Callable[[torch.Tensor], torch.Tensor],
    single: Callable[[torch.Tensor], torch.Tensor] | None,
    k: int,
    rows: Callable[[int, int], torch.Tensor],
    *,
    chunk_size: int,
    call: str,
    out: torch.Tensor | None = None,
    total: bool = False,
) -> torch.Tensor:
    """Apply ``batched`` to ``rows`` in chunks of ``chunk_size``; stack into ``out``.

    With ``total=True`` the chunks' results are summed instead of stacked: ``batched``
    maps a chunk to one tensor (its contribution, e.g. a Gram matrix of the chunk's
    rows), ``single`` one row to its contribution, and the sum is returned (the peak
    is one sum and one chunk).

    Args:
        batched: maps a ``(c, ...)`` chunk to a ``(c, ...)`` result.
        single: maps one row to one result; used row by row if ``batched`` raises.
            ``None`` re-raises instead.
        k: number of rows.
        rows: ``rows(start, stop)`` returns the ``(stop - start, ...)`` inputs; rows are
            made on demand so that no ``(k, ...)`` input need exist at once.
        chunk_size: rows per call of ``batched``.
        call: call form for the warning.
        out: optional preallocated ``(k, ...)`` output.
        total: sum the chunks' results instead of stacking them.

    Returns:
        ``(k, ...)``: the results, in order (with ``total``, their sum).
    """
    looping = False
    for start in range(0, k, chunk_size):
        chunk = rows(start, min(k, start + chunk_size))
        result = None
        if not looping:
            try:
                result = batched(chunk)
            except Exception as err:  # noqa: BLE001 - any vmap failure falls back
                if single is None:
                    raise
                looping = True
                warnings.warn(
                    f"{call}: the vectorised (vmap) path failed ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200]}); falling back to a loop over "
                    f"{k} products, which gives the same result more slowly.",
                    LoopFallbackWarning,
                    stacklevel=3,
                )
        if looping:
            assert single is not None
            parts = [single(r) for r in chunk]
            result = torch.stack(parts).sum(0) if total else torch.stack(parts)
        assert result is not None
        if total:
            out = result if out is None else out.add_(result)
            continue
        if out is None:
            if chunk.shape[0] == k and not _shares_memory(result, chunk):
                return result  # one chunk did it all: no copy
            out = result.new_empty((k, *result.shape[1:]))
        out[start : start + chunk.shape[0]] = result
    if out is None:  # k == 0
        raise ValueError(f"{call}: nothing to compute (zero rows).")
    return out


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` may alias ``b`` (row sources may reuse one buffer across chunks)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if wrapped(a) or wrapped(b):  # no storage to compare under a transform
        return a is b
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


_AVPHYS_PAGES = getattr(os, "sysconf_names", {}).get("SC_AVPHYS_PAGES")  # None off POSIX
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if _AVPHYS_PAGES is not None else 0


def default_memory_budget(device: torch.device, *, needed: int = 0) -> int:
    """Half of the memory currently free on ``device`` (bytes).

    With ``needed``, a small job skips the precise reading on the CPU: when half of
    the unused memory (one cheap system call) already covers ``needed``, that is
    returned; the available memory (``MemAvailable``, which adds reclaimable caches)
    is at least as large in practice, so no decision about a job of ``needed`` bytes
    changes.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    if needed > 0 and _AVPHYS_PAGES is not None:
        try:
            unused = os.sysconf(_AVPHYS_PAGES) * _PAGE_SIZE // 2
        except (ValueError, OSError):
            unused = 0
        if unused >= needed:
            return unused
    try:  # one raw read: a text-mode line scan costs a share of a small Hessian
        fd = os.open("/proc/meminfo", os.O_RDONLY)
        try:
            info = os.read(fd, 8192)
        finally:
            os.close(fd)
        start = info.index(b"MemAvailable:") + len(b"MemAvailable:")
        return int(info[start : info.index(b"kB", start)]) * 1024 // 2
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 4 * GiB


class _AllocationCounter(TorchDispatchMode):
    """Sum the bytes of every tensor the dispatcher produces (an upper bound on the peak)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            # Views and in-place results (alias_info set) allocate nothing.
            aliased = i < len(returns) and returns[i].alias_info is not None
            if isinstance(t, torch.Tensor) and not aliased:
                self.bytes += t.numel() * t.element_size()
        return out


def allocated_bytes(fn: Callable[[], object]) -> tuple[object, int]:
    """Run ``fn()`` and return its result with the bytes it allocated in total.

    Total allocation bounds the peak from above, so chunk sizes derived from it
    stay within the budget (at the price of some conservatism).
    """
    counter = _AllocationCounter()
    with counter:
        result = fn()
    return result, counter.bytes


def saved_bytes(
    fn: Callable[[], object], wrt: torch.Tensor, *, at_most: int = 0
) -> tuple[object, int]:
    """Run ``fn()`` and return its result with the bytes autograd saved that depend on ``wrt``.

    Only saved tensors downstream of the leaf ``wrt`` count: they are what a
    batched product carries per vector; weights and their views are shared. The
    saved tensors are read after the fact from the nodes of the result's graph
    (``_saved_*`` attributes, ``saved_tensors`` of custom functions): Python runs
    once per graph node, and the graph is left as autograd built it. (Counting them
    with ``saved_tensors_hooks`` instead leaves a Python unpack hook on every saved
    tensor, which every later backward through a kept graph pays: measured +25 % on
    a double backward through a small GPT-2.) When the saved tensors that have a
    history come to at most ``at_most`` bytes in all, that upper bound is returned
    without asking which of them reach ``wrt`` (the caller's decision is the same for
    any smaller count).
    """
    with torch.enable_grad():  # also under a caller's no_grad
        source = wrt.view_as(wrt).grad_fn.next_functions[0][0]  # wrt's AccumulateGrad
    result = fn()
    roots = [t.grad_fn for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
    seen: set[object] = set()
    stack = [r for r in roots if r is not None]
    saved: list[tuple[Any, int]] = []  # (grad_fn of a saved tensor, its bytes)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(m for m, _ in node.next_functions)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            values: list[Any] = list(node.saved_tensors)
        else:
            values = [getattr(node, a) for a in _saved_names(type(node))]
        for value in values:
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    saved.append((t.grad_fn, t.numel() * t.element_size()))
    bound = sum(size for _, size in saved)
    if bound <= at_most:
        return result, bound
    depends: dict[Any, bool] = {source: True}  # whether a node's inputs reach wrt
    work: list[tuple[Any, bool]] = [(node, False) for node, _ in saved]
    while work:  # post-order, iterative: graphs can be deeper than Python's recursion limit
        node, expanded = work.pop()
        if expanded:
            depends[node] = any(depends.get(m, False) for m, _ in node.next_functions)
        elif node not in depends:
            depends[node] = False  # until its inputs are done (a DAG: none reaches it back)
            work.append((node, True))
            work.extend((m, False) for m, _ in node.next_functions if m is not None)
    return result, sum(size for node, size in saved if depends[node])


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def _saved_names(kind: type) -> tuple[str, ...]:
    """The ``_saved_*`` attributes of an autograd node type (``dir`` once per type)."""
    names = _SAVED_NAMES.get(kind)
    if names is None:
        names = _SAVED_NAMES[kind] = tuple(a for a in dir(kind) if a.startswith("_saved_"))
    return names


def chunk_size_for(
    *,
    rows: int,
    per_row_bytes: int,
    fixed_bytes: int,
    budget: int,
    split: bool = True,
) -> int:
    """The largest chunk whose estimate ``fixed + c * per_row`` fits ``budget`` (at least 1).

    With ``split`` (see :func:`splitting_pays`) the chunk's own share is also capped at
    :data:`EFFICIENT_CHUNK_BYTES`.
    """
    room = budget - fixed_bytes
    if split:
        room = min(room, EFFICIENT_CHUNK_BYTES)
    if per_row_bytes <= 0:
        return rows
    return int(max(1, min(rows, room // per_row_bytes)))


def splitting_pays(intermediate_bytes: int, output_bytes: int) -> bool:
    """Whether cache-sized chunks beat one pass, per NOTE [when to split].

    Args:
        intermediate_bytes: intermediate tensors one row (one product) creates.
        output_bytes: bytes of one row of the result.
    """
    return intermediate_bytes >= SPLIT_MIN_RATIO * output_bytes


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
