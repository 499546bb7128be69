"""Per-sample curvature propagation on a model and a loss: tracing, batching, fallback.

The model graph and the loss graph are traced separately on one sample (NOTE
[per-sample] in ``_exact``): the loss graph is swept first and hands the exact
factorisation of the output Hessian, and the gradient, to the model graph. The
sweep is ``vmap``-ed over the samples of a batch in chunks timed to amortise a sweep's
fixed cost within the memory budget (NOTE [sweep chunks]) through
:func:`hesse._chunking.map_chunks`.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from hesse._attention import math_attention
from hesse._chunking import chunk_size_for, default_memory_budget, map_chunks
from hesse._validation import check_choice, check_chunk_size, check_generator, describe, fail
from hesse.curvprop._chain import chain_diagonal, chain_plan
from hesse.curvprop._exact import Propagation, _nbytes, assemble_term, diagonal_from_cols
from hesse.curvprop._graph import Plan, UnsupportedGraph, plan, sink_chain, trace

METHODS = ("exact", "becker-lecun")
GGN_METHODS = ("ggn", "ggn-mc")  # per_sample_diagonal only: through hesse.GGNOperator


# NOTE [memory estimate from the sweep]
# Chunks of samples are sized from one sample's memory. Counting every allocation
# with a dispatch mode (hesse._chunking.allocated_bytes) ran the first sample
# again under Python dispatch, at up to twice a sample's cost, and on a loaded
# machine dominated the first call. Instead the sweep adds up, in passing, the
# bytes of every node value and column block it makes (``made_bytes``). The
# dispatch counter's total, itself an upper bound on the peak, was 0.37-2.6x that
# sum on tiny GPT-2, ResNet-18 and MLP graphs (exact and Becker-LeCun sweeps, see
# tests/curvprop/test_memory.py), so four times the sum bounds it.
SWEEP_OVERHEAD = 4

# NOTE [cost model]
# Curvature propagation costs about what its sweep makes (``made_bytes``, NOTE
# [memory estimate from the sweep]) per sample; ``n`` Hessian-vector products cost
# about ``n`` times the model's node values per sample (``value_bytes``). On tiny
# GPT-2 the ratio of the two, 0.37, matched the measured time ratio (curvprop ~2.9x
# faster); on ResNet-18 ``layer1.0`` it is below 1e-4. ``hesse.diagonal(H, "exact")``
# switches to the basis products when curvature propagation is estimated to cost
# more than BRUTE_FORCE_MARGIN times as much, after the first sample (the choice is
# kept with the trace); both give the exact diagonal.
BRUTE_FORCE_MARGIN = 1.5


# NOTE [sweep chunks]
# One sweep carries a fixed cost per traced node (Python, dispatch, and at several
# threads a parallel-region hand-off per op) on top of work that grows with the
# samples it carries; on small models the fixed part dominates (attention with T=8,
# d=16: ~25 ms per sweep of one sample, ~8 ms per sample in sweeps of eight, one
# thread). A cache-sized chunk (NOTE [when to split] in ``hesse._chunking``) cannot
# see that cost: there a sample's sweep alone outgrew the cap, so samples went one
# by one. So the chunk is chosen from measured time (CPU time of the process on the
# CPU, like NOTE [strategies] in ``hesse._hvp``): after the first sample's sweep,
# each chunk is twice the best so far (at least the cache-sized one), kept unless
# its time per sample exceeds SWEEP_SLOWER times the best; SWEEP_MISSES larger
# chunks in a row that are clearly slower (their work outgrew the caches; one could
# be noise on a loaded machine) settle the size. The tolerance leans to larger
# chunks: with a strict "must be faster" rule, two noisy readings at two threads on
# a loaded machine settled attention at B=32 on chunks of 2 (3.3x brute force), where
# chunks of 16-32 are 5x faster than 4. A remainder under a quarter of a
# chunk joins it (no sweep for a few samples). Measured on a loaded two-core
# machine, B=32: one thread ~8 ms per sample at chunks of 8, 9-11 ms at 16-32; two
# threads 1.0-1.2 s at 16-32 against 5.1 s at 4 (hand-offs per op). The state
# lives with the trace, per method and thread count, so later calls on the same
# shapes start from it. Chunks stay within the memory budget and SWEEP_CHUNK_BYTES
# (in the units of NOTE [memory estimate from the sweep], about 4x the real use).
# The chunking never changes a value: every sample is swept the same way.
SWEEP_SLOWER = 1.1
SWEEP_MISSES = 2
SWEEP_CHUNK_BYTES = 2 * 1024**3


@dataclass
class ChunkTuner:
    """The chunk size of a trace's sweeps (NOTE [sweep chunks])."""

    size: int = 1  # the best chunk measured so far
    seconds: float = math.inf  # its time per sample
    misses: int = 0  # larger chunks in a row that were clearly slower

    def next(self, cap: int, floor: int) -> int:
        """The chunk to run next: at most ``cap``, at least ``floor`` while exploring."""
        settled = self.misses >= SWEEP_MISSES
        want = self.size if settled else max(floor, 2 * self.size)
        return max(1, min(cap, want))

    def record(self, size: int, seconds: float) -> None:
        per = seconds / size
        if size == self.size:
            self.seconds = min(self.seconds, per)
        elif size > self.size:  # a smaller chunk (a batch's remainder) says nothing
            if per <= SWEEP_SLOWER * self.seconds:
                self.size, self.seconds, self.misses = size, per, 0
            else:
                self.misses += 1


