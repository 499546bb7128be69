"""Diagonals of curvature operators: exact where structure allows, estimated otherwise.

# NOTE [diagonal registry]
``hesse.diagonal(op, method=...)`` looks ``(method, type(op))`` up in a small
registry, walking the operator's class hierarchy from the most specific class,
so a method can have one implementation for every operator and a faster one for
operators with structure. Adding a method, or a better path for one operator
class, is one line::

    register_diagonal("becker-lecun", HessianOperator)(becker_lecun_diagonal)

A registered function is called as ``fn(op, num_matvecs=..., generator=...,
chunk_size=..., call=...)`` and returns a tensor ``(n,)`` (exact methods) or an
:class:`~hesse._estimate.Estimate` (stochastic ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.func import jvp, vmap

from hesse._chunking import map_chunks
from hesse._estimate import (
    MAX_PAIRS_COLUMNS,
    Estimate,
    exchangeable_stderr,
    from_draws,
    from_moments,
    merge_moments,
)
from hesse._hvp import basis_rows, tensor_rows
from hesse._probes import keyed_generator, rademacher, resolve_generator, stream_seed
from hesse._validation import check_chunk_size, check_generator, fail
from hesse.operators._base import DenseOperator, LinearOperator, as_operator, keeping_graphs
from hesse.operators._function import FunctionHessianOperator
from hesse.operators._losses import PlainLoss
from hesse.operators._model import _OuterProductOperator

DiagonalMethod = Callable[..., "torch.Tensor | Estimate"]
_REGISTRY: dict[tuple[str, type], DiagonalMethod] = {}

#: default number of operator products for the stochastic methods.
DEFAULT_MATVECS = 64


def register_diagonal(
    method: str, operator: type = LinearOperator
) -> Callable[[DiagonalMethod], DiagonalMethod]:
    """Register ``fn`` as ``hesse.diagonal(op, method=method)`` for operators of type ``operator``.

    See NOTE [diagonal registry]. A later registration for the same pair replaces
    the earlier one.
    """

    def deco(fn: DiagonalMethod) -> DiagonalMethod:
        _REGISTRY[(method, operator)] = fn
        return fn

    return deco


def diagonal_methods() -> list[str]:
    """The names of the registered diagonal methods."""
    return sorted({m for m, _ in _REGISTRY})


@keeping_graphs
def diagonal(
    op: LinearOperator | torch.Tensor,
    *,
    method: str = "exact",
    num_matvecs: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor | Estimate:
    """The diagonal of a square operator, exact or estimated.

    Methods and their cost (``n`` = size, ``m`` = ``num_matvecs``, "product" = one
    operator product, i.e. one pass over the data for a model operator):

    - ``"exact"``: the exact diagonal, by the cheapest known path for the operator:

      * GGN / Fisher operators: :math:`\\mathrm{diag}(J^\\top S S^\\top J) =
        \\sum_{n,k} (J_n^\\top s_{nk})^2` with per-sample VJPs vectorised over the
        ``K`` columns of the output-Hessian factor ``S`` (``K = C`` classes for
        cross-entropy, ``D`` outputs for MSE/BCE, 1 for the empirical Fisher),
        no layer list. Parameters of ``nn.Linear`` and ``nn.Conv2d`` modules take a
        fast path (one
        backward pass batched over the ``K`` columns, then one matrix product of
        activations (or patches) and backpropagated factors per layer; see
        NOTE [linear fast path]); all others cost ``N * K`` per-sample VJPs,
        vectorised. One data pass either way;
      * function Hessians (:func:`hesse.hessian_operator`): for ``n`` above
        ``chunk_size``, the sparse path of :func:`hesse.hessian_diagonal` (one
        cached product per colour of the traced pattern), otherwise ``n``
        cached products in chunks;
      * the model Hessian (:class:`hesse.HessianOperator`): curvature
        backpropagation on the traced graph (:mod:`hesse.curvprop`; about
        ``output dim + sum of layer widths`` vectorised backward columns per
        sample, one data pass); a model that does not trace falls back, with a
        :class:`hesse.CurvpropFallbackWarning`, to the brute-force path below;
      * any other operator: ``n`` products with basis vectors in chunks of
        ``chunk_size`` (``ceil(n / chunk_size)`` data passes);
      * a dense matrix: its diagonal.
    - ``"directional"`` (function Hessians): :math:`H_{ii} = \\frac{d^2}{dh^2}
      f(x + h e_i)` by forward-over-forward AD, vectorised over ``i`` in chunks:
      ``n`` second-order forward passes (each about 3 evaluations of ``f``), no
      reverse pass and no graph kept.
    - ``"hutchinson"``: :math:`\\frac{1}{m}\\sum_j z_j \\odot A z_j` with Rademacher
      probes ``z_j``: ``m`` products; exact for diagonal matrices.
    - ``"xdiag"``: the exchangeable XDiag estimator (Epperly, Tropp and Webber
      2024): a randomized low-rank approximation from ``m/2`` products plus a
      Hutchinson correction of its residual, averaged over leave-one-out
      downdates. ``m`` products (``m/2`` with the sketch, ``m/2`` with its basis),
      ``O(n m^2)`` extra work; exact for matrices of rank below ``m/2``.
    - ``"becker-lecun"`` (model Hessian): the diagonal-only approximation of
      Becker & LeCun (1989) in its HesScale form (Elsayed & Mahmood 2022): only
      diagonals travel backwards, exact at the model output; about one backward
      pass. An approximation that can be *uninformative*: it drops every
      off-diagonal coupling, and attention, LayerNorm and softmax couple strongly.
      Measured relative error :math:`\\|d_{BL} - d\\| / \\|d\\|` against the exact
      diagonal (float64, random init, one batch): 0.11 on a 8-16-16-3 tanh MLP
      (cosine similarity 0.99), but 1.27 on a 1-layer GPT-2 (``n_embd=8``, 1,008
      parameters, cosine -0.20), 1.53 on a 2-layer GPT-2 (``n_embd=16``, 7,232
      parameters, cosine -0.70) and 1.23 on a 1-block ViT (955 parameters, cosine
      -0.28): on attention models it does worse than predicting zero. Check it
      against ``"exact"`` on a small copy of the model before relying on it.
    - ``"mc"`` (GGN / Fisher): the Monte-Carlo diagonal
      :math:`\\sum_n (J_n^\\top s_n)^2` with ``s_n`` the output gradient at a
      label sampled from the model (``E[s s^T] = H_n``); ``num_matvecs`` draws
      (default 1), each ``N`` per-sample backward passes per data pass.
    - ``"gnb"`` (GGN / Fisher): Sophia's Gauss-Newton-Bartlett estimator
      :math:`\\sum_b (J_b^\\top s_b)^2` with ``s_b`` sampled-label output gradients
      summed over the batch before the VJP: one backward pass per batch and draw
      (the cheapest), unbiased, higher variance than ``"mc"`` for large batches.

    Stochastic methods return an :class:`~hesse._estimate.Estimate`;
    ``.interval(0.95)`` gives Student-t intervals with its ``dof`` (NOTE [calibrated
    intervals] in ``hesse._estimate``; ``benchmarks/interval_coverage.py`` measures them).
    ``stderr`` is the spread of the independent draws over ``sqrt(m)`` (``m - 1``
    degrees of freedom; NaN with a single draw) for ``"hutchinson"``, ``"mc"`` and
    ``"gnb"``. XDiag's ``m/2`` leave-one-out draws share all but one sketch column,
    so their spread alone is too small; its ``stderr`` adds the pair covariance,
    estimated from the draws recomputed without each of up to 40 columns (see
    :func:`hesse._estimate.exchangeable_stderr`; ``O(g n m^2)`` extra flops and
    ``g^2 n`` memory for ``g <= 40`` such columns, fewer for large ``n``).
    ``"hutchinson"`` and ``"xdiag"`` with ``num_matvecs >= n`` compute the exact
    diagonal instead (the ``"exact"`` path, at most ``n`` products) and return it
    with ``exact=True`` and ``stderr = 0``.

    Args:
        op: a square hesse operator, or a dense square tensor.
        method: one of the methods above (see :func:`diagonal_methods`).
        num_matvecs: products (``"hutchinson"``, ``"xdiag"``; default 64) or label
            draws (``"mc"``, ``"gnb"``; default 1).
        generator: the source of randomness (default: a generator seeded with 0).
        chunk_size: columns (or samples, for the per-sample paths) per vectorised
            pass; ``None`` picks one.

    Returns:
        A flat ``(n,)`` tensor on the operator's device and dtype (exact methods;
        ``op.layout.unflatten(d)`` gives parameter-shaped tensors), or an
        :class:`~hesse._estimate.Estimate` of that shape.

    Raises:
        ValueError: an unknown method, a non-square operator, bad ``num_matvecs``.
        NotImplementedError: a method that does not apply to the operator.
        TypeError: a wrong type of ``op`` or ``generator``.

    References:
        Hutchinson (1989), "A stochastic estimator of the trace of the influence
        matrix for Laplacian smoothing splines"; Bekas, Kokiopoulou and Saad
        (2007), "An estimator for the diagonal of a matrix"; Epperly, Tropp and
        Webber (2024), "XTrace: making the most of every sample in stochastic trace
        estimation", SIAM J. Matrix Anal. Appl.; Liu, Li, Hall, Liang and Ma
        (2023), "Sophia: a scalable stochastic second-order optimizer for language
        model pre-training" (Gauss-Newton-Bartlett); Dangel, Kunstner and Hennig
        (2020), "BackPACK" (MC GGN diagonal).

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> diagonal(A, method="hutchinson", num_matvecs=4).value
        tensor([1., 2., 3.], dtype=torch.float64)
    """
    call = f"hesse.diagonal(op, method={method!r})"
    op = as_operator(op, call=call)
    if op.shape[0] != op.shape[1]:
        fail(call, f"expected a square operator, got shape {op.shape}.")
    methods = diagonal_methods()
    if method not in methods:
        fail(call, f"method should be one of {', '.join(map(repr, methods))}, got {method!r}.")
    check_chunk_size(call, chunk_size)
    check_generator(call, generator)
    if num_matvecs is not None and (
        isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < 1
    ):
        fail(call, f"num_matvecs should be a positive int or None, got {num_matvecs!r}.")
    fn = _lookup(method, op)
    if fn is None:
        owners = sorted(c.__name__ for m, c in _REGISTRY if m == method)
        fail(
            call,
            f"method {method!r} does not apply to {op._name()} (it is defined for: "
            f"{', '.join(owners)}). Use method='exact', 'hutchinson' or 'xdiag'.",
            NotImplementedError,
        )
    return fn(op, num_matvecs=num_matvecs, generator=generator, chunk_size=chunk_size, call=call)


# -- helpers --------------------------------------------------------------------------
def _lookup(method: str, op: LinearOperator) -> DiagonalMethod | None:
    """The registered function for ``method`` on the most specific class of ``op``."""
    for cls in type(op).__mro__:
        fn = _REGISTRY.get((method, cls))
        if fn is not None:
            return fn
    return None


def _products(
    op: LinearOperator, X: torch.Tensor, chunk_size: int | None, call: str
) -> torch.Tensor:
    """``A @ X`` for ``(n, k)`` ``X``, in column chunks: returns ``(n, k)``."""
    k = X.shape[1]
    out = map_chunks(
        lambda R: op._matmat(R.T).T,
        None,
        k,
        tensor_rows(X.T),
        chunk_size=chunk_size or k,
        call=call,
    )
    return out.T


def exact_estimate(op: LinearOperator, *, chunk_size: int | None, call: str) -> Estimate:
    """The exact diagonal, as an :class:`Estimate` with ``exact=True`` and zero error.

    What the stochastic methods (and :func:`hesse.trace`) return once their budget
    reaches the dimension ``n``: the operator's cheapest exact path (``n`` basis
    products at most), reported as ``n`` products.
    """
    diag = _lookup("exact", op)(
        op, num_matvecs=None, generator=None, chunk_size=chunk_size, call=call
    )
    n = op.shape[0]
    return Estimate(value=diag, stderr=torch.zeros_like(diag), num_matvecs=n, exact=True)


# -- exact ----------------------------------------------------------------------------
@register_diagonal("exact")
def _exact_basis(
    op: LinearOperator, *, chunk_size: int | None, call: str, **_: Any
) -> torch.Tensor:
    """``n`` products with basis vectors, ``chunk_size`` at a time."""
    n = op.shape[0]
    like = torch.empty(0, dtype=op.dtype, device=op.device)
    return map_chunks(
        lambda R: (op._matmat(R.T).T * R).sum(1),
        None,
        n,
        basis_rows(n, like),
        chunk_size=chunk_size or op.chunk_size,
        call=call,
    )


@register_diagonal("exact", DenseOperator)
def _exact_dense(op: DenseOperator, **_: Any) -> torch.Tensor:
    return op.matrix.diagonal().clone()


@register_diagonal("exact", FunctionHessianOperator)
def _exact_function(
    op: FunctionHessianOperator, *, chunk_size: int | None, call: str, **_: Any
) -> torch.Tensor:
    if op.shape[0] <= (chunk_size or op.chunk_size):
        # One batched pass of basis products: cheaper than tracing a sparsity pattern.
        return _exact_basis(op, chunk_size=chunk_size, call=call)
    try:  # the sparse path colours the Hessian: one product per colour, not per entry
        from hesse.sparsity._sparse import DIAGONAL_METHODS, DiagonalProblem
    except ImportError:
        return _exact_basis(op, chunk_size=chunk_size, call=call)
    # The operator's own engine, so the colour products reuse its cached gradient graph.
    return DIAGONAL_METHODS["auto"](DiagonalProblem(op.engine, None, chunk_size, call)).detach()


@register_diagonal("exact", _OuterProductOperator)
def _exact_outer(op: _OuterProductOperator, *, chunk_size: int | None, **_: Any) -> torch.Tensor:
    return op._factor_squares(op._factor, chunk_size=chunk_size)


# -- directional (forward-over-forward) ----------------------------------------------
@register_diagonal("directional", FunctionHessianOperator)
def _directional(
    op: FunctionHessianOperator, *, chunk_size: int | None, call: str, **_: Any
) -> torch.Tensor:
    g, x = op.engine.g, op.engine.x

    def single(e: torch.Tensor) -> torch.Tensor:
        def first(y: torch.Tensor) -> torch.Tensor:
            return jvp(g, (y,), (e,))[1]

        return jvp(first, (x,), (e,))[1]

    n = op.shape[0]
    return map_chunks(
        vmap(single), single, n, basis_rows(n, x), chunk_size=chunk_size or op.chunk_size, call=call
    )


# -- Hutchinson ---------------------------------------------------------------------------
@register_diagonal("hutchinson")
def _hutchinson(
    op: LinearOperator,
    *,
    num_matvecs: int | None,
    generator: torch.Generator | None,
    chunk_size: int | None,
    call: str,
) -> Estimate:
    m = num_matvecs or DEFAULT_MATVECS
    n = op.shape[0]
    if m >= n:
        return exact_estimate(op, chunk_size=chunk_size, call=call)
    gen = resolve_generator(generator)
    cs = min(m, chunk_size or op.chunk_size)
    num_chunks = -(-m // cs)

    def batched(ids: torch.Tensor) -> torch.Tensor:
        # One chunk of probes; only its mean and central sums (powers 2-4) are kept.
        c = min(cs, m - int(ids[0]) * cs)
        Z = rademacher(n, c, generator=gen, dtype=op.dtype, device=op.device)
        est = op._matmat(Z) * Z  # (n, c): one draw per column
        mean = est.mean(1)
        dev = est - mean.unsqueeze(1)
        sums = [(dev**p).sum(1) for p in (2, 3, 4)]
        return torch.stack([mean, *sums, torch.full_like(mean, c)]).unsqueeze(0)

    parts = map_chunks(
        batched, None, num_chunks, lambda s, e: torch.arange(s, e), chunk_size=1, call=call
    )

    # Pairwise updates of the central sums (Chan et al.; Pebay): stable, unlike raw sums.
    def group(row: torch.Tensor) -> tuple:
        mean, m2, m3, m4, count = row
        return int(count[0]), mean, m2, m3, m4

    moments = group(parts[0])
    for row in parts[1:]:
        moments = merge_moments(moments, group(row))
    count, mean, m2, m3, m4 = moments
    return from_moments(mean, m2, m3, m4, count, num_matvecs=m)


# -- XDiag ---------------------------------------------------------------------------------
@register_diagonal("xdiag")
def _xdiag(
    op: LinearOperator,
    *,
    num_matvecs: int | None,
    generator: torch.Generator | None,
    chunk_size: int | None,
    call: str,
) -> Estimate:
    m = num_matvecs or DEFAULT_MATVECS
    s = m // 2
    if s < 2:
        fail(call, f"xdiag needs num_matvecs >= 4 (two sketches of at least 2 columns), got {m}.")
    n = op.shape[0]
    if m >= n:
        return exact_estimate(op, chunk_size=chunk_size, call=call)
    gen = resolve_generator(generator)
    Om = rademacher(n, s, generator=gen, dtype=op.dtype, device=op.device)
    Y = _products(op, Om, chunk_size, call)
    Q, R = torch.linalg.qr(Y)
    Z = op._rmatmat(Q) if not op.is_symmetric else _products(op, Q, chunk_size, call)
    draws = _xdiag_draws(Om, Y, Q, R, Z)
    value = draws.mean(0)
    # NOTE [calibrated intervals]: the leave-one-out draws share all but one sketch
    # column, so their spread alone understates the error; the pair term of
    # exchangeable_stderr needs every draw recomputed without each of g columns.
    # (g^2 n numbers: g shrinks for large n to keep them within ~256 MiB.)
    g = max(2, min(s, MAX_PAIRS_COLUMNS, math.isqrt(2**25 // n)))
    without = draws.new_zeros(g, g, n)
    for j in range(g):
        keep = torch.arange(s, device=Y.device) != j
        Qk, Rk = torch.linalg.qr(Y[:, keep])
        Zk = Z @ (Q.T @ Qk)  # A^T Q_k = A^T Q (Q^T Q_k): range(Q_k) lies in range(Q)
        row = draws.new_zeros(s, n)
        row[keep] = _xdiag_draws(Om[:, keep], Y[:, keep], Qk, Rk, Zk)
        without[j] = row[:g]
    stderr, dof = exchangeable_stderr(draws, without)
    return Estimate(value=value, stderr=stderr, num_matvecs=2 * s, dof=dof)


def _xdiag_draws(
    Om: torch.Tensor, Y: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, Z: torch.Tensor
) -> torch.Tensor:
    """XDiag's ``(s, n)`` leave-one-out estimates from ``Y = A Om = Q R`` and ``Z = A^T Q``."""
    s = R.shape[0]
    # A rank-deficient sketch (rank(A) < s) gives R a (near-)zero pivot; its
    # downdate direction then lies outside range(A) and contributes nothing, as in
    # exact arithmetic, as long as the triangular solve stays finite.
    d = R.diagonal()
    floor = torch.finfo(R.dtype).eps * d.abs().max().clamp_min(torch.finfo(R.dtype).tiny)
    R = R - torch.diag(d) + torch.diag(torch.where(d.abs() < floor, floor, d))
    eye = torch.eye(s, dtype=R.dtype, device=R.device)
    S = torch.linalg.solve_triangular(R, eye, upper=True).T  # R^{-T}
    S = S / torch.linalg.vector_norm(S, dim=0, keepdim=True)
    T = Z.T @ Om
    QS, ZS = Q @ S, Z @ S
    base = (Q * Z).sum(1)  # diag(Q Q^T A)
    # Leave-one-out estimators (one per sketch column), each unbiased:
    # diag(Q_(i) Q_(i)^T A) + w_i * (A - Q_(i) Q_(i)^T A) w_i.
    sst = (S * T).sum(0)  # diag(S^T T)
    return (base.unsqueeze(1) - QS * ZS + Om * (Y - Q @ T + QS * sst)).T


