"""Sparse Hessians and Jacobians: detect the pattern, colour it, compress, decompress.

# NOTE [sparse pipeline]
1. *Detect*: trace ``f`` to ATen ops and propagate boolean patterns
   (:mod:`hesse.sparsity`); the pattern holds for every input value.
2. *Colour*: group columns so that few products recover every entry
   (:mod:`hesse.sparsity._coloring`): an acyclic (or star) colouring for the full
   Hessian (NOTE [colouring choice]), a distance-1 colouring for its diagonal, a column
   (or row) colouring for a Jacobian.
3. *Evaluate*: one batched, chunked pass of Hessian-vector products with the
   colour seeds (:class:`hesse._hvp.FlatHVP`), or JVPs/VJPs for a Jacobian
   (:func:`hesse._chunking.map_chunks`).
4. *Recover*: by substitution along two-coloured trees (acyclic, NOTE [substitution])
   or read directly (star, distance-1, Jacobians), with a precomputed plan
   (:mod:`hesse.sparsity._recovery`).

A pattern can be computed once (``hessian_sparsity``) and passed back with
``pattern=``: the transform is then a prepared evaluator (NOTE [prepared reuse]).
Detected patterns are cached per function and signature (NOTE [pattern cache]).
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.func import jvp, vjp, vmap
from torch.utils._pytree import tree_leaves

from hesse._chunking import chunk_size_for, default_memory_budget, map_chunks
from hesse._flat import Flat, FlatArgs
from hesse._hvp import FlatHVP, basis_rows
from hesse._validation import (
    call_form,
    check_choice,
    check_chunk_size,
    describe,
    fail,
)
from hesse.sparsity import _recovery
from hesse.sparsity._coloring import (
    Coloring,
    acyclic_coloring,
    bicoloring,
    derived,
    diagonal_coloring,
    one_sided,
    release,
    star_coloring,
    star_probe,
    symmetric,
)
from hesse.sparsity._kernels import JIT_EDGES
from hesse.sparsity._maps import PatternTooLarge
from hesse.sparsity._prepared import Prepared, clock, entries
from hesse.sparsity._propagate import Propagation
from hesse.sparsity._recovery import (
    Plan,
    dense_plan,
    star_plan,
    substitution_plan,
)
from hesse.sparsity._tracing import trace


class SparsityFallbackWarning(UserWarning):
    """``method="auto"`` could not detect a sparsity pattern and used the dense path."""


# -- patterns: torch <-> scipy ----------------------------------------------------------


def _to_torch(P: sp.spmatrix) -> torch.Tensor:
    coo = sp.coo_matrix(P)
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    vals = torch.ones(coo.nnz, dtype=torch.bool)
    return torch.sparse_coo_tensor(idx, vals, coo.shape, check_invariants=False).coalesce()


def _from_torch(call: str, pattern: Any, shape: tuple[int, int]) -> sp.csr_matrix:
    """Validate a user pattern: a dense tensor (its nonzeros) or a sparse one (its stored
    entries, e.g. the result of a sparse transform, whose zeros at one point stay in)."""
    if not isinstance(pattern, torch.Tensor):
        fail(
            call,
            f"expected pattern to be a tensor of shape {shape} (e.g. from "
            f"hesse.hessian_sparsity), got {describe(pattern)}.",
            TypeError,
        )
    if tuple(pattern.shape) != shape:
        fail(
            call,
            f"expected pattern of shape {shape} (for this argument), got "
            f"{tuple(pattern.shape)}. Compute it for the same argument shapes, e.g. with "
            "hesse.hessian_sparsity(f, argnums)(*args).",
        )
    t = pattern.detach().cpu()
    if t.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        t = t.to_sparse_coo()
    if t.layout == torch.sparse_coo:
        # every stored entry is structural (a stored 0.0 may be a zero at one point only),
        # except an explicit False of a boolean pattern
        t = t.coalesce()
        idx = t.indices().numpy()
        vals = t.values()
        keep = vals.numpy() if vals.dtype == torch.bool else np.ones(len(vals), dtype=bool)
        rows, cols = idx[0][keep], idx[1][keep]
    else:
        rows, cols = np.nonzero((t != 0).numpy())
    P = sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=shape, dtype=bool)
    P.sum_duplicates()
    return P


# -- problems -------------------------------------------------------------------------


@dataclass
class _Vector:
    """A (possibly vector-valued) ``f`` as a function of one flat vector."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    flat: Flat
    m: int


def _vector_problem(f: Callable, args: tuple, argnums: Any, call: str) -> _Vector:
    inputs = FlatArgs.of(call, args, argnums)
    flat, x = inputs.flat, inputs.x()

    def fn(v: torch.Tensor) -> torch.Tensor:
        out = inputs.call(f, v)
        if not isinstance(out, torch.Tensor):
            fail(call, f"expected f to return a tensor, got {describe(out)}.", TypeError)
        if not out.is_floating_point():
            fail(
                call,
                f"expected f to return a floating-point tensor, got {describe(out)}.",
                TypeError,
            )
        return out.reshape(-1)

    with torch.no_grad():
        m = fn(x).numel()
    return _Vector(fn, x, flat, m)


class _Detected:
    """Patterns of a traced function; a pattern too dense to store becomes a MemoryError."""

    def __init__(self, g: Callable, x: torch.Tensor, call: str) -> None:
        self.call = call
        self.prop = self._guard(lambda: Propagation(trace(g, x, call=call), x.numel()))

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except PatternTooLarge as err:
            fail(
                self.call,
                f"{err}. Use the dense path (hesse.hessian, or hessian_diagonal with "
                "method='dense'), or pass pattern= if you know a sparser one.",
                MemoryError,
            )

    def hessian(self, max_products: int | None = None) -> sp.csr_matrix:
        return self._guard(lambda: self.prop.hessian(max_products))

    def jacobian(self) -> sp.csr_matrix:
        return self._guard(self.prop.jacobian)


def _detect(g: Callable, x: torch.Tensor, call: str) -> _Detected:
    return _Detected(g, x, call)