class PreferBruteForce(Exception):  # noqa: N818 - a decision, not an error
    """The cost model chose the basis products (NOTE [cost model])."""


class CurvpropFallbackWarning(UserWarning):
    """Curvature propagation could not handle the model; a slower exact path was used."""


@dataclass
class Traced:
    """A model and loss traced on one sample (or on the whole batch, see ``per_sample``)."""

    names: list[str]
    others: list[str]  # buffers and parameters that are not differentiated
    model: Plan
    loss: Plan
    scale: float  # total loss = scale * sum of the per-sample losses
    per_sample: bool  # False: the loss does not split over samples (the batch is one unit)
    sample_bytes: dict[str, int] = field(default_factory=dict)  # per method, measured once
    loss_state: list[torch.Tensor] = field(default_factory=list)  # the loss's buffers (weights)
    brute_force: bool = False  # NOTE [cost model] chose the basis products for this trace
    tuners: dict[tuple[str, int], ChunkTuner] = field(default_factory=dict)

    def chunking(self, method: str) -> ChunkTuner:
        """This trace's chunk tuner for ``method`` at the current thread count."""
        return self.tuners.setdefault((method, torch.get_num_threads()), ChunkTuner())


def by_sample(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Targets grouped by input sample: ``(B, R, ...)``, row ``b`` the targets of sample ``b``.

    ``R = 1`` when targets and inputs share the batch dimension; ``R = T`` for token
    outputs flattened to ``(B*T, V)`` with ``(B*T,)`` targets. ``None`` if the
    targets do not divide into ``B`` equal groups.
    """
    b, m = inputs.shape[0], targets.shape[0]
    if m % b:
        return None
    return targets.reshape(b, m // b, *targets.shape[1:])


def _split_scale(model, loss_fn, params, inputs, targets) -> float | None:
    """The ``c`` with ``loss(batch) == c * sum_b loss(sample b)``, or None if there is none.

    Sample ``b`` is input ``b`` with its group of targets (:func:`by_sample`).
    """
    n = inputs.shape[0]
    grouped = by_sample(inputs, targets)
    if grouped is None:
        return None

    def total(p):
        return loss_fn(functional_call(model, {**_others(model, p), **p}, (inputs,)), targets)

    def one(p, x, y):
        return loss_fn(functional_call(model, {**_others(model, p), **p}, (x[None],)), y)

    def summed(p):
        try:  # vectorised over the samples ...
            return vmap(one, in_dims=(None, 0, 0))(p, inputs, grouped).sum()
        except Exception:  # noqa: BLE001 - ... or one by one where vmap cannot run the model
            return torch.stack([one(p, x, y) for x, y in zip(inputs, grouped)]).sum()

    try:
        with math_attention():  # NOTE [math attention]
            whole, g_whole = total(params).detach(), grad(total)(params)
            each, g_sum = summed(params).detach(), grad(summed)(params)
    except Exception:  # noqa: BLE001 - a model that cannot run per sample is one unit
        return None
    tol = 1e3 * torch.finfo(whole.dtype).eps  # rounding of a batch sum, not a real mismatch

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool((a - b).norm() <= tol * (a.norm() + b.norm()) + torch.finfo(a.dtype).tiny)

    for c in (1.0, 1.0 / n):
        if close(whole, c * each) and all(close(g_whole[k], c * g_sum[k]) for k in g_whole):
            return c
    return None


# NOTE [trace cache]
# Tracing costs a few tenths of a second, more than the propagation itself on an MLP,
# so a trace is kept per model (weakly) and reused when the loss object, the names,
# shapes and dtypes of parameters and buffers, the input and target shapes and the
# train/eval flags all match. Parameters and buffers enter the graph as inputs, so
# new values never make a trace stale; only a change to the Python code of
# ``forward`` (or to state it branches on outside these keys) would.
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _trace_key(model, loss_fn, params, inputs, targets) -> tuple:
    state = [(k, v.shape, v.dtype) for k, v in params.items()]
    state += [(k, v.shape, v.dtype) for k, v in _others(model, params).items()]
    return (
        id(loss_fn),
        getattr(loss_fn, "reduction", None),
        tuple(state),
        (inputs.shape, inputs.dtype, inputs.device),
        (targets.shape, targets.dtype),
        tuple(m.training for m in model.modules()),
        tuple(
            (k, v)
            for k, v in sorted(vars(loss_fn).items())
            if isinstance(v, (int, float, str, bool, type(None)))
        ),
    )


def _others(model: nn.Module, params: dict) -> dict[str, torch.Tensor]:
    """Buffers and the parameters not differentiated: inputs of the graph, not constants."""
    out = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    # Copies: a traced in-place update (BatchNorm in train mode) never touches the model.
    out.update({k: v.detach().clone() for k, v in model.named_buffers() if k not in params})
    return out


def prepare(call: str, model, loss_fn, params, inputs, targets) -> Traced:
    """Trace ``loss_fn(model(x), y)`` for curvature propagation (raises UnsupportedGraph)."""
    try:
        key = _trace_key(model, loss_fn, params, inputs, targets)
        entry = _TRACES.get(model, {}).get(key)
    except TypeError:  # unhashable state: no caching
        key, entry = None, None
    if entry is not None and entry[0] is loss_fn:
        return entry[1]
    names = list(params)
    others = _others(model, params)
    scale = _split_scale(model, loss_fn, params, inputs, targets) if inputs.shape[0] > 1 else 1.0
    per_sample = scale is not None
    x0, y0 = (inputs[:1], by_sample(inputs, targets)[0]) if per_sample else (inputs, targets)
    onames = list(others)

    def model_fn(plist, olist, x):
        state = dict(zip(names, plist))
        state.update(zip(onames, olist))
        return functional_call(model, state, (x,))

    plist = [params[k] for k in names]
    olist = [others[k] for k in onames]
    with torch.no_grad():
        out0 = model_fn(plist, olist, x0)
    if not isinstance(out0, torch.Tensor):
        raise UnsupportedGraph(f"the model returned {describe(out0)}, not one tensor")
    gm_m = trace(model_fn, plist, olist, x0)
    # A loss module's tensors (class weights) enter its graph as inputs, like buffers.
    lstate = dict(loss_fn.named_buffers()) if isinstance(loss_fn, nn.Module) else {}
    lnames = list(lstate)

    def loss_of(out, y, *state):
        if not lnames:
            return loss_fn(out, y)
        return functional_call(loss_fn, dict(zip(lnames, state)), (out, y))

    gm_l = trace(loss_of, out0, y0, *lstate.values())
    mplan = plan(gm_m, list(range(len(names))))
    lplan = plan(gm_l, [0])
    tr = Traced(names, onames, mplan, lplan, 1.0 if scale is None else scale, per_sample)
    tr.loss_state = [t.detach() for t in lstate.values()]
    if key is not None:
        # The entry holds loss_fn itself, so its id cannot be reused while cached.
        _TRACES.setdefault(model, {})[key] = (loss_fn, tr)
    return tr


@dataclass
class Layout:
    """How one sample's row is laid out: dense diagonals, then factored sink terms."""

    dense: list[int]  # parameter positions with a dense per-sample diagonal
    terms: list[tuple[int, list, bool, float, str, list[torch.Size]]]
    made_bytes: int = 0  # NOTE [memory estimate from the sweep]
    value_bytes: int = 0  # the model graph's node values (NOTE [cost model])


def sample_row(tr: Traced, method: str, plist, olist, x, y, holder: list) -> torch.Tensor:
    """One unit's curvature as a flat row; its :class:`Layout` is stored in ``holder``."""
    prop = Propagation()
    run_m = prop.forward(tr.model, [*plist, *olist, x])
    out = run_m["env"][tr.model.output]
    run_l = prop.forward(tr.loss, [out, y, *tr.loss_state])
    seed = torch.ones_like(run_l["env"][tr.loss.output])
    g_l, c_l, _ = prop.backward(run_l, seed, None, prune=False)
    ph = tr.loss.placeholders[0]
    g_out = g_l[ph] if g_l[ph] is not None else torch.zeros_like(out)
    if method == "exact":
        _, cols, terms = prop.backward(run_m, g_out, c_l[ph], prune=True)
        diags = [diagonal_from_cols(prop, cols[leaf]) for leaf in tr.model.placeholders]
        diags = diags[: len(plist)]
    else:
        from hesse.curvprop._diagonal_only import propagate_diagonal

        d_out = diagonal_from_cols(prop, c_l[ph])
        if d_out is None:
            d_out = torch.zeros_like(out)
        diags, terms = propagate_diagonal(run_m, g_out, d_out)
        # One diagonal per node, like the gradients (NOTE [memory estimate from the sweep]).
        prop.made_bytes += sum(_nbytes(v) for v in run_m["env"].values())
    dense = [i for i in range(len(plist)) if diags[i] is not None]
    layout = Layout(dense, [])
    pieces = [diags[i].reshape(-1) for i in dense]
    for t in terms:
        index, chain = sink_chain(tr.model, t.leaf)
        layout.terms.append((index, chain, t.left, t.scale, t.kind, [q.shape for q in t.parts]))
        pieces.extend(q.reshape(-1) for q in t.parts)
    layout.made_bytes = prop.made_bytes + sum(_nbytes(q) for q in pieces)
    layout.value_bytes = sum(_nbytes(v) for v in run_m["env"].values())
    holder[:] = [layout]
    return torch.cat(pieces) if pieces else out.new_zeros(1)


def assemble(
    tr: Traced, layout: Layout, rows: torch.Tensor, plist, *, per_sample: bool
) -> torch.Tensor:
    """Turn ``(B, r)`` rows into ``(B, n)`` per-sample diagonals or the summed ``(n,)``."""
    b = rows.shape[0]
    lead = (b,) if per_sample else ()
    # One output, written through per-parameter views: no per-parameter zeros and
    # no concatenating copy of a (B, n) result (NOTE [per-sample]).
    numels = [p.numel() for p in plist]
    flat = rows.new_empty((*lead, sum(numels)))
    starts = [0]
    for k in numels:
        starts.append(starts[-1] + k)
    diags = [flat[..., a:e].view(*lead, *p.shape) for a, e, p in zip(starts, starts[1:], plist)]
    written = [False] * len(plist)
    off = 0

    def take(shape):
        nonlocal off
        size = math.prod(shape)
        piece = rows[:, off : off + size].reshape(b, *shape)
        off += size
        return piece

    def put(i: int, value: torch.Tensor) -> None:
        if written[i]:
            diags[i] += value
        else:
            diags[i].copy_(value)
            written[i] = True

    for i in layout.dense:
        piece = take(plist[i].shape)
        put(i, piece if per_sample else piece.sum(0))
    for index, chain, left, scale, kind, shapes in layout.terms:
        sq = assemble_term(kind, tuple(take(sh) for sh in shapes), per_sample)
        if left:
            sq = sq.transpose(-1, -2)
        put(index, _through_chain(chain, plist[index], sq * scale, per_sample))
    for i, done in enumerate(written):
        if not done:
            diags[i].zero_()
    return flat.mul_(tr.scale) if tr.scale != 1 else flat


def _through_chain(chain, param: torch.Tensor, sq: torch.Tensor, per_sample: bool):
    """Map a square from the sink node back to the parameter (rearrangements only)."""
    if not chain:
        return sq

    def f(p):
        env = {chain[0].leaves[chain[0].active[0]]: p}
        for ni in chain:
            env[ni.node] = ni.call(env)
        return env[chain[-1].node]

    _, pull = vjp(f, param)
    if per_sample:
        return vmap(lambda s: pull(s)[0])(sq)
    return pull(sq)[0]


def diagonals(
    call: str,
    tr: Traced,
    method: str,
    plist: list[torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    olist: list[torch.Tensor],
    per_sample: bool,
    chunk_size: int | None = None,
    may_switch: bool = False,
) -> torch.Tensor:
    """``(B, n)`` per-sample diagonals, or the ``(n,)`` diagonal of the batch loss.

    ``may_switch``: raise :class:`PreferBruteForce` where NOTE [cost model] says the
    basis products are cheaper.
    """
    holder: list = []
    if may_switch and tr.brute_force:
        raise PreferBruteForce
    if not tr.per_sample:
        row = sample_row(tr, method, plist, olist, inputs, targets, holder)[None]
        return assemble(tr, holder[0], row, plist, per_sample=per_sample)

    grouped = by_sample(inputs, targets)

    def single(i: torch.Tensor) -> torch.Tensor:
        return sample_row(tr, method, plist, olist, inputs[i][None], grouped[i], holder)

    def batched(idx: torch.Tensor) -> torch.Tensor:
        return vmap(lambda x, y: sample_row(tr, method, plist, olist, x[None], y, holder))(
            inputs[idx], grouped[idx]
        )

    b = inputs.shape[0]
    rows = lambda s, e: torch.arange(s, e, device=inputs.device)  # noqa: E731
    clock = time.process_time if inputs.device.type == "cpu" else time.perf_counter
    done, out = 0, None
    tuner = None if chunk_size is not None else tr.chunking(method)
    if method not in tr.sample_bytes:
        # The first sample of a new trace runs alone: it surfaces an unsupported op
        # before any vmap fallback could hide it, and its sweep counts one sample's
        # memory in passing (NOTE [memory estimate from the sweep]).
        start = clock()
        head = batched(rows(0, 1))
        if tuner is not None:
            tuner.record(1, clock() - start)
        tr.sample_bytes[method] = SWEEP_OVERHEAD * holder[0].made_bytes
        n = sum(p.numel() for p in plist)
        if method == "exact" and holder[0].made_bytes > BRUTE_FORCE_MARGIN * n * max(
            1, holder[0].value_bytes
        ):
            tr.brute_force = True
            if may_switch:
                raise PreferBruteForce
        out = head.new_empty((b, head.shape[1]))
        out[:1] = head
        done = 1
    if done == b:
        return assemble(tr, holder[0], out, plist, per_sample=per_sample)
    # NOTE [sweep chunks]: chunk sizes from measured time, within the memory budget.
    budget = default_memory_budget(inputs.device)
    sizing = dict(rows=b - done, per_row_bytes=tr.sample_bytes[method], fixed_bytes=0)
    floor = chunk_size_for(**sizing, budget=budget)  # cache-sized (NOTE [when to split])
    cap = chunk_size_for(**sizing, budget=min(budget, SWEEP_CHUNK_BYTES), split=False)
    while done < b:
        c = min(chunk_size or tuner.next(cap, floor), b - done)
        if tuner is not None and b - done <= min(cap, c + c // 4):
            c = b - done  # the remainder joins this chunk
        start = clock()
        part = map_chunks(
            batched,
            single,
            c,
            lambda s, e, d=done: rows(d + s, d + e),
            chunk_size=c,
            call=call,
            out=None if out is None else out[done : done + c],
        )
        if tuner is not None:
            tuner.record(c, clock() - start)
        if out is None:
            out = part.new_empty((b, part.shape[1]))
            out[:c] = part
        done += c
    return assemble(tr, holder[0], out, plist, per_sample=per_sample)


def _brute_force(call, model, loss_fn, params, inputs, targets, per_sample: bool):
    """The exact diagonal from one HVP per parameter (per sample, or for the batch loss)."""
    from hesse._hvp import FlatHVP, basis_rows, tensor_rows

    def loss(p, x, y):
        return loss_fn(functional_call(model, {**_others(model, p), **p}, (x,)), y)

    def diagonal(x, y) -> torch.Tensor:
        op = FlatHVP(loss, (dict(params), x, y), 0, call=call)
        n = op.n

        def products(r: torch.Tensor) -> torch.Tensor:  # (H e_i)_i for a chunk of e_i
            return (op.apply(r.shape[0], tensor_rows(r)) * r).sum(1)

        chunk = max(1, min(n, 2**22 // max(1, n)))  # about 32 MiB of float64 basis rows
        return map_chunks(products, None, n, basis_rows(n, op.x), chunk_size=chunk, call=call)

    if not per_sample:
        return diagonal(inputs, targets)
    scale = _split_scale(model, loss_fn, params, inputs, targets)
    if scale is None:
        _not_split(call)
    grouped = by_sample(inputs, targets)
    rows = [diagonal(inputs[i : i + 1], grouped[i]) * scale for i in range(len(inputs))]
    return torch.stack(rows)


def _not_split(call: str):
    fail(
        call,
        "the loss does not split into per-sample terms (loss(batch) is neither the sum "
        "nor the mean of the per-sample losses, e.g. BatchNorm in train mode or a "
        "weighted mean), so per-sample diagonals are not defined. Use "
        "hesse.diagonal(hesse.HessianOperator(...), method='exact') for the batch.",
        NotImplementedError,
    )


def per_sample_diagonal(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    params: dict[str, torch.Tensor] | None = None,
    method: str = "exact",
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample Hessian (or GGN) diagonals of ``loss_fn(model(inputs), targets)``.

    The loss is split into its per-sample terms, ``L = c * sum_b loss(model(x_b), y_b)``
    (``c = 1/B`` for ``reduction="mean"``, 1 for ``"sum"``; detected, not assumed),
    and for every sample ``b`` the diagonal of ``c * Hessian of loss_b`` with respect
    to the parameters is returned; summed over ``b`` it is the diagonal of the
    Hessian of ``L`` (BackPACK's ``BatchDiagHessian`` and ``DiagHessian``).

    .. math::

        \\operatorname{diag}\\nabla^2_\\theta \\ell_b
        = \\sum_n \\sum_c s_c\\,(J_n^\\top u_c)^2

    where ``R_n = sum_c s_c u_c u_c^T`` factorises the residual curvature of node
    ``n`` of the traced ATen graph (see :mod:`hesse.curvprop`).

    Methods:
        - ``"exact"``: the exact diagonal, for any model that traces (residual
          connections, LayerNorm, attention, weights used twice). A model that does
          not trace falls back to ``n`` Hessian-vector products per sample, with a
          :class:`CurvpropFallbackWarning` naming the cause.
        - ``"becker-lecun"``: the diagonal-only recursion of Becker & LeCun (1989) in
          the form of HesScale (Elsayed & Mahmood, 2022): only diagonals travel
          backwards, ``d_in = (J o J)^T d_out + diag(R)``, starting from the exact
          diagonal of the loss Hessian with respect to the model output (so the last
          layer is exact). An approximation that drops every off-diagonal coupling
          and can be uninformative: relative error 0.11 on a small tanh MLP but
          1.2-1.5 (negative cosine similarity) on tiny GPT-2 and ViT models, see
          :func:`hesse.diagonal`.
        - ``"ggn"``: the exact per-sample diagonal of the generalised Gauss-Newton
          matrix instead of the Hessian, ``c * diag(J_b^T H_b J_b)`` with ``H_b`` the
          Hessian of sample ``b``'s loss with respect to its outputs (BackPACK's
          ``BatchDiagGGNExact``): ``sum_k (J_b^T s_bk)^2`` over the columns of
          ``H_b = S_b S_b^T``, the squares that ``hesse.diagonal(GGNOperator, method=
          "exact")`` sums over the samples. Needs a loss with a known output Hessian
          (see :class:`hesse.GGNOperator`).
        - ``"ggn-mc"``: one Monte-Carlo column per sample, ``c * (J_b^T s_b)^2`` with
          ``s_b`` an output gradient at a label sampled from the model's predictive
          distribution (``E[s_b s_b^T] = H_b``; BackPACK's ``BatchDiagGGNMC``), drawn
          from ``generator``; the sum over samples is ``hesse.diagonal(GGNOperator,
          method="mc")`` for the same generator.

    Args:
        model: an ``nn.Module`` mapping ``inputs`` (batch first) to one tensor.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar.
        inputs: ``(B, ...)`` batch of inputs.
        targets: ``(B, ...)`` batch of targets, or ``(B*T, ...)`` for outputs flattened
            to tokens (rows ``b*T`` to ``b*T + T - 1`` belong to sample ``b``).
        params: the parameters to differentiate (name -> tensor); default: every
            parameter of ``model`` that requires grad.
        method: ``"exact"``, ``"becker-lecun"``, ``"ggn"`` or ``"ggn-mc"``.
        chunk_size: samples per vectorised pass; default chosen from measured time
            within the memory budget (NOTE [sweep chunks]).
        generator: the source of the sampled labels of ``"ggn-mc"`` (default: a
            generator seeded with 0); unused by the other methods.

    Returns:
        dict name -> ``(B, *param.shape)`` per-sample diagonals.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, an input is not a tensor, or
            ``generator`` is not a ``torch.Generator``.
        ValueError: unknown ``method``, or ``inputs`` and ``targets`` disagree in batch size.
        NotImplementedError: the loss does not split over samples,
            ``"becker-lecun"`` is asked for a model that does not trace, or
            ``"ggn"``/``"ggn-mc"`` for a loss without a closed-form output Hessian.

    Cost:
        One forward and one backward sweep per sample carrying ``K`` columns, where
        ``K`` is the output dimension plus the sizes of the nonlinear nodes upstream
        (BackPACK's count for an MLP), capped at a few columns per element at small
        nodes where they are refactored (NOTE [column compression] in
        ``hesse.curvprop._exact``). Memory ``O(K x activations)`` per sample in a
        chunk. The brute-force fallback costs ``n`` HVPs per sample. ``"ggn"``: one
        forward pass and one backward pass batched over the ``K`` columns of the
        output Hessian's factor (``K = 1`` for ``"ggn-mc"``), with per-sample squares
        in closed form for ``nn.Linear`` and ``nn.Conv2d`` layers (NOTE [linear fast
        path] in ``hesse/operators/_squares.py``); outputs that couple samples
        (tokens flattened to ``(B*T, V)``, BatchNorm in train mode) cost ``K`` VJPs
        per output row. ``"exact"`` and ``"ggn"`` on an ``nn.Sequential`` chain of
        ``nn.Linear``/``nn.Conv2d`` layers and activations with ``nn.CrossEntropyLoss``
        skip tracing and autograd: one hand-written sweep per layer (NOTE [chain fast
        path] in ``hesse/curvprop/_chain.py``). Each parameter's diagonals are their
        own tensor (NOTE [per-parameter results]).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import hesse
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> d = hesse.per_sample_diagonal(net, nn.CrossEntropyLoss(), x, y)
        >>> d["0.weight"].shape
        torch.Size([5, 4, 3])

    References:
        Becker, S. and LeCun, Y. (1989). Improving the convergence of back-propagation
        learning with second order methods.
        Mizutani, E. and Dreyfus, S. E. (2008). Second-order stagewise backpropagation
        for Hessian-matrix analyses and investigation of negative curvature.
        Dangel, F., Kunstner, F. and Hennig, P. (2020). BackPACK: Packing more into
        backprop. ICLR.
        Elsayed, M. and Mahmood, A. R. (2022). HesScale: Scalable computation of
        Hessian diagonals.
    """
    call = "hesse.per_sample_diagonal(model, loss_fn, inputs, targets)"
    params = check_model_inputs(call, model, inputs, targets, params)
    check_choice(call, "method", method, METHODS + GGN_METHODS)
    check_chunk_size(call, chunk_size)
    check_generator(call, generator)
    b = inputs.shape[0]
    detached = {k: v.detach() for k, v in params.items()}
    fast = _chain_fast(call, method, model, loss_fn, detached, inputs, targets, True)
    if fast is not None:  # NOTE [per-parameter results]
        return {k: v.view(b, *params[k].shape) for k, v in fast.items()}
    if method in GGN_METHODS:
        return _per_sample_ggn(
            call, model, loss_fn, params, inputs, targets, method, generator, chunk_size
        )
    rows = batch_diagonal(
        call,
        model,
        loss_fn,
        params,
        inputs,
        targets,
        method=method,
        per_sample=True,
        chunk_size=chunk_size,
    )
    names = list(params)
    shapes = [params[k].shape for k in names]
    pieces = torch.split(rows, [s.numel() for s in shapes], dim=1)
    return {k: p.reshape(rows.shape[0], *s) for k, p, s in zip(names, pieces, shapes)}


def _per_sample_ggn(
    call, model, loss_fn, params, inputs, targets, method, generator, chunk_size
) -> dict[str, torch.Tensor]:
    """``per_sample_diagonal``'s ``"ggn"`` and ``"ggn-mc"``: per-row factor squares.

    A :class:`hesse.GGNOperator` over the one batch gives the factor ``S`` and the
    squares ``(J_n^T s_nk)^2`` of each output row ``n`` (its count ``M`` the
    normalisation of a mean, NOTE [loss normalisation]); rows ``b*T`` to ``b*T + T - 1`` are summed into sample ``b``.
    """
    from hesse.estimators._diagonal import _sampler  # noqa: PLC0415 - import cycle
    from hesse.operators._losses import PlainLoss, output_curvature  # noqa: PLC0415
    from hesse.operators._model import GGNOperator  # noqa: PLC0415 - import cycle
    from hesse.operators._squares import batch_factor_squares  # noqa: PLC0415

    if isinstance(output_curvature(call, loss_fn, required=False), PlainLoss):
        fail(
            call,
            f"method={method!r} needs a loss whose output Hessian is known in closed form "
            "(nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.BCELoss), got "
            f"loss_fn of type {type(loss_fn).__name__}. Pass one of those modules, or build "
            "hesse.GGNOperator(..., output_hessian=fn) for the batch GGN.",
            NotImplementedError,
        )
    op = GGNOperator(model, loss_fn, [(inputs, targets)], params=params)
    sampled = op._factor if method == "ggn" else _sampler(op, call, generator, 1)
    # The mean's 1/M goes into the factor (sqrt), not over the (B, n) result afterwards.
    root = math.sqrt(1.0 / op._count(inputs, targets)) if op.reduction == "mean" else 1.0

    def factor(index: int, output: torch.Tensor, targets: Any) -> torch.Tensor:
        S = sampled(index, output, targets)
        return S * root if root != 1.0 else S

    # NOTE [trace cache]: the layer plan and the row check of NOTE [linear fast path]
    # and NOTE [coupled rows] are kept per model under the same key as a trace.
    try:
        key = ("ggn", _trace_key(model, loss_fn, params, inputs, targets))
        entry = _TRACES.get(model, {}).get(key)
    except TypeError:  # unhashable state: no caching
        key, entry = None, None
    if entry is not None and entry[0] is loss_fn:
        op._linear_plan, op._rows_per_sample = entry[1]
    rows = batch_factor_squares(
        op,
        factor,
        0,
        inputs,
        targets,
        chunk_size=chunk_size,
        keep="sample",
        verify=op._linear_plan is None,
    )
    if key is not None:
        _TRACES.setdefault(model, {})[key] = (loss_fn, (op._linear_plan, op._rows_per_sample))
    b, n = inputs.shape[0], rows.shape[1]
    if rows.shape[0] % b:
        fail(
            call,
            f"method={method!r} needs model outputs whose rows split evenly over the "
            f"{b} samples (B or B*T rows), got {rows.shape[0]} rows. Reshape the "
            "outputs to (B, ...) or (B*T, ...).",
            NotImplementedError,
        )
    if rows.shape[0] != b:
        rows = rows.reshape(b, -1, n).sum(1)
    pieces = torch.split(rows, list(op.layout.numels), dim=1)
    shapes = [params[k].shape for k in op.param_names]
    return {k: p.reshape(b, *s) for k, p, s in zip(op.param_names, pieces, shapes)}


def batch_diagonal(
    call: str,
    model,
    loss_fn,
    params: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    method: str,
    per_sample: bool,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Flat diagonal of ``loss_fn(model(inputs), targets)``: ``(n,)``, or ``(B, n)`` per sample.

    Parameters are flattened in the order of ``params``. Falls back to brute-force
    HVPs (exact) with a :class:`CurvpropFallbackWarning` when the model does not trace.
    """
    params = {k: v.detach() for k, v in params.items()}
    fast = _chain_fast(call, method, model, loss_fn, params, inputs, targets, per_sample)
    if fast is not None:
        return torch.cat(list(fast.values()), 1) if per_sample else fast
    try:
        tr = prepare(call, model, loss_fn, params, inputs, targets)
        if per_sample and not tr.per_sample:
            _not_split(call)
        plist = [params[k] for k in tr.names]
        others = _others(model, params)
        olist = [others[k] for k in tr.others]
        return diagonals(
            call,
            tr,
            method,
            plist,
            inputs,
            targets,
            olist=olist,
            per_sample=per_sample,
            chunk_size=chunk_size,
        )
    except UnsupportedGraph as err:
        if method != "exact":
            fail(
                call,
                f"method={method!r} needs a traceable model, but {err}. Use method='exact' "
                "(which falls back to Hessian-vector products) or make the model traceable "
                "with torch.fx's make_fx.",
                NotImplementedError,
            )
        warnings.warn(
            f"{call}: curvature propagation is not available ({err}); falling back to the "
            "brute-force exact diagonal (one Hessian-vector product per parameter).",
            CurvpropFallbackWarning,
            stacklevel=3,
        )
        return _brute_force(call, model, loss_fn, params, inputs, targets, per_sample)


def _chain_fast(call, method, model, loss_fn, params, inputs, targets, per_sample):
    """The exact diagonal (``"exact"``) or GGN diagonal (``"ggn"``) by NOTE [chain fast
    path]: ``(n,)``, per sample a dict name -> ``(B, numel)``; ``None`` where it does not
    apply."""
    if method not in ("exact", "ggn"):
        return None
    layers = chain_plan(model, loss_fn, params, inputs, targets)
    if layers is None:
        return None
    return chain_diagonal(
        layers, list(params), params, inputs, targets, loss_fn.reduction,
        per_sample=per_sample, residuals=method == "exact", call=call,
    )  # fmt: skip


def check_model_inputs(call, model, inputs, targets, params) -> dict[str, torch.Tensor]:
    if not isinstance(model, nn.Module):
        fail(call, f"expected model to be a torch.nn.Module, got {describe(model)}.", TypeError)
    for what, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            fail(call, f"expected {what} to be a tensor, got {describe(t)}.", TypeError)
    if inputs.dim() == 0 or targets.dim() == 0 or targets.shape[0] % inputs.shape[0]:
        fail(
            call,
            f"expected targets whose leading dimension is the inputs' batch size B (or a "
            f"multiple of it, B*T for token outputs flattened to (B*T, V)), got shapes "
            f"{tuple(inputs.shape)} and {tuple(targets.shape)}.",
        )
    if params is None:
        params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    if not isinstance(params, dict) or not params:
        fail(
            call,
            f"expected params to be a non-empty dict of name -> tensor, got {describe(params)}. "
            "Pass params=dict(model.named_parameters()) or a subset of it.",
            TypeError,
        )
    from hesse._validation import check_differentiable_leaves

    check_differentiable_leaves(call, params, "parameters")
    return params


def operator_diagonal(method: str, fallback: Callable | None = None) -> Callable:
    """The ``hesse.diagonal(op, method=method)`` implementation for ``HessianOperator``.

    Each batch's loss goes through curvature propagation; the batch diagonals are
    aggregated exactly like the operator's products (NOTE [aggregation] in
    ``hesse.operators._model``). If a batch cannot be propagated (the model does
    not trace, has several inputs, or holds an op without a rule), ``fallback``
    (the brute-force basis products) is used for the whole operator, with a
    :class:`CurvpropFallbackWarning` naming the cause; without a fallback
    (``"becker-lecun"``) that is an error. Where the cost model (NOTE [cost model])
    estimates the basis products to be cheaper, they are used without a warning.
    """

    def run(op, *, chunk_size: int | None, call: str, **_: Any) -> torch.Tensor:
        params = op.layout.unflatten(op._x)

        def per_batch(index: int, inputs: Any, targets: Any) -> torch.Tensor:
            if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
                raise UnsupportedGraph(
                    "curvature propagation takes one input tensor and one target tensor per "
                    f"batch, got {describe(inputs)} and {describe(targets)}"
                )
            flat = _chain_fast(call, method, op.model, op.loss_fn, params, inputs, targets, False)
            if flat is not None:  # NOTE [aggregation]: batch contributions are in sum form.
                return flat * op._count(inputs, targets) if op.reduction == "mean" else flat
            tr = prepare(call, op.model, op.loss_fn, params, inputs, targets)
            plist = [params[k] for k in tr.names]
            others = _others(op.model, params)
            flat = diagonals(
                call,
                tr,
                method,
                plist,
                inputs,
                targets,
                olist=[others[k] for k in tr.others],
                per_sample=False,
                chunk_size=chunk_size,
                may_switch=fallback is not None,
            )
            # NOTE [aggregation]: batch contributions are in sum form.
            return flat * op._count(inputs, targets) if op.reduction == "mean" else flat

        try:
            return op._accumulate(per_batch)
        except PreferBruteForce:  # NOTE [cost model]: same values, fewer seconds
            assert fallback is not None
            return fallback(op, chunk_size=chunk_size, call=call)
        except UnsupportedGraph as err:
            if fallback is None:
                fail(
                    call,
                    f"method={method!r} needs a model that curvature propagation can trace, "
                    f"but {err}. Use method='exact' (which falls back to Hessian-vector "
                    "products) or 'hutchinson'.",
                    NotImplementedError,
                )
            warnings.warn(
                f"{call}: curvature propagation is not available ({err}); falling back to "
                f"{op.shape[0]} Hessian-vector products with basis vectors.",
                CurvpropFallbackWarning,
                stacklevel=3,
            )
            return fallback(op, chunk_size=chunk_size, call=call)

    run.__name__ = f"curvprop_{method.replace('-', '_')}"
    return run