# -- Monte-Carlo GGN / Fisher diagonals ---------------------------------------------------
def _sampler(op: _OuterProductOperator, call: str, generator: torch.Generator | None, m: int):
    if isinstance(op.curvature, PlainLoss):
        fail(
            call,
            "sampled labels need a loss with a known output Hessian; this operator's loss has "
            "none. Use method='exact' or pass output_hessian= when building the operator.",
            NotImplementedError,
        )
    gen = generator if generator is not None else torch.Generator(op.device).manual_seed(0)
    if gen.device != op.device:
        fail(call, f"expected a generator on {op.device}, got one on {gen.device}.", ValueError)
    # One seed from the caller's generator, then one stream per batch keyed by the batch's
    # (global) index: the draws do not depend on the order or the process that visits a
    # batch, so a data-parallel operator reproduces the single-process estimate exactly.
    seed = stream_seed(gen)

    def sample(index: int, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return op.curvature.sample(output, targets, keyed_generator(seed, index, op.device), m)

    return sample


@register_diagonal("mc", _OuterProductOperator)
def _mc(
    op: _OuterProductOperator, *, num_matvecs: int | None, generator, chunk_size, call: str
) -> Estimate:
    m = num_matvecs or 1
    cols = op._factor_squares(
        _sampler(op, call, generator, m), chunk_size=chunk_size, keep="column"
    )
    return from_draws(cols * m if m != 1 else cols, num_matvecs=m)


@register_diagonal("gnb", _OuterProductOperator)
def _gnb(
    op: _OuterProductOperator, *, num_matvecs: int | None, generator, call: str, **_: Any
) -> Estimate:
    m = num_matvecs or 1
    cols = op._batch_gradient_squares(_sampler(op, call, generator, m))
    return from_draws(cols * m if m != 1 else cols, num_matvecs=m)


# -- curvature backpropagation (hesse.curvprop) for model Hessians -------------------------
from hesse.curvprop._api import operator_diagonal  # noqa: E402
from hesse.operators._model import HessianOperator  # noqa: E402

register_diagonal("exact", HessianOperator)(operator_diagonal("exact", fallback=_exact_basis))
register_diagonal("becker-lecun", HessianOperator)(operator_diagonal("becker-lecun"))