# NOTE [pattern cache]
# A detected Hessian pattern is kept per function object (weakly: it goes with the
# function) and per call signature: the shapes, dtypes and devices of the tensor
# arguments, the values of integer and boolean tensor arguments (indices are
# structural, NOTE [constants]) and of plain Python arguments. A function can still
# change its structure behind the same signature (a captured index tensor updated in
# place, a global read by Python), so a cached pattern is only used together with the
# one-HVP check of NOTE [pattern check], and detected again when the check fails.
_PATTERNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(args: tuple, argnums: Any) -> tuple | None:
    """The cache key of a call (NOTE [pattern cache]); ``None``: not cacheable."""
    key: list[Any] = [argnums]
    for leaf in tree_leaves(args):
        if isinstance(leaf, torch.Tensor):
            entry: tuple = (tuple(leaf.shape), leaf.dtype, leaf.device.type)
            if not (leaf.is_floating_point() or leaf.is_complex()):
                if leaf.numel() > 1_000_000:
                    return None
                entry += (tuple(leaf.detach().cpu().reshape(-1).tolist()),)
            key.append(entry)
        elif isinstance(leaf, (int, float, bool, str, type(None))):
            key.append((type(leaf), leaf))
        else:
            return None
    return tuple(key)


def _cached_pattern(f: Callable, signature: tuple | None) -> sp.csr_matrix | None:
    try:
        return _PATTERNS.get(f, {}).get(signature) if signature is not None else None
    except TypeError:  # f cannot be weakly referenced
        return None


def _remember_pattern(f: Callable, signature: tuple | None, P: sp.csr_matrix) -> None:
    if signature is None:
        return
    try:
        entries = _PATTERNS.setdefault(f, {})
    except TypeError:
        return
    if len(entries) >= _CACHE_SIZE:
        entries.pop(next(iter(entries)))
    entries[signature] = P


# -- colourings of a pattern, cached ----------------------------------------------------

_CACHE: dict[tuple, Any] = {}
_CACHE_SIZE = 16


def _cached(kind: str, P: sp.csr_matrix, make: Callable[[], Any]) -> Any:
    """``make()``, cached on ``kind`` and the pattern's content (colourings, recovery maps)."""
    key = _key(kind, P)
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = make()
    return _CACHE[key]


def _key(kind: str, P: sp.csr_matrix) -> tuple:
    return (kind, P.shape, P.nnz, derived(P, "digest", lambda: _digest(P)))


def _digest(P: sp.csr_matrix) -> str:
    """The content hash of ``P``'s index arrays (once per pattern, NOTE [derived graphs])."""
    # SHA-256: hardware-accelerated on current x86 and ARM CPUs, 2-3x faster than BLAKE2
    # there; the arrays are hashed in place (no byte copies)
    digest = hashlib.sha256(np.ascontiguousarray(P.indptr))
    digest.update(np.ascontiguousarray(P.indices))
    return digest.hexdigest()


def _coloured(kind: str, P: sp.csr_matrix) -> Coloring:
    """The colouring of ``P`` of the given kind (cached: a reused pattern is coloured once)."""
    fn = {
        "acyclic": acyclic_coloring,
        "star": star_coloring,
        "diagonal": diagonal_coloring,
    }[kind]
    return _cached(kind, P, lambda: fn(P))


