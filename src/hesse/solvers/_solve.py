"""``hesse.solve``: one entry point, input checks, the true residual, failure handling."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hesse._validation import check_choice, check_generator, describe, fail
from hesse.operators._base import LinearOperator, keeping_graphs
from hesse.solvers._cg import cg
from hesse.solvers._lissa import lissa
from hesse.solvers._lsmr import lsmr
from hesse.solvers._minres import minres
from hesse.solvers._neumann import neumann
from hesse.solvers._system import Outcome, System, column_norms
from hesse.spectra._input import (
    check_int,
    check_positive_float,
    square_operator,
    symmetric_operator,
)

METHODS = ("cg", "minres", "lsmr", "neumann", "lissa")
#: deterministic methods restart from their iterate when the true residual misses the target.
_REFINABLE = ("cg", "minres", "lsmr", "neumann")
_MAX_REFINEMENTS = 3


class NotConvergedWarning(UserWarning):
    """A solve stopped before every right-hand side met its residual target."""


class NotConvergedError(RuntimeError):
    """A solve with ``on_failure="raise"`` stopped before every target was met."""


@dataclass(frozen=True)
class SolveResult:
    """The solution of ``(A + damping I) x = b`` with its certificate.

    Attributes:
        x: the solution, shaped like ``b`` (a tensor ``(n,)`` / ``(n, k)`` or a
            parameter-shaped dict).
        num_matvecs: operator-vector products spent, the final residual check
            included (a product with ``k`` columns counts ``k``; LSMR's transpose
            products count too; LiSSA counts its sampled products).
        residual_norm: the true ``||b_j - (A + damping I) x_j||`` of every right-hand
            side, recomputed from ``x`` at the end: ``()`` for one, ``(k,)`` for ``k``.
        converged: bool, shaped like ``residual_norm``: ``residual_norm <=
            max(rtol ||b_j||, atol)``.
        iterations: solver steps taken (all restarts together).
        method: the method used.
        stderr: for ``"lissa"`` with ``repeats > 1``, the standard error of every
            entry of ``x`` (shaped like ``x``); otherwise ``None``.
        estimates: for ``"lissa"`` with a tensor ``b``, the ``repeats`` independent
            estimates that ``x`` averages, ``(repeats, *b.shape)``; otherwise ``None``.
        message: why the solve stopped short (``None`` if it converged).
    """

    x: Any
    num_matvecs: int
    residual_norm: torch.Tensor
    converged: torch.Tensor
    iterations: int
    method: str
    stderr: Any = None
    estimates: torch.Tensor | None = None
    message: str | None = field(default=None)


@keeping_graphs
def solve(
    op: LinearOperator | torch.Tensor,
    b: torch.Tensor | dict,
    *,
    method: str = "cg",
    damping: float = 0.0,
    preconditioner: LinearOperator | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_matvecs: int | None = None,
    scale: float | None = None,
    depth: int | None = None,
    repeats: int = 1,
    samples: Sequence[LinearOperator] | None = None,
    generator: torch.Generator | None = None,
    on_failure: str = "warn",
) -> SolveResult:
    """Solve ``(A + damping I) x = b`` for one or several right-hand sides.

    .. math:: x_j = (A + \\lambda I)^{-1} b_j, \\qquad
              \\text{converged}_j \\iff \\|b_j - (A + \\lambda I) x_j\\| \\le
              \\max(\\mathrm{rtol}\\,\\|b_j\\|, \\mathrm{atol})

    Methods (each in its own module; see their notes):

    * ``"cg"``: block preconditioned conjugate gradients, breakdown-free (Ji & Li
      2017); all columns share one Krylov space, one batched product per step.
      Needs ``A + damping I`` symmetric positive definite.
    * ``"minres"``: MINRES (Paige & Saunders 1975) for symmetric indefinite (e.g.
      Hessians away from a minimum) or singular consistent systems; one product
      per column and step.
    * ``"lsmr"``: LSMR (Fong & Saunders 2011): any square operator with a
      transpose product, and least-squares problems; two products per step.
    * ``"neumann"``: the truncated Neumann series ``x = (1/s) sum_i (I - C/s)^i b``
      with an explicit ``scale`` ``s > lambda_max(C) / 2`` and optional ``depth``
      (terms). Needs ``C = A + damping I`` positive definite.
    * ``"lissa"``: stochastic Neumann (Agarwal et al. 2017). Explicit ``scale``,
      ``depth`` and ``repeats``; at every step one operator is drawn uniformly
      from ``samples`` (e.g. per-mini-batch curvature operators) with
      ``generator``. ``result.stderr`` is the standard error over ``repeats``.

    The solvers stop on their own residual estimates; the true residual is then
    recomputed (``k`` more products), and where a deterministic method's estimate
    met the target but the true residual did not (rounding drift), it restarts
    from its iterate (at most 3 times). An unconverged result is never returned
    quietly: ``on_failure="warn"`` warns (:class:`NotConvergedWarning`) and
    returns it, ``"raise"`` raises :class:`NotConvergedError`.

    Args:
        op: a square :class:`~hesse.LinearOperator` (``"symmetric"``-tagged for every
            method but ``"lsmr"``) or a dense matrix.
        b: ``(n,)``, ``(n, k)`` or a parameter-shaped dict (one right-hand side;
            needs an operator with a parameter layout), of the operator's dtype
            and device, finite.
        method: one of the methods above.
        damping: ``lambda >= 0`` added to the diagonal.
        preconditioner: an operator ``M ~ (A + damping I)^{-1}``, symmetric positive
            definite (e.g. a KFAC inverse, :func:`hesse.solvers.jacobi`); for
            ``"cg"``, ``"minres"`` and ``"lsmr"`` (right preconditioning).
        rtol, atol: the residual target ``max(rtol ||b_j||, atol)``.
        max_matvecs: budget of products for the iterations (default ``10 n k``;
            ``repeats * depth * k`` for ``"lissa"``).
        scale: ``s`` for ``"neumann"``/``"lissa"`` (required there).
        depth: recursion depth: required for ``"lissa"``; for ``"neumann"`` an
            optional cap on terms.
        repeats: independent LiSSA recursions averaged (``"lissa"`` only).
        samples: a sequence of operators shaped like ``op`` sampled by ``"lissa"``.
        generator: the ``torch.Generator`` LiSSA draws its samples with (required
            when ``samples`` are given).
        on_failure: ``"warn"`` or ``"raise"``.

    Returns:
        A :class:`SolveResult`.

    Raises:
        TypeError: an operator, ``b``, preconditioner, sample or generator of the
            wrong kind or dtype.
        ValueError: a non-square or (where required) non-symmetric operator, ``b``
            of the wrong shape or non-finite, a negative or non-finite damping, bad
            tolerances, budgets, scale, depth or repeats.
        NotConvergedError: with ``on_failure="raise"``, if a target was missed.

    Cost: CG about ``k sqrt(kappa)`` products (fewer for a shared space), MINRES
    similar, LSMR twice that; Neumann ``~ kappa`` products. Memory ``O(n k)`` (a
    few blocks), plus ``O(n^2)`` nothing: no matrix is formed.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> result = solve(A, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> result.x, bool(result.converged)
        (tensor([0.0909, 0.6364], dtype=torch.float64), True)

    References:
        Hestenes, M. R. & Stiefel, E. (1952). Methods of conjugate gradients for
        solving linear systems. O'Leary, D. P. (1980). The block conjugate gradient
        algorithm and related methods. Ji, H. & Li, Y. (2017). A breakdown-free
        block conjugate gradient method. BIT 57. Paige, C. C. & Saunders, M. A.
        (1975). Solution of sparse indefinite systems of linear equations. SIAM J.
        Numer. Anal. 12(4). Fong, D. C.-L. & Saunders, M. A. (2011). LSMR: an
        iterative algorithm for sparse least-squares problems. SIAM J. Sci. Comput.
        33(5). Agarwal, N., Bullins, B. & Hazan, E. (2017). Second-order stochastic
        optimization for machine learning in linear time. JMLR 18.
    """
    call = f"hesse.solve(op, b, method={method!r})"
    check_choice(call, "method", method, METHODS)
    op = (square_operator if method == "lsmr" else symmetric_operator)(call, op)
    damping = check_damping(call, damping)
    check_choice(call, "on_failure", on_failure, ("warn", "raise"))
    rtol = check_positive_float(call, "rtol", rtol)
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not 0 <= atol < math.inf:
        fail(call, f"expected atol to be a finite number >= 0, got {atol!r}.")
    B, restore = _right_hand_sides(call, op, b)
    n, k = B.shape
    M = _preconditioner(call, op, method, preconditioner)
    options = _method_options(call, op, method, scale, depth, repeats, samples, generator)
    if max_matvecs is None:
        budget = options["depth"] * options["repeats"] * k if method == "lissa" else 10 * n * k
    else:
        budget = check_int(call, "max_matvecs", max_matvecs, 1)

    system = System(op, damping, budget)
    target = torch.clamp(rtol * column_norms(B), min=float(atol))
    outcome = _run(method, system, B, target, M, options)
    X, iterations, stderr = outcome.x, outcome.iterations, outcome.stderr
    R = B - system(X)
    if method in _REFINABLE:
        for _ in range(_MAX_REFINEMENTS):
            missed = column_norms(R) > target
            if outcome.reason is not None or not bool(missed.any()):
                break
            # Correction for the columns that missed only: the others keep their x.
            outcome = _run(method, system, R[:, missed], target[missed], M, options)
            X[:, missed] += outcome.x
            iterations += outcome.iterations
            R[:, missed] = B[:, missed] - system(X[:, missed])
    residual = column_norms(R)
    converged = residual <= target
    message = None
    if not bool(converged.all()):
        worst = float((residual / column_norms(B).clamp(min=torch.finfo(B.dtype).tiny)).max())
        if outcome.reason is not None:
            reason = outcome.reason
        elif method == "lissa":
            reason = (
                "this is the residual of the LiSSA estimate (stochastic error plus truncation). "
                "Raise repeats and depth for less, or set rtol to the accuracy you need"
            )
        else:
            reason = "the solver's residual estimate met the target but the true residual did not"
        message = (
            f"{call}: {int(converged.sum())} of {k} right-hand sides reached the residual "
            f"target max(rtol={rtol:g} * ||b||, atol={atol:g}) after {system.num_matvecs} "
            f"products; largest relative residual {worst:.3g}: {reason}."
        )
        if on_failure == "raise":
            raise NotConvergedError(message)
        warnings.warn(message, NotConvergedWarning, stacklevel=2)
    squeeze = restore is not None or b.dim() == 1
    return SolveResult(
        x=_restore(X, restore, squeeze),
        num_matvecs=system.num_matvecs,
        residual_norm=residual[0] if squeeze else residual,
        converged=converged[0] if squeeze else converged,
        iterations=iterations,
        method=method,
        stderr=None if stderr is None else _restore(stderr, restore, squeeze),
        estimates=None
        if outcome.estimates is None or restore is not None
        else (outcome.estimates[..., 0] if squeeze else outcome.estimates),
        message=message,
    )


def _run(method, system, B, target, M, options) -> Outcome:
    if method == "cg":
        return cg(system, B, target, M)
    if method == "minres":
        return minres(system, B, target, M)
    if method == "lsmr":
        return lsmr(system, B, target, M)
    if method == "neumann":
        return neumann(system, B, target, scale=options["scale"], depth=options["depth"])
    return lissa(system, B, **options)


def check_damping(call: str, damping: Any) -> float:
    """``damping`` must be a finite real number ``>= 0``."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        fail(call, f"expected damping to be a number >= 0, got {describe(damping)}.", TypeError)
    if not 0 <= damping < math.inf:
        fail(
            call,
            f"expected damping >= 0 (finite), got {damping!r}. A negative damping can make "
            "A + damping I singular or indefinite; pass 0 or a positive value.",
        )
    return float(damping)


def _right_hand_sides(call: str, op: LinearOperator, b: Any):
    """``b`` as an ``(n, k)`` tensor, and the layout to restore a dict (or None)."""
    n = op.shape[0]
    layout = None
    if isinstance(b, dict):
        layout = op.layout
        if layout is None:
            fail(
                call,
                "b is a dict, but the operator has no parameter structure. Pass a flat "
                f"tensor of shape ({n},) or ({n}, k).",
                TypeError,
            )
        keys = list(layout.spec.context) if layout.spec.context is not None else list(b)
        if sorted(map(str, b)) != sorted(map(str, keys)):
            fail(call, f"expected b to have the keys {keys}, got {list(b)}.")
        for key, shape in zip(keys, layout.shapes):
            t = b[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
                fail(call, f"expected b[{key!r}] of shape {tuple(shape)}, got {describe(t)}.")
            _check_kind(call, op, t)
        B = layout.flatten({key: b[key] for key in keys}).unsqueeze(1)
    else:
        if not isinstance(b, torch.Tensor):
            fail(
                call,
                f"expected b to be a tensor of shape ({n},) or ({n}, k), or a parameter-shaped "
                f"dict, got {describe(b)}.",
                TypeError,
            )
        if b.dim() not in (1, 2) or b.shape[0] != n or (b.dim() == 2 and b.shape[1] == 0):
            fail(
                call,
                f"expected b of shape ({n},) or ({n}, k) with k >= 1, got shape "
                f"{tuple(b.shape)}. Flatten parameter vectors, or stack right-hand sides as "
                "columns.",
            )
        _check_kind(call, op, b)
        B = (b.unsqueeze(1) if b.dim() == 1 else b).clone()
    if not bool(torch.isfinite(B).all()):
        fail(
            call,
            "b has non-finite entries (inf or nan). Check the gradients or vectors you pass.",
        )
    return B.detach(), layout


def _check_kind(call: str, op: LinearOperator, t: torch.Tensor) -> None:
    if t.dtype != op.dtype:
        fail(
            call,
            f"expected b of dtype {op.dtype} (the operator's), got {t.dtype}. Cast it with "
            f".to({op.dtype}).",
            TypeError,
        )
    if t.device != op.device:
        fail(call, f"expected b on {op.device}, got it on {t.device}. Move it with .to().")


def _restore(X: torch.Tensor, layout, squeeze: bool) -> Any:
    if layout is not None:
        return layout.unflatten(X[:, 0])
    return X[:, 0] if squeeze else X


def _preconditioner(call: str, op: LinearOperator, method: str, M: Any):
    if M is None:
        return None
    if not isinstance(M, LinearOperator):
        fail(
            call,
            f"expected preconditioner to be a hesse LinearOperator approximating "
            f"(A + damping I)^-1, got {describe(M)}. Wrap a dense matrix with "
            "hesse.as_operator, or use hesse.solvers.jacobi(diagonal).",
            TypeError,
        )
    if method in ("neumann", "lissa"):
        fail(call, f"method={method!r} takes no preconditioner; use 'cg' or 'minres'.")
    if M.shape != op.shape:
        fail(call, f"expected a preconditioner of shape {op.shape}, got {M.shape}.")
    if M.dtype != op.dtype or M.device != op.device:
        fail(
            call,
            f"expected a preconditioner of dtype {op.dtype} on {op.device}, got {M.dtype} on "
            f"{M.device}.",
            TypeError,
        )
    return M._matmat


def _method_options(call, op, method, scale, depth, repeats, samples, generator) -> dict:
    stochastic = ("neumann", "lissa")
    if method not in stochastic:
        for name, value, default in (
            ("scale", scale, None),
            ("depth", depth, None),
            ("samples", samples, None),
            ("repeats", repeats, 1),
        ):
            if value is not default and value != default:
                fail(call, f"{name} applies to 'neumann' and 'lissa' only; drop it.")
        return {}
    if scale is None:
        fail(
            call,
            "scale is required: the series needs scale > lambda_max(A + damping I) / 2. "
            "Estimate lambda_max with hesse.eigsh(op, 1) and pass e.g. scale=lambda_max.",
        )
    scale = check_positive_float(call, "scale", scale)
    if method == "neumann":
        if samples is not None or repeats != 1:
            fail(call, "samples and repeats apply to method='lissa' only.")
        return {
            "scale": scale,
            "depth": None if depth is None else check_int(call, "depth", depth, 1),
        }
    if depth is None:
        fail(call, "depth is required for method='lissa' (the number of recursion steps).")
    depth = check_int(call, "depth", depth, 1)
    repeats = check_int(call, "repeats", repeats, 1)
    check_generator(call, generator)
    if samples is not None:
        if generator is None:
            fail(
                call,
                "samples are drawn at random, so a generator is required. Pass "
                "generator=torch.Generator().manual_seed(0).",
            )
        if isinstance(samples, LinearOperator) or not isinstance(samples, Sequence) or not samples:
            fail(
                call,
                f"expected samples to be a non-empty list of operators, got {describe(samples)}.",
                TypeError,
            )
        for i, s in enumerate(samples):
            if not isinstance(s, LinearOperator):
                fail(
                    call,
                    f"expected samples[{i}] to be a hesse LinearOperator, got {describe(s)}.",
                    TypeError,
                )
            if s.shape != op.shape or s.dtype != op.dtype:
                fail(
                    call,
                    f"expected samples[{i}] of shape {op.shape} and dtype {op.dtype}, got "
                    f"{s.shape} and {s.dtype}.",
                )
        samples = list(samples)
    return {
        "scale": scale,
        "depth": depth,
        "repeats": repeats,
        "samples": samples,
        "generator": generator,
    }
