"""Hessian-vector products of a function at a point, on one flat vector.

# NOTE [strategies]
Two strategies compute the same products. ``reverse-over-reverse`` builds the
gradient graph once with plain autograd (``create_graph``) and runs every chunk
of products as one batched double-backward through it (:func:`batched_grad`,
NOTE [batched backward]): the forward pass runs once and is never batched, so in-place updates of captured
tensors and BatchNorm in train mode are no obstacle. ``forward-over-reverse``
(``jvp`` of ``grad``, vmapped over tangents) carries a batch of tangents through
one forward and backward pass per chunk. ``auto`` starts with the former, races
the two on large jobs (NOTE [strategy race]) and hands over to the other whenever
one fails (an operator without forward-mode AD, a function ``vmap`` cannot
batch, a missing double-backward). If the batched products fail in every
strategy, :func:`hesse._chunking.map_chunks` loops, with one warning. Whatever
path runs, the products are the same (tests check it).

:class:`FlatHVP` is the one HVP engine: ``hesse.hessian``, ``hesse.hvp``,
sparse Hessians, diagonals and function operators all use it.
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch.func import grad, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten

from hesse._attention import math_attention
from hesse._chunking import (
    EFFICIENT_CHUNK_BYTES,
    allocated_bytes,
    chunk_size_for,
    default_memory_budget,
    map_chunks,
    saved_bytes,
    splitting_pays,
)
from hesse._flat import FlatArgs
from hesse._validation import (
    check_choice,
    check_chunk_size,
    check_memory_budget,
    check_scalar_output,
)

MODES = ("auto", "forward-over-reverse", "reverse-over-reverse")

RowSource = Callable[[int, int], torch.Tensor]

#: products expected to take less than this run without a strategy race (NOTE [strategy race]).
RACE_MIN_SECONDS = 0.25
#: forward-over-reverse takes over only when this much faster than reverse-over-reverse
#: (one timed chunk each: a small difference is within the noise of a loaded machine).
RACE_MARGIN = 0.8


class FlatHVP:
    """Hessian-vector products of ``f`` at ``args`` with respect to ``args[argnums]``.

    The differentiated arguments are flattened into one vector ``x`` of length
    ``n`` (see :class:`hesse._flat.Flat`); products take and return ``(k, n)``.
    """

    def __init__(
        self,
        f: Callable[..., torch.Tensor],
        args: Sequence[Any],
        argnums: int | Sequence[int],
        *,
        call: str,
        mode: str = "auto",
    ) -> None:
        self.call = call
        check_choice(call, "mode", mode, MODES)
        self.inputs = FlatArgs.of(call, args, argnums)
        self.flat = self.inputs.flat
        x = self.inputs.x()
        self.x = x.clone() if x.is_inference() else x  # inference tensors cannot require grad
        self.f = f
        # NOTE [under a transform]: inside torch.func.vmap / grad, autograd graphs of the
        # wrapped tensors cannot be built; reverse over reverse goes through torch.func.
        transformed = torch._C._functorch.is_functorch_wrapped_tensor(self.x)
        self.mode = "vjp-of-grad" if transformed and mode != "forward-over-reverse" else mode
        self._pull: Callable | None = None
        self._graph: tuple[torch.Tensor, torch.Tensor] | None = None
        self._gradient: torch.Tensor | None = None
        self._row_bytes: int | None = None
        self._split = True  # NOTE [when to split], settled with the memory estimate
        self._leaf = None if transformed else self.x.detach().requires_grad_(True)

    # -- the flat scalar function -------------------------------------------------
    def g(self, x: torch.Tensor) -> torch.Tensor:
        with math_attention():  # NOTE [math attention]
            out = check_scalar_output(self.call, self.inputs.call(self.f, x))
        return out if out.dim() == 0 else out.reshape(())  # no view node when already 0-d

    @property
    def n(self) -> int:
        return self.flat.n

    # -- forward-over-reverse -----------------------------------------------------
    def _fwdrev_single(self, v: torch.Tensor) -> torch.Tensor:
        gr, hv = jvp(grad(self.g), (self.x,), (v,))
        if self._gradient is None:
            self._gradient = gr.detach()
        return hv

    def _fwdrev_batched(self, vs: torch.Tensor) -> torch.Tensor:
        return vmap(self._fwdrev_single_pure)(vs)

    def _fwdrev_single_pure(self, v: torch.Tensor) -> torch.Tensor:
        return jvp(grad(self.g), (self.x,), (v,))[1]

    # -- reverse-over-reverse -----------------------------------------------------
    def _revrev_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._graph is None:
            x = self._leaf
            with torch.enable_grad():
                y = self.g(x)
                gr = None
                if y.requires_grad:
                    (gr,) = torch.autograd.grad(y, x, create_graph=True, allow_unused=True)
            if gr is None:  # f does not depend on x
                gr = torch.zeros_like(x)
            self._graph = (x, gr)
            self._gradient = gr.detach()
        return self._graph

    def _revrev(self, vs: torch.Tensor, batched: bool) -> torch.Tensor:
        x, gr = self._revrev_graph()
        if not gr.requires_grad:  # f is at most linear in x: the Hessian is zero
            return torch.zeros_like(vs)
        if batched:
            return batched_grad(gr, [x], vs, key=self._job(vs))[0]
        (hv,) = torch.autograd.grad(gr, x, vs, retain_graph=True, allow_unused=True)
        return torch.zeros_like(vs) if hv is None else hv

    def _job(self, vs: torch.Tensor) -> Hashable:
        """The key of the measured vectoriser choice (NOTE [batched backward])."""
        f = self.f
        code = getattr(f, "__code__", None)
        return (code if code is not None else id(f), vs.shape, vs.dtype, torch.get_num_threads())

    def _revrev_batched(self, vs: torch.Tensor) -> torch.Tensor:
        return self._revrev(vs, batched=True)

    def _revrev_single(self, v: torch.Tensor) -> torch.Tensor:
        return self._revrev(v, batched=False)

    # -- reverse-over-reverse through torch.func ---------------------------------
    def _vjp_of_grad_single(self, v: torch.Tensor) -> torch.Tensor:
        """``vjp`` of ``grad``: composes with an enclosing transform.

        # NOTE [under a transform]
        Called inside ``torch.func.vmap`` (``vmap(hesse.hessian(f))(X)``: one Hessian per
        sample), the input is a functorch-wrapped tensor: it cannot be made a leaf
        of a plain autograd graph. Reverse over reverse then runs through
        ``torch.func``: the gradient's VJP is built once and vmapped over the rows
        (what ``jacrev(jacrev(f))`` does), with the same chunking and memory budget.
        """
        return self._pullback()(v)[0]

    def _pullback(self) -> Callable:
        if self._pull is None:
            gr, self._pull = vjp(grad(self.g), self.x)
            self._gradient = gr
        return self._pull

    def _vjp_of_grad_batched(self, vs: torch.Tensor) -> torch.Tensor:
        pull = self._pullback()  # built once, outside the row vmap
        return vmap(lambda v: pull(v)[0])(vs)

    # -- strategy resolution ------------------------------------------------------
    def _paths(self) -> tuple[Callable, Callable]:
        if self.mode == "reverse-over-reverse":
            return self._revrev_batched, self._revrev_single
        if self.mode == "vjp-of-grad":
            return self._vjp_of_grad_batched, self._vjp_of_grad_single
        return self._fwdrev_batched, self._fwdrev_single

    def _per_row_bytes(self, enough: int = 0) -> int:
        """Estimated bytes one product adds to a chunk.

        A count of saved bytes up to ``enough`` leads to the same chunks as any
        smaller one, so an upper bound up to it is taken as is (:func:`saved_bytes`).

        # NOTE [memory estimate]
        The gradient graph is built once with the intermediate tensors autograd
        saves counted (reverse-over-reverse reuses the graph; ``hvp`` returns the
        gradient). A product carries, per vector, about one copy of each saved
        intermediate through the double backward, plus vectors of length ``n``;
        ``4 x`` both bounds that from above. Forward-over-reverse, when chosen
        explicitly, counts every allocation of one ``torch.func.grad`` instead;
        under a transform (NOTE [under a transform]), every allocation of building
        the gradient's VJP, which the products then reuse.
        """
        if self._row_bytes is None:
            used = None
            revrev = self._leaf is not None and self.mode != "forward-over-reverse"
            if revrev:  # the graph is built here, or was (a probe product), and walked
                leaf = self._leaf
                try:  # NOTE [strategy race]: the graph reverse-over-reverse starts from
                    used = self._counted(
                        self._revrev_graph,
                        lambda: saved_bytes(self._revrev_graph, leaf, at_most=enough)[1],
                    )
                except Exception:  # noqa: BLE001 - NOTE [strategies]
                    if self.mode != "auto":
                        raise
                    self.mode = "forward-over-reverse"
            if used is None and self.mode == "vjp-of-grad" and self._pull is None:  # reused VJP
                used = self._counted(self._pullback, lambda: allocated_bytes(self._pullback)[1])
            if used is None:
                gr, used = allocated_bytes(lambda: grad(self.g)(self.x))
                self._gradient = gr.detach()  # type: ignore[union-attr]
            self._row_bytes = 4 * used + 4 * self.n * self.x.element_size()
            self._split = splitting_pays(used, self.n * self.x.element_size())
        return self._row_bytes

    def _counted(self, build: Callable[[], object], count: Callable[[], int]) -> int:
        """``count()`` (which builds what it counts), or ``build()`` and the count a
        repeated call of this job remembered (NOTE [memory memo])."""
        key = self._memo_key()
        known = _saved_memo.get(key) if key is not None else None
        if known is not None and known[0]() is self.f:
            build()
            return known[1]
        used = count()
        if key is not None:
            _remember(key, self.f, used)
        return used

    def _memo_key(self) -> Hashable | None:
        """NOTE [memory memo]: the key of this job's saved-bytes count, if it can have one."""
        try:
            weakref.ref(self.f)
        except TypeError:  # no weak reference: no memo (a stale id could be reused)
            return None
        args = self.inputs.args
        if all(isinstance(a, torch.Tensor) for a in args):  # no pytree work (per-call cost)
            leaves, spec = args, len(args)
        else:
            leaves, spec = tree_flatten(args)
        shapes = tuple(
            (t.shape, t.dtype, t.device)
            if isinstance(t, torch.Tensor)
            else t
            if isinstance(t, (int, float, bool, str, type(None)))
            else type(t)
            for t in leaves
        )
        return (id(self.f), self.inputs.nums, self.inputs.single, spec, shapes, self.mode)

    def _run(self, batched: Callable, single: Callable, chunk: torch.Tensor) -> torch.Tensor:
        return map_chunks(
            batched,
            single,
            chunk.shape[0],
            tensor_rows(chunk),
            chunk_size=chunk.shape[0],
            call=self.call,
        )

    def _settle(self, rows: RowSource, first: int, k: int) -> torch.Tensor:
        """Settle ``auto`` on the first products and return them (``first`` or ``2 first`` rows).

        # NOTE [strategy race]
        Reverse-over-reverse goes first: its gradient graph is built once (and
        already was, to size the chunks), it reuses the forward pass across all
        chunks and skips the tangents of the forward outputs (``sum(sin(x))``:
        about 2x fewer flops than forward-over-reverse). Forward-over-reverse can
        win on wide layers, where differentiating the backward graph costs more
        than carrying tangents forward. The first chunk's measured time prices the
        rest of the job: only when the remaining products would take longer than
        :data:`RACE_MIN_SECONDS` and span at least three more chunks (so that a
        losing racer's chunk is a small share) does the second chunk run
        forward-over-reverse, timed (CPU time of the process on the CPU, steadier
        than wall time on a loaded machine), and forward-over-reverse does the rest
        only if it was faster by a clear margin (:data:`RACE_MARGIN`). Small jobs pay
        nothing for the race. It spends no extra products: both chunks are part of
        the result. Any failure of one strategy hands over to the other (NOTE
        [strategies]).
        """
        clock = time.process_time if self.x.device.type == "cpu" else time.perf_counter
        rest = k - first
        timed = rest >= 3 * first  # else no race: no clock (a system call) either
        try:
            self._revrev_graph()
            start = clock() if timed else 0.0
            head = self._revrev_batched(rows(0, first))
            rev_time = clock() - start if timed else 0.0
        except Exception:  # noqa: BLE001 - NOTE [strategies]: any failure moves on
            self.mode = "forward-over-reverse"
            return self._run(self._fwdrev_batched, self._fwdrev_single, rows(0, first))
        self.mode = "reverse-over-reverse"
        if not timed or rev_time * rest / first < RACE_MIN_SECONDS:
            return head
        try:
            start = clock()
            tail = self._fwdrev_batched(rows(first, 2 * first))
            fwd_time = clock() - start
        except Exception:  # noqa: BLE001 - forward-over-reverse unavailable: keep reverse
            return head
        if fwd_time < RACE_MARGIN * rev_time:
            self.mode = "forward-over-reverse"
        return torch.cat([head, tail])

    def product(self, v: torch.Tensor) -> torch.Tensor:
        """One product ``H @ v`` for a flat ``(n,)`` vector, with the current strategy.

        No batching machinery: a single reverse-over-reverse product is one plain
        double-backward through the cached graph (about one gradient's cost).
        """
        return self._paths()[1](v)

    @property
    def gradient(self) -> torch.Tensor:
        """The flat gradient at ``x`` (computed by the first product if not yet)."""
        if self._gradient is None and self.mode != "reverse-over-reverse":
            try:
                self._gradient = grad(self.g)(self.x).detach()
            except Exception:  # noqa: BLE001 - NOTE [strategies]
                if self.mode != "auto":
                    raise
        if self._gradient is None:
            self._revrev_graph()
        assert self._gradient is not None
        return self._gradient

    def apply(
        self,
        k: int,
        rows: RowSource | None,
        *,
        chunk_size: int | None = None,
        memory_budget: int | float | None = None,
        fixed_bytes: int = 0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``H @ v`` for the ``k`` vectors ``rows(start, stop)``: a ``(k, n)`` tensor.

        ``rows=None`` means the first ``k`` basis vectors (Hessian rows).

        Without ``chunk_size``, chunks are sized so that
        ``fixed_bytes + chunk * per_row`` fits ``memory_budget`` (default: half the
        free memory), see NOTE [memory estimate].
        """
        check_chunk_size(self.call, chunk_size)
        check_memory_budget(self.call, memory_budget)
        if chunk_size is None:
            row = self.n * self.x.element_size()
            # Saved bytes below this keep the whole job in one chunk under the cap:
            # no need to find which saved tensors depend on x.
            one_pass = max(0, (EFFICIENT_CHUNK_BYTES // max(k, 1) - 4 * row) // 4)
            per_row = self._per_row_bytes(enough=one_pass)
            needed = fixed_bytes + k * per_row  # the whole job in one pass
            budget = memory_budget or default_memory_budget(self.x.device, needed=needed)
            chunk_size = chunk_size_for(
                rows=k,
                per_row_bytes=per_row,
                fixed_bytes=fixed_bytes,
                budget=int(budget),
                split=self._split,
            )
        if rows is None:
            if chunk_size >= k:  # all rows at once: one call makes them
                rows = tensor_rows(torch.eye(k, self.n, dtype=self.x.dtype, device=self.x.device))
            else:
                rows = basis_rows(self.n, self.x, capacity=chunk_size)
        done = 0
        if self.mode == "auto":
            head = self._settle(rows, min(k, chunk_size), k)  # NOTE [strategy race]
            done = head.shape[0]
            if done == k and out is None:
                return head  # one chunk did it all: no copy
            if out is None:
                out = head.new_empty((k, *head.shape[1:]))
            out[:done] = head
            if done == k:
                return out
        batched, single = self._paths()
        rest = map_chunks(
            batched,
            single,
            k - done,
            lambda s, e: rows(done + s, done + e),
            chunk_size=chunk_size,
            call=self.call,
            out=None if out is None else out[done:],
        )
        return rest if out is None else out


# NOTE [memory memo]
# Counting the bytes a gradient graph saves walks the whole graph once (Python per
# node): on small functions (Rosenbrock at n = 100) that walk costs as much as the
# Hessian; under a transform (NOTE [under a transform]) counting the allocations of
# the gradient's VJP sends every operator through a dispatch mode (10 % of a
# per-sample forum-MLP Hessian at B = 1). A repeated call of the same function object
# (held by a weak reference, so a recycled ``id`` never matches) with the same argument
# structure, shapes, dtype and device reuses the first call's count. The count sizes chunks only; it
# never changes a value. A function whose saved tensors grow between calls with
# the same shapes (a closure over a model that is swapped for a larger one) keeps
# the first count: pass ``chunk_size=`` or a ``memory_budget=`` there.
_saved_memo: dict[Hashable, tuple[weakref.ref, int]] = {}


#: entries a per-job memo keeps; beyond it the oldest job is measured again.
MEMO_SIZE = 1024


def _bound(memo: dict) -> None:
    """Drop a memo's oldest entries beyond :data:`MEMO_SIZE` (insertion order)."""
    while len(memo) > MEMO_SIZE:
        del memo[next(iter(memo))]


def _remember(key: Hashable, f: Callable, used: int) -> None:
    _saved_memo[key] = (weakref.ref(f), used)
    _bound(_saved_memo)


#: a vectoriser is tried by measurement only on calls faster than this (NOTE [batched backward]):
#: the legacy batching saves tens of microseconds where it wins, nothing on longer calls.
EXPLORE_SECONDS = 0.02
#: timed runs of each vectoriser in a job's first call before the faster is kept (the
#: minimum of these counts, the first run of each left out: it pays one-time set-up,
#: 2-4x a later run).
EXPLORE_CALLS = 3
_VECTORISERS = ("vmap", "legacy")
_timings: dict[Hashable, dict[str, list[float]]] = {}
_chosen: dict[Hashable, Callable] = {}  # the settled choice per job, read first


def batched_grad(
    output: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    cotangents: torch.Tensor,
    *,
    key: Hashable | None = None,
) -> list[torch.Tensor]:
    """``torch.autograd.grad(output, inputs, v)`` for every ``v`` in ``cotangents`` (a leading batch).

    The graph is retained; inputs ``output`` does not reach get zeros. Shaped
    ``(k, *input.shape)`` per input. ``key`` names the job for the measured choice of
    vectoriser (the same function, shapes, dtype and thread count); ``None``: no
    measurement, ``vmap`` first.

    # NOTE [batched backward]
    Two vectorisers can run one backward pass for a batch of cotangents:
    ``torch.func.vmap`` over ``torch.autograd.grad`` (functorch's batching rules)
    and ``is_grads_batched`` (the legacy ``torch._vmap_internals`` batching). Which
    is faster depends on the graph: on the forum MLP's 784-input Hessian the former
    is about 2x faster (2.8 ms against 6.0 ms at one thread; the legacy path falls
    back to per-row loops in more backward formulas), while on small elementwise
    graphs (``sum(sin(x))``, Rosenbrock, n <= 150) the legacy path's fixed cost is
    20-45 us lower on calls of a few hundred microseconds. So the first call of a
    keyed job whose batched backward takes under :data:`EXPLORE_SECONDS` runs it
    with each vectoriser :data:`EXPLORE_CALLS` times, alternating, all within that
    call (spread over the first calls instead, the slower vectoriser's runs fell
    into a caller's timed repeats), and every later call uses the one with the
    lower minimum of all but its first run (the first run of each pays one-time
    set-up and, counted, chose the slower one on ``sum(sin(x))`` at n = 100);
    slower jobs never try the legacy path, whose worst case is a loop. A legacy run that warns of a missing batching
    rule (a per-row loop) or raises is never chosen. Where ``vmap`` raises (an
    in-place op or a custom ``autograd.Function`` that functorch cannot batch) the
    legacy path runs, and its failure goes to the caller's fallback (NOTE
    [strategies], NOTE [chunking]). Both are plain double backward through
    autograd's graph, not ``torch.func``'s forward mode, so they agree with the
    unbatched products where forward-mode rules are wrong (the input-weight terms
    of LayerNorm in torch 2.13, tested), and with each other (tested).
    """
    inputs = list(inputs)
    if cotangents.shape[0] <= 1:
        return _legacy(output, inputs, cotangents)
    if key is None or cotangents.device.type != "cpu":
        return _vectorised(output, inputs, cotangents)
    chosen = _chosen.get(key)
    if chosen is not None:  # settled: no bookkeeping (these calls take microseconds)
        return chosen(output, inputs, cotangents)
    times = _timings.get(key)
    if times is None:
        times = _timings[key] = {name: [] for name in _VECTORISERS}
        _bound(_timings)
    result: list[torch.Tensor] | None = None
    while True:  # the first call of a job times both, alternating (NOTE [batched backward])
        exploring = min(times["vmap"], default=0.0) < EXPLORE_SECONDS
        pending = [n for n in _VECTORISERS if exploring and len(times[n]) < EXPLORE_CALLS]
        if not pending:
            break
        name = min(pending, key=lambda n: len(times[n]))  # vmap, legacy, vmap, ...
        start = time.perf_counter()
        if name == "vmap":
            out = _vectorised(output, inputs, cotangents, times)
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    out = _legacy(output, inputs, cotangents)
                except Exception:  # noqa: BLE001 - never chosen; vmap's result serves
                    out = None
            if out is None or any("performance drop" in str(w.message) for w in caught):
                times["legacy"] = [float("inf")] * EXPLORE_CALLS
                result = out if out is not None else result
                continue
        if float("inf") not in times[name]:  # inf: vmap raised and the legacy path ran
            times[name].append(time.perf_counter() - start)
        result = out

    def cost(name: str) -> tuple[bool, float]:  # a vectoriser that failed goes last
        return float("inf") in times[name], min(times[name][1:], default=float("inf"))

    chosen = _chosen[key] = _legacy if min(_VECTORISERS, key=cost) == "legacy" else _vectorised
    _bound(_chosen)
    return result if result is not None else chosen(output, inputs, cotangents)


def _vectorised(
    output: torch.Tensor,
    inputs: list[torch.Tensor],
    cotangents: torch.Tensor,
    times: dict[str, list[float]] | None = None,
) -> list[torch.Tensor]:
    """``vmap`` over ``autograd.grad``; the legacy batching where ``vmap`` raises."""

    def one(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gs = torch.autograd.grad(output, inputs, v, retain_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs))

    def single(v: torch.Tensor) -> torch.Tensor:  # one input: no tuples through vmap
        (g,) = torch.autograd.grad(output, inputs, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(inputs[0]) if g is None else g

    try:
        if len(inputs) == 1:
            return [vmap(single)(cotangents)]
        return list(vmap(one)(cotangents))
    except Exception:  # noqa: BLE001 - NOTE [batched backward]: the legacy batching next
        if times is not None:  # vmap cannot batch this graph: the legacy path is the choice
            times["vmap"] = [float("inf")] * EXPLORE_CALLS
    return _legacy(output, inputs, cotangents)


def _legacy(
    output: torch.Tensor, inputs: list[torch.Tensor], cotangents: torch.Tensor
) -> list[torch.Tensor]:
    """``is_grads_batched``: the legacy batching (NOTE [batched backward])."""
    gs = torch.autograd.grad(
        output, inputs, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    k = cotangents.shape[0]
    return [x.new_zeros((k, *x.shape)) if g is None else g for x, g in zip(inputs, gs)]


def basis_rows(n: int, like: torch.Tensor, capacity: int = 0) -> RowSource:
    """Rows ``start:stop`` of the ``n x n`` identity, made on demand (never all at once).

    One zero buffer is reused across chunks (only its ones move), which saves
    allocating and page-faulting a fresh ``chunk x n`` block for every chunk. Each
    chunk is consumed before the next is requested (:func:`map_chunks`);
    ``capacity`` preallocates that many rows.
    """
    buffer = torch.zeros(min(n, capacity), n, dtype=like.dtype, device=like.device)
    ones: list[tuple[int, int]] = []  # (rows, offset) of the ones now in the buffer

    def rows(start: int, stop: int) -> torch.Tensor:
        nonlocal buffer
        m = stop - start
        if buffer.shape[0] < m:
            buffer = torch.zeros(m, n, dtype=like.dtype, device=like.device)
            ones.clear()
        for r, offset in ones:
            buffer[:r].diagonal(offset).fill_(0)
        buffer[:m].diagonal(start).fill_(1)  # row i has its one in column start + i
        ones[:] = [(m, start)]
        return buffer[:m]

    return rows


def tensor_rows(mat: torch.Tensor) -> RowSource:
    return lambda start, stop: mat[start:stop]