def _seed_rows(coloring: Coloring, like: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """Rows ``start:stop`` of the ``(num_colors, n)`` seed matrix, made on demand."""
    colors = coloring.colors
    order = np.argsort(colors, kind="stable")
    bounds = np.searchsorted(colors[order], np.arange(coloring.num_colors + 1))
    n = len(colors)

    def rows(start: int, stop: int) -> torch.Tensor:
        out = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
        members = order[bounds[start] : bounds[stop]]
        r = colors[members] - start
        out[torch.from_numpy(r), torch.from_numpy(members)] = 1
        return out

    return rows


# -- public transforms ------------------------------------------------------------------


def hessian_sparsity(
    f: Callable[..., torch.Tensor], argnums: int | tuple[int, ...] = 0
) -> Callable[..., torch.Tensor]:
    """The global sparsity pattern of the Hessian of ``f``, valid for every input value.

    ``f`` is traced to ATen operators (no arithmetic runs) and boolean index
    patterns are propagated with one rule per operator family: an entry is
    ``True`` wherever some input value can make the Hessian entry nonzero.
    Operators without a rule are treated as dense (with a
    ``DenseRuleWarning``); piecewise-linear operators (``relu``, ``abs``, ``max``)
    count as linear, matching the Hessian autograd computes.

    Args:
        f: a function returning a real scalar tensor.
        argnums: which positional arguments to differentiate (int or tuple); the
            ``n`` entries are the arguments' elements flattened row-major, in order.

    Returns:
        A function of ``*args`` returning a sparse COO boolean tensor ``(n, n)``.

    Raises:
        NotImplementedError: for value-dependent control flow (``if x.sum() > 0``,
            ``.item()``): no global pattern exists; pass ``pattern=`` to the
            sparse transforms instead.

    Cost: one trace of ``f`` plus sparse boolean products, about
    ``O(sum over operators of nnz)``; no derivative is evaluated.

    References:
        Walther, A. (2008). Computing sparse Hessians with automatic differentiation.
        Hill, A. & Dalle, G. (2025). Sparser, better, faster, stronger: sparsity
        detection for efficient automatic differentiation. TMLR.

    Example:
        >>> f = lambda x: (x[1:] * x[:-1]).sum()
        >>> hessian_sparsity(f)(torch.zeros(3)).to_dense().int()
        tensor([[0, 1, 0],
                [1, 0, 1],
                [0, 1, 0]], dtype=torch.int32)
    """

    def wrapped(*args: Any) -> torch.Tensor:
        call = call_form("hesse.hessian_sparsity", len(args))
        engine = FlatHVP(f, args, argnums, call=call)
        return _to_torch(_detect(engine.g, engine.x, call).hessian())

    return wrapped


def jacobian_sparsity(
    f: Callable[..., torch.Tensor], argnums: int | tuple[int, ...] = 0
) -> Callable[..., torch.Tensor]:
    """The global sparsity pattern of the Jacobian of ``f`` (output flattened row-major).

    Args:
        f: a function returning a real tensor of any shape (``m`` elements).
        argnums: which positional arguments to differentiate.

    Returns:
        A function of ``*args`` returning a sparse COO boolean tensor ``(m, n)``.

    Raises:
        NotImplementedError: for value-dependent control flow (see :func:`hessian_sparsity`).

    Cost: one trace of ``f`` plus sparse boolean products.

    Example:
        >>> jacobian_sparsity(lambda x: x[1:] - x[:-1])(torch.zeros(3)).to_dense().int()
        tensor([[1, 1, 0],
                [0, 1, 1]], dtype=torch.int32)
    """

    def wrapped(*args: Any) -> torch.Tensor:
        call = call_form("hesse.jacobian_sparsity", len(args))
        prob = _vector_problem(f, args, argnums, call)
        return _to_torch(_detect(prob.fn, prob.x, call).jacobian())

    return wrapped


#: ``coloring=`` choices of :func:`sparse_hessian` (NOTE [colouring choice]).
HESSIAN_COLORINGS = ("auto", "acyclic", "star")


#: ``coloring="auto"`` keeps substitution when its estimated relative error per entry is
#: below ``sqrt(eps)`` of the dtype (NOTE [substitution]); else direct recovery runs.
def _substitution_safe(worst: float, dtype: torch.dtype) -> bool:
    return worst <= torch.finfo(dtype).eps ** 0.5


#: ``coloring="auto"`` computes the best star colouring of all orders only when the one
#: of the first order needs at most this many colours more than the acyclic one (0: ties
#: that only other star orders reach are given to substitution, checked by its estimate).
_STAR_PROBE_SLACK = 0


def _kind(coloring: str, P: sp.csr_matrix) -> str:
    """The colouring that runs for ``coloring=`` on ``P`` (NOTE [colouring choice])."""
    if coloring != "auto":
        return coloring
    acyclic = _coloured("acyclic", P).num_colors
    # a star colouring in one order first: the best of all orders (several times its
    # cost, most of a small one-shot) is only computed when it can tie or win
    most = acyclic + _STAR_PROBE_SLACK
    probe = _cached(f"star-probe-{most}", P, lambda: star_probe(P, most))
    if probe > most:
        return "acyclic"
    star = _plan("star", P).coloring.num_colors  # after NOTE [neutral colours]
    return "star" if star <= acyclic else "acyclic"  # a tie: direct recovery


def _plan(kind: str, P: sp.csr_matrix) -> Plan:
    """The colouring and recovery plan of ``P`` (cached on the pattern's content)."""
    if kind == "acyclic":
        return _cached("acyclic-plan", P, lambda: substitution_plan(P, _coloured("acyclic", P)))
    return _cached("star-plan", P, lambda: star_plan(P, _coloured("star", P)))


def _coupled_pairs(P: sp.csr_matrix) -> int:
    """How many ordered pairs ``i != j`` the (symmetrised) pattern couples.

    # NOTE [dense fallback]
    When every pair is coupled (the adjacency graph is complete), no colouring needs
    fewer than ``n`` colours: the ``n`` products with basis vectors cost the same HVPs
    and skip the colouring (``O(n^2)`` edges, ``O(n^3)`` greedy work) and the recovery.
    The result is the same CSR tensor (the pattern's entries, every one read directly).
    This is the cost model of ``hessian_diagonal(method="auto")`` (colours against
    ``n``), decided before colouring from the pattern alone."""
    S = symmetric(P)
    return int(S.nnz - np.count_nonzero(S.diagonal()))


# NOTE [one-shot cost model]
# A one-shot sparse Hessian of a new function pays detection (tracing and propagation)
# and colouring; ``n`` dense HVPs in batched passes pay neither. With
# ``coloring="auto"`` and ``DENSE_MIN_N <= n <= DENSE_MAX_N`` (below, both paths take
# milliseconds; an explicit colouring is honoured), the costs are compared twice:
# * dense: ``n`` products in ``ceil(n / chunk)`` passes, timed on the function itself
#   (once per call, 35 probe products, each timing the faster of two): one product
#   ``t_1`` (the per-pass cost) and a batch of ``PROBE_ROWS`` (``t_b``),
#   ``t_dense = passes * t_1 + n * (t_b - t_1) / (PROBE_ROWS - 1)``.
# * before detection (no cached pattern, ``n <= DENSE_EARLY_MAX_N``): detection costs
#   about ``DETECT_NODE_SECONDS`` per node of the gradient's autograd graph (tracing and
#   propagation are Python work per operator, independent of ``n`` and of the threads;
#   measured 0.45-0.82 ms per node, median 0.68, on the five benchmark problems on a
#   quiet 16-core x86 machine, 0.4-0.95 on a loaded 2-core one; a value below the median
#   is taken, erring towards detection), and colouring at least what a connected pattern
#   at its sparsest (a path, ``2 (n - 1)`` coupled pairs) costs: at n = 1e3 the Python
#   kernels colour a path in tens of milliseconds, as much as the dense products of a
#   small function (the 5-point stencil: detection 30 ms, colouring 50 ms, dense products
#   25 ms, 2 threads). Dense wins: the result stores all
#   ``n^2`` entries (no pattern is known, and a stored entry must be structural: the
#   result can be passed back as ``pattern=``).
# * after detection, when the colouring is not cached: ``COLOR_EDGE_SECONDS`` per
#   coupled pair with the Python kernels, ``JIT_EDGE_SECONDS`` with the compiled ones
#   (plus numba's start-up, ``NUMBA_START_SECONDS``, in a process that has not imported
#   it), NOTE [kernels]; rough costs measured on a 2-core x86 machine, they only decide
#   near the crossover (at n = 1e3 dense products cost tens of ms and colouring
#   hundreds; at n = 1e4 dense products cost seconds). Dense wins: the result stores the
#   detected pattern's entries, as the sparse path does.
DENSE_MIN_N = 256
DENSE_MAX_N = 4096
DENSE_EARLY_MAX_N = 2048
PROBE_ROWS = 16
DETECT_NODE_SECONDS = 6e-4
COLOR_EDGE_SECONDS = 2e-5
JIT_EDGE_SECONDS = 5e-7
NUMBA_START_SECONDS = 1.0


def _coloring_seconds(P: sp.csr_matrix) -> float:
    """The estimated colouring time of ``P`` (NOTE [one-shot cost model])."""
    if _key("acyclic-plan", P) in _CACHE or _key("star-plan", P) in _CACHE:
        return 0.0
    return _edge_seconds(_coupled_pairs(P))


def _coloring_floor(n: int) -> float:
    """The colouring time of a connected pattern on ``n`` variables, at its sparsest (a
    path: ``2 (n - 1)`` coupled pairs), before detection (NOTE [one-shot cost model])."""
    return _edge_seconds(2 * (n - 1))


def _edge_seconds(edges: int) -> float:
    """The estimated time to colour a graph of ``edges`` coupled pairs (NOTE [kernels])."""
    if edges <= JIT_EDGES:
        return COLOR_EDGE_SECONDS * edges
    return JIT_EDGE_SECONDS * edges + NUMBA_START_SECONDS * ("numba" not in sys.modules)


def _graph_nodes(root: Any, limit: int = 100_000) -> int:
    """The nodes of an autograd graph (counted up to ``limit``)."""
    seen, stack = {root}, [root]
    while stack and len(seen) < limit:
        for child, _ in stack.pop().next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return len(seen)


class _DenseCost:
    """The probed cost of ``n`` dense products of one call (NOTE [one-shot cost model])."""

    def __init__(self, engine: FlatHVP, chunk_size: int | None, coloring: str) -> None:
        self.engine, self.chunk_size = engine, chunk_size
        self.eligible = coloring == "auto" and DENSE_MIN_N <= engine.n <= DENSE_MAX_N
        self._seconds: tuple[float, float] | None = None

    def seconds(self) -> tuple[float, float]:
        """``(t_dense, t_1)``, probed on first use."""
        if self._seconds is None:
            engine, n = self.engine, self.engine.n
            x = engine.x
            now = clock(x)  # wall time: the products use every thread, detection one
            rows = basis_rows(n, x, capacity=PROBE_ROWS)
            engine.apply(1, rows, chunk_size=1)  # builds the gradient graph, settles the mode

            def timed(k: int) -> float:
                start = now()
                engine.apply(k, rows, chunk_size=k)
                return now() - start

            # the faster of two: a probe of a fraction of a millisecond is at the mercy of
            # a single interruption, and this decides between paths 2x apart
            one = min(timed(1), timed(1))
            batch = min(timed(PROBE_ROWS), timed(PROBE_ROWS))
            per_row = max(batch - one, 0.0) / (PROBE_ROWS - 1)
            dense = math.ceil(n / (self.chunk_size or n)) * one + n * per_row
            self._seconds = (dense, one)
        return self._seconds

    def before_detection(self) -> bool:
        """Dense products cost less than detecting the pattern."""
        if not self.eligible or self.engine.n > DENSE_EARLY_MAX_N:
            return False
        dense, _ = self.seconds()
        graph = self.engine._graph  # built by the probe (reverse-over-reverse)
        if graph is None or graph[1].grad_fn is None:
            return False
        detect = DETECT_NODE_SECONDS * _graph_nodes(graph[1].grad_fn)
        return dense < detect + _coloring_floor(self.engine.n)

    def before_coloring(self, P: sp.csr_matrix) -> bool:
        """Dense products cost less than colouring ``P``."""
        if not self.eligible:
            return False
        colour = _coloring_seconds(P)
        return colour > 0.0 and self.seconds()[0] < colour


def _check_compile(call: str, compile: Any, pattern: Any) -> None:
    """``compile=`` is a bool, and needs ``pattern=`` (NOTE [compiled reuse])."""
    if not isinstance(compile, bool):
        fail(call, f"expected compile to be True or False, got {describe(compile)}.", TypeError)
    if compile and pattern is None:
        fail(
            call,
            "compile=True compiles the prepared evaluator of a known pattern; got no "
            "pattern=. Pass pattern=hesse.hessian_sparsity(f)(*args), or drop compile=.",
        )


def _check_pattern(call: str, engine: FlatHVP, H: torch.Tensor) -> None:
    """One HVP with a fixed pseudo-random vector against ``H @ v``: a supplied pattern
    that misses nonzeros of the Hessian at this point fails here (NOTE [pattern check])."""
    v = _check_vector(engine.n, engine.x)
    hv = engine.apply(1, lambda a, b: v[None], chunk_size=1)[0]  # with the fallbacks
    _compare_product(call, "Hessian", "a Hessian-vector product", hv, H, v, "hessian")


def _check_vector(n: int, like: torch.Tensor) -> torch.Tensor:
    """The fixed pseudo-random vector of NOTE [pattern check], entries in ``[0.5, 1.5)``."""
    gen = torch.Generator().manual_seed(0x5EED)
    return torch.rand(n, generator=gen, dtype=torch.float64).to(like) + 0.5


def _compare_product(
    call: str,
    what: str,
    product: str,
    exact: torch.Tensor,
    M: torch.Tensor,
    v: torch.Tensor,
    detector: str,
) -> None:
    """``exact`` (one product with ``v``) against ``M @ v`` of the recovered sparse matrix
    ``M``: a pattern that misses nonzeros at this point fails here (NOTE [pattern check])."""
    mine = (M.to(torch.float64) @ v.to(torch.float64)).to(exact.dtype)
    scale = float(exact.abs().max()) + float(mine.abs().max()) if exact.numel() else 0.0
    # substitution accepted by "auto" may carry sqrt(eps) relative error per entry
    tol = 10 * torch.finfo(exact.dtype).eps ** 0.5 * max(scale, torch.finfo(exact.dtype).tiny)
    err = float((exact - mine).abs().max()) if exact.numel() else 0.0
    if err > tol:
        bad = int((exact - mine).abs().argmax())
        fail(
            call,
            f"the pattern misses nonzeros of the {what}: {product} differs "
            f"from the one of the recovered {what} by {err:.3g} (row {bad}; tolerance "
            f"{tol:.3g}). Fix: pass a pattern that contains every nonzero (e.g. from "
            f"hesse.{detector}_sparsity), or omit pattern= to detect it.",
        )


def sparse_hessian(
    f: Callable[..., torch.Tensor],
    argnums: int | tuple[int, ...] = 0,
    *,
    pattern: torch.Tensor | None = None,
    coloring: str = "auto",
    chunk_size: int | None = None,
    compile: bool = False,
) -> Callable[..., torch.Tensor]:
    """The exact Hessian as a sparse CSR tensor, from a few compressed HVPs.

    The pattern (detected, or ``pattern``) is coloured; with ``K`` colours, ``K``
    Hessian-vector products with the colour seeds :math:`s_c` give :math:`B = H S`,
    from which every nonzero is recovered.

    # NOTE [colouring choice]
    ``coloring="acyclic"``: an acyclic colouring (NOTE [acyclic colouring]) and
    substitution recovery (NOTE [substitution]): fewest products (a band with ``rho``
    off-diagonal bands: ``floor(rho/2) + 1``; Rosenbrock: 2), entries found by solving
    along two-coloured trees. ``coloring="star"``: a star colouring and direct
    recovery, :math:`H_{ij} = B_{i, c(j)}` when ``j`` is the only neighbour of ``i``
    with colour ``c(j)``, else :math:`B_{j, c(i)}` (more products, each entry read
    once: no error growth). ``coloring="auto"`` (default): the colouring with fewer
    colours, star on a tie; and when substitution runs but its estimated rounding
    error exceeds ``sqrt(eps)`` relative to an entry (badly scaled Hessians), the star
    products are computed and used instead.

    The transform returned with ``pattern=`` is a prepared evaluator (NOTE [prepared
    reuse] in :mod:`hesse.sparsity._prepared`): its first call for a size ``n``
    colours the pattern, plans the recovery, checks the pattern and picks the fastest
    HVP strategy; later calls cost the ``K`` batched HVPs and one gather.
    ``compile=True`` (with ``pattern=``) compiles that repeated call with
    ``torch.compile`` (NOTE [compiled reuse]), falling back to eager with a warning.
    Without ``pattern=``, a small problem whose ``n`` dense HVPs cost less than
    colouring its pattern takes the dense products (NOTE [one-shot cost model]).

    # NOTE [pattern check]
    A supplied pattern is checked once, on the first call of the transform for a size
    ``n`` (not on the repeated calls, which would cost one more HVP each): the recovered
    Hessian times a fixed pseudo-random vector is compared with one HVP. Missing
    nonzeros that are nonzero at that point are reported (a ``ValueError``). A function
    that changes its structure between calls of one prepared transform is not detected;
    a new ``sparse_hessian(f, pattern=...)`` checks again.

    Args:
        f: a function returning a real scalar tensor.
        argnums: which positional arguments to differentiate (int or tuple).
        pattern: a precomputed pattern ``(n, n)`` (e.g. from :func:`hessian_sparsity`),
            reused without tracing; symmetrised. Entries outside it are taken as zero.
        coloring: ``"auto"``, ``"acyclic"`` (substitution) or ``"star"`` (direct).
        chunk_size: seed vectors per vectorised pass (default: sized from free memory).
        compile: compile the prepared evaluator with ``torch.compile`` (needs
            ``pattern``; NOTE [compiled reuse]).

    Returns:
        A function of ``*args`` returning a ``torch.sparse_csr`` tensor ``(n, n)`` in
        the argument's dtype, whose stored entries are the pattern's.

    Raises:
        NotImplementedError: for value-dependent control flow without ``pattern``.
        TypeError, ValueError: for a malformed ``pattern``, a ``pattern`` found to miss
            nonzeros, or bad input.

    Cost: ``K`` HVPs (``K`` colours: acyclic 2 for a tridiagonal Hessian, 3 for a
    5-point stencil; star 3 and 5), memory ``O(K n + nnz)``; recovery ``O(nnz)``. A
    pattern that couples every pair, or a small one cheaper to read from dense products
    (NOTE [one-shot cost model]), takes ``n`` HVPs with basis vectors instead, without
    colouring (NOTE [dense fallback]). The first call with ``pattern=`` adds one checking
    HVP and a race of three strategies (about six more evaluations); ``compile=True``
    adds the compilation.

    References:
        Coleman, T. F. & Moré, J. J. (1984). Estimation of sparse Hessian matrices and
        graph coloring problems. Math. Programming 28.
        Coleman, T. F. & Cai, J.-Y. (1986). The cyclic coloring problem and estimation
        of sparse Hessian matrices. SIAM J. Algebraic Discrete Methods 7(2).
        Gebremedhin, A. H., Tarafdar, A., Manne, F. & Pothen, A. (2007). New acyclic and
        star coloring algorithms with application to computing Hessians. SIAM J. Sci.
        Comput. 29(3).

    Example:
        >>> f = lambda x: (x**3).sum() + (x[1:] * x[:-1]).sum()
        >>> sparse_hessian(f)(torch.ones(3, dtype=torch.float64)).to_dense()
        tensor([[6., 1., 0.],
                [1., 6., 1.],
                [0., 1., 6.]], dtype=torch.float64)
    """
    prepared: dict[int, Prepared] = {}  # NOTE [prepared reuse]: one evaluator per size n

    def wrapped(*args: Any) -> torch.Tensor:
        call = call_form("hesse.sparse_hessian", len(args))
        if pattern is not None and args and (n := _size(args)) in prepared:
            return prepared[n](args)  # NOTE [prepared reuse]: validated on the first call
        check_chunk_size(call, chunk_size)
        check_choice(call, "coloring", coloring, HESSIAN_COLORINGS)
        _check_compile(call, compile, pattern)
        engine = FlatHVP(f, args, argnums, call=call)
        n = engine.n
        if pattern is not None:
            P = symmetric(_from_torch(call, pattern, (n, n)))
            H, plan = _compute(engine, P)
            _check_pattern(call, engine, H)
            prep = Prepared(f, argnums, plan, chunk_size=chunk_size, compile=compile, call=call)
            prep.settle(args, H.values())
            prepared[n] = prep
            return H
        signature = _signature(args, argnums)
        P = _cached_pattern(f, signature)
        cost = _DenseCost(engine, chunk_size, coloring)  # NOTE [one-shot cost model]
        if P is not None:  # NOTE [pattern cache]: used only if the check confirms it
            H = _dense(engine, P) if cost.before_coloring(P) else _compute(engine, P)[0]
            release(P, keep=("digest",))  # NOTE [derived graphs]: a kept pattern keeps no graph
            try:
                _check_pattern(call, engine, H)
                return H
            except ValueError:
                pass
        elif cost.before_detection():
            return _dense(engine, n)
        P = _detect(engine.g, engine.x, call).hessian()
        _remember_pattern(f, signature, P)
        H = _dense(engine, P) if cost.before_coloring(P) else _compute(engine, P)[0]
        release(P, keep=("digest",))
        return H

    def _size(args: tuple) -> int | None:
        try:
            return FlatArgs.of("", args, argnums).flat.n
        except Exception:  # noqa: BLE001 - malformed: the full validation below reports it
            return None

    def _dense(engine: FlatHVP, P: sp.csr_matrix | int) -> torch.Tensor:
        """``n`` HVPs with basis vectors, read at the pattern's entries (``P`` an int
        ``n``: all ``n^2``)."""
        plan = dense_plan(P)
        return plan.csr(entries(engine, plan, chunk_size)[0])

    def _compute(engine: FlatHVP, P: sp.csr_matrix) -> tuple[torch.Tensor, Plan]:
        n = engine.n
        if _coupled_pairs(P) == n * (n - 1):  # NOTE [dense fallback]: no colouring helps
            plan = dense_plan(P)
            return plan.csr(entries(engine, plan, chunk_size)[0]), plan
        kind = _kind(coloring, P)
        plan = _plan(kind, P)
        estimate = kind == "acyclic" and coloring == "auto"
        values, worst = entries(engine, plan, chunk_size, estimate=estimate)
        if not _substitution_safe(worst, engine.x.dtype):
            # "auto": substitution is not accurate here; direct recovery instead
            plan = _plan("star", P)
            values, _ = entries(engine, plan, chunk_size)
        return plan.csr(values), plan

    return wrapped


#: ``coloring=`` choices of :func:`sparse_jacobian` (NOTE [jacobian colouring choice]).
JACOBIAN_COLORINGS = ("auto", "column", "row", "bidirectional")


def _jacobian_plan(kind: str, P: sp.csr_matrix) -> _recovery.JacobianPlan:
    """The bicolouring of the given kind and its recovery plan (cached on ``P``)."""
    make = bicoloring if kind == "bidirectional" else lambda J: one_sided(J, kind)
    return _cached(f"jacobian-{kind}", P, lambda: _recovery.jacobian_plan(P, make(P)))


def _jacobian_kind(coloring: str, P: sp.csr_matrix) -> str:
    """The colouring that runs for ``coloring=`` on ``P`` (NOTE [jacobian colouring choice])."""
    if coloring != "auto" or P.nnz == 0:
        return "column" if coloring == "auto" else coloring
    m, n = P.shape
    if P.nnz == m * n:  # dense: min(m, n) products, no bicolouring does better
        return "column" if n <= m else "row"
    bi = _jacobian_plan("bidirectional", P).bicoloring.products
    # a row with d entries needs d column colours, a column with d entries d row colours:
    # a one-sided colouring whose bound exceeds the bicolouring's products is not computed
    best, kind = bi + 1, "bidirectional"
    for side, bound in (("column", P.getnnz(axis=1).max()), ("row", P.getnnz(axis=0).max())):
        if bound <= bi and bound < best:
            products = _jacobian_plan(side, P).bicoloring.products
            if products <= bi and products < best:
                best, kind = products, side
    return kind


def _jacobian_products(
    prob: _Vector, plan: _recovery.JacobianPlan, chunk_size: int | None, call: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Bc`` (``K_col`` JVPs with the column seeds) and ``Br`` (``K_row`` VJPs)."""
    x, m = prob.x, prob.m
    kc, kr = plan.bicoloring.column.num_colors, plan.bicoloring.row.num_colors
    Bc, Br = x.new_zeros(0, m), x.new_zeros(0, x.numel())
    if kc:
        push = lambda s: jvp(prob.fn, (x,), (s,))[1]  # noqa: E731
        seeds = _seed_rows(plan.bicoloring.column, x)
        Bc = map_chunks(vmap(push), push, kc, seeds, chunk_size=chunk_size or kc, call=call)
    if kr:
        _, pullback = vjp(prob.fn, x)
        pull = lambda s: pullback(s)[0]  # noqa: E731
        seeds = _seed_rows(plan.bicoloring.row, x.new_zeros(m))
        Br = map_chunks(vmap(pull), pull, kr, seeds, chunk_size=chunk_size or kr, call=call)
    return Bc, Br


def sparse_jacobian(
    f: Callable[..., torch.Tensor],
    argnums: int | tuple[int, ...] = 0,
    *,
    pattern: torch.Tensor | None = None,
    coloring: str = "auto",
    chunk_size: int | None = None,
) -> Callable[..., torch.Tensor]:
    """The exact Jacobian as a sparse CSR tensor ``(m, n)``, from compressed JVPs and VJPs.

    # NOTE [jacobian colouring choice]
    ``coloring="column"``: columns that share no row are grouped (Curtis-Powell-Reid)
    and one JVP per group :math:`J s_c` gives all their entries. ``coloring="row"``: the
    same for rows, one VJP :math:`s_r^T J` per group. ``coloring="bidirectional"``: a
    star bicolouring (NOTE [bicolouring]): ``K_col`` JVPs and ``K_row`` VJPs, each entry
    read from one of them; a Jacobian with a dense row and a dense column (arrowhead)
    takes 3 products where a one-sided colouring takes ``n``. ``coloring="auto"``
    (default): the fewest products, ties going to column (JVPs keep no graph), then
    row, then bidirectional. Every entry is read directly: exact.

    # NOTE [jacobian pattern check]
    A supplied ``pattern`` is checked on the first call of the transform with one JVP
    with a fixed pseudo-random vector against the recovered Jacobian times it (the check
    of NOTE [pattern check]): missing nonzeros that are nonzero at that point raise.

    Args:
        f: a function returning a real tensor (``m`` elements, flattened row-major).
        argnums: which positional arguments to differentiate.
        pattern: a precomputed ``(m, n)`` pattern (e.g. from :func:`jacobian_sparsity`);
            entries outside it are taken as zero.
        coloring: ``"auto"``, ``"column"`` (JVPs), ``"row"`` (VJPs) or ``"bidirectional"``.
        chunk_size: products per vectorised pass (default: all at once).

    Returns:
        A function of ``*args`` returning a ``torch.sparse_csr`` tensor ``(m, n)``.

    Raises:
        NotImplementedError: for value-dependent control flow without ``pattern``.
        TypeError, ValueError: for an unknown ``coloring``, a malformed ``pattern``, a
            ``pattern`` found to miss nonzeros, or bad input.

    Cost: ``K_col`` JVPs plus ``K_row`` VJPs (column: ``K_row = 0``; row:
    ``K_col = 0``), memory ``O(K_col m + K_row n + nnz)``; with ``pattern``, one more
    JVP on the first call.

    References:
        Curtis, A. R., Powell, M. J. D. & Reid, J. K. (1974). On the estimation of sparse
        Jacobian matrices. IMA J. Appl. Math. 13.
        Coleman, T. F. & Verma, A. (1998). The efficient computation of sparse Jacobian
        matrices using automatic differentiation. SIAM J. Sci. Comput. 19(4). (Star
        bicolouring; the other references of NOTE [bicolouring],
        :func:`hesse.sparsity._coloring.bicoloring`.)

    Example:
        >>> J = sparse_jacobian(lambda x: x[1:] * x[:-1])(torch.tensor([1.0, 2.0, 3.0]))
        >>> J.to_dense()
        tensor([[2., 1., 0.],
                [0., 3., 2.]])
    """
    checked: set[tuple[int, int]] = set()  # NOTE [jacobian pattern check]: once per shape

    def wrapped(*args: Any) -> torch.Tensor:
        call = call_form("hesse.sparse_jacobian", len(args))
        check_chunk_size(call, chunk_size)
        check_choice(call, "coloring", coloring, JACOBIAN_COLORINGS)
        prob = _vector_problem(f, args, argnums, call)
        m, n = prob.m, prob.x.numel()
        if pattern is None:
            P = _detect(prob.fn, prob.x, call).jacobian()
        else:
            P = _from_torch(call, pattern, (m, n))
        P.sum_duplicates()
        P.sort_indices()
        plan = _jacobian_plan(_jacobian_kind(coloring, P), P)
        values = plan.recover(*_jacobian_products(prob, plan, chunk_size, call))
        J = plan.csr(values.detach())
        if pattern is not None and (m, n) not in checked:
            v = _check_vector(n, prob.x)
            jv = jvp(prob.fn, (prob.x,), (v,))[1].detach()
            _compare_product(call, "Jacobian", "a Jacobian-vector product", jv, J, v, "jacobian")
            checked.add((m, n))
        return J

    return wrapped


# -- diagonal -----------------------------------------------------------------------------


@dataclass
class DiagonalProblem:
    """What a diagonal method receives (NOTE [diagonal methods])."""

    engine: FlatHVP
    pattern: torch.Tensor | None
    chunk_size: int | None
    call: str
    coloring: str = "auto"


#: ``coloring=`` choices of :func:`hessian_diagonal` (NOTE [diagonal colouring]).
DIAGONAL_COLORINGS = ("auto", "distance1")
_DIAGONAL_KINDS = {"auto": "diagonal", "distance1": "diagonal"}


def _check_diagonal_coloring(call: str, coloring: Any, method: str) -> None:
    """NOTE [diagonal colouring]: only distance-1 colourings serve the diagonal."""
    if coloring in HESSIAN_COLORINGS[1:]:
        fail(
            call,
            f"coloring={coloring!r} is a colouring for the full Hessian "
            "(hesse.sparse_hessian); the diagonal needs only a distance-1 colouring, which "
            f"never needs more colours: use coloring='auto' or 'distance1', got {coloring!r}.",
        )
    check_choice(call, "coloring", coloring, DIAGONAL_COLORINGS)
    if coloring != "auto" and method == "dense":
        fail(
            call,
            f"coloring={coloring!r} needs a colouring method, got method='dense' (which "
            "uses no colouring). Use method='coloring' or 'auto', or drop coloring=.",
        )


def _diag_coloring(prob: DiagonalProblem, P: sp.csr_matrix | None = None) -> torch.Tensor:
    engine = prob.engine
    n = engine.n
    if P is None:
        if prob.pattern is None:
            P = _detect(engine.g, engine.x, prob.call).hessian()
        else:
            P = _from_torch(prob.call, prob.pattern, (n, n))
    coloring = _coloured(_DIAGONAL_KINDS[prob.coloring], P)
    return _diag_from_coloring(prob, coloring)


def _diag_from_coloring(prob: DiagonalProblem, coloring: Coloring) -> torch.Tensor:
    engine = prob.engine
    if coloring.num_colors == 0:
        return engine.x.new_zeros(engine.n)
    B = engine.apply(
        coloring.num_colors, _seed_rows(coloring, engine.x), chunk_size=prob.chunk_size
    )
    return B[torch.from_numpy(coloring.colors), torch.arange(engine.n)]


def _diag_dense(prob: DiagonalProblem) -> torch.Tensor:
    """``n`` HVPs with basis vectors, chunked; only the diagonal entries are kept."""
    engine = prob.engine
    n, x = engine.n, engine.x
    chunk = prob.chunk_size
    if chunk is None:
        chunk = chunk_size_for(
            rows=n,
            per_row_bytes=engine._per_row_bytes() + 2 * n * x.element_size(),
            fixed_bytes=n * x.element_size(),
            budget=default_memory_budget(x.device),
        )

    def batched(idx: torch.Tensor) -> torch.Tensor:
        k = idx.shape[0]
        E = torch.zeros(k, n, dtype=x.dtype, device=x.device)
        E[torch.arange(k), idx] = 1
        return engine.apply(k, lambda s, e: E[s:e], chunk_size=k)[torch.arange(k), idx]

    return map_chunks(
        batched,
        None,
        n,
        lambda s, e: torch.arange(s, e, device=x.device),
        chunk_size=chunk,
        call=prob.call,
    )


#: ``method="auto"`` abandons detection past ``AUTO_DENSITY * n^2`` pair products
#: (NOTE [auto detection budget]): the input Hessian of a 784-128 MLP needs 128 * 784^2,
#: per-sample blocks with more samples than hidden units stay under it.
AUTO_DENSITY = 16


def _diag_auto(prob: DiagonalProblem) -> torch.Tensor:
    engine = prob.engine
    n = engine.n
    if prob.pattern is None:
        try:
            # NOTE [auto detection budget]: propagating more pair products than
            # AUTO_DENSITY * n^2 costs more than the n dense HVPs it could save.
            P = _detect(engine.g, engine.x, prob.call).hessian(AUTO_DENSITY * n * n)
        except MemoryError:  # effectively dense: the dense path is the right one, no warning
            return _diag_dense(prob)
        except NotImplementedError as err:
            warnings.warn(
                f"{prob.call}: no sparsity pattern ({str(err).split(': ', 1)[-1][:160]}...); "
                f"using {n} dense HVPs instead. Pass pattern= to use the sparse path.",
                SparsityFallbackWarning,
                stacklevel=4,
            )
            return _diag_dense(prob)
    else:
        P = _from_torch(prob.call, prob.pattern, (n, n))
    coloring = _coloured(_DIAGONAL_KINDS[prob.coloring], P)
    if coloring.num_colors < n:
        return _diag_from_coloring(prob, coloring)
    return _diag_dense(prob)


# NOTE [diagonal methods]
# ``hessian_diagonal(..., method=name)`` calls ``DIAGONAL_METHODS[name](problem)`` with a
# :class:`DiagonalProblem` and expects the flat diagonal ``(n,)``. Another method is one
# entry in this dict.
DIAGONAL_METHODS: dict[str, Callable[[DiagonalProblem], torch.Tensor]] = {
    "auto": _diag_auto,
    "coloring": _diag_coloring,
    "dense": _diag_dense,
}


def hessian_diagonal(
    f: Callable[..., torch.Tensor],
    argnums: int | tuple[int, ...] = 0,
    *,
    method: str = "auto",
    coloring: str = "auto",
    pattern: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """The exact diagonal of the Hessian, shaped like the differentiated argument(s).

    ``method="coloring"``: the pattern's adjacency graph is distance-1 coloured
    (no two coupled variables share a colour), and one HVP per colour gives the
    diagonal entries of all its members: :math:`H_{ii} = (H s_{c(i)})_i`.
    ``method="dense"``: ``n`` HVPs with basis vectors, chunked.
    ``method="auto"``: the colouring when it needs fewer than ``n`` products, else
    dense; when no pattern can be traced (value-dependent control flow) it warns
    and uses the dense path.

    # NOTE [diagonal colouring]
    Reading :math:`H_{ii} = (H s_{c(i)})_i` needs only that no neighbour of ``i`` shares
    its colour: a distance-1 colouring. Star and acyclic colourings
    (:func:`sparse_hessian`) are distance-1 colourings with more constraints, so they
    never need fewer products and are refused here. ``coloring="distance1"``: a greedy
    distance-1 colouring, best of several vertex orders plus iterated greedy
    (NOTE [colouring]); ``coloring="auto"`` (default) is the same today, the name kept
    for a better choice later. Recovery is direct, every entry read once: exact.

    Args:
        f: a function returning a real scalar tensor.
        argnums: which positional arguments to differentiate (int or tuple).
        method: ``"auto"``, ``"coloring"`` or ``"dense"``.
        coloring: ``"auto"`` or ``"distance1"`` (NOTE [diagonal colouring]); a value other
            than ``"auto"`` needs ``method="coloring"`` or ``"auto"``.
        pattern: a precomputed Hessian pattern ``(n, n)`` (see :func:`hessian_sparsity`).
        chunk_size: vectors per vectorised pass (default: sized from free memory).

    Returns:
        A function of ``*args`` returning the diagonal shaped like ``args[argnums]``
        (a tuple for a tuple of argnums).

    Raises:
        NotImplementedError: ``method="coloring"`` with value-dependent control flow.
        ValueError, TypeError: for an unknown method or colouring (``"star"`` and
            ``"acyclic"`` included), a malformed pattern, bad input.

    Cost: ``K`` HVPs with ``K`` distance-1 colours (1 for separable functions, 2 for a
    tridiagonal Hessian, ``D`` for per-sample blocks of size ``D``), else ``n``.

    References:
        Coleman, T. F. & Moré, J. J. (1984). Estimation of sparse Hessian matrices and
        graph coloring problems. Math. Programming 28.

    Example:
        >>> hessian_diagonal(lambda x: (x**3).sum())(torch.tensor([1.0, 2.0]))
        tensor([ 6., 12.])
    """

    def wrapped(*args: Any) -> Any:
        call = call_form("hesse.hessian_diagonal", len(args))
        check_choice(call, "method", method, tuple(DIAGONAL_METHODS))
        _check_diagonal_coloring(call, coloring, method)
        check_chunk_size(call, chunk_size)
        engine = FlatHVP(f, args, argnums, call=call)
        problem = DiagonalProblem(engine, pattern, chunk_size, call, coloring)
        flat = DIAGONAL_METHODS[method](problem)
        return engine.flat.unflatten(flat.detach())

    return wrapped
