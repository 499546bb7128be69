"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace, with error bars.

# NOTE [adaptive trace]
Each estimator is a small state that can *grow*: spend more products and refine
its estimate, reusing everything computed so far. A fixed budget is one growth
step; with ``rtol`` the driver grows in rounds (each about half of what has been
spent, so at most ~1.5x the products a perfectly informed stop would need) until
``stderr <= rtol * |value|`` or the budget is spent.

* Hutchinson: more probes.
* Hutch++: the sketch ``Q`` grows by Gram-Schmidt, so earlier deflated probes are
  updated without new products: with ``P = I - Q Q^T`` and new columns ``Q_n``,
  ``P' z = P z - Q_n (Q_n^T z)`` and ``A P' z = A P z - (A Q_n)(Q_n^T z)``.
* XTrace: the test matrix gains columns; ``Y = A Omega = Q R`` and ``A Q`` are
  extended, and the leave-one-out estimates are recomputed (``O(n s^2)`` flops,
  no products).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from hesse._estimate import MAX_PAIRS_COLUMNS, Estimate, exchangeable_stderr, from_draws
from hesse._probes import gaussian, rademacher, resolve_generator
from hesse._validation import check_choice, check_generator, fail
from hesse.operators._base import LinearOperator, keeping_graphs
from hesse.spectra._input import check_int, check_positive_float, square_operator

METHODS = ("hutch++", "hutchinson", "xtrace")


def _orthonormal_extension(
    Q: torch.Tensor, Y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``C, Q_n, R_n`` with ``Y = Q C + Q_n R_n`` and ``[Q, Q_n]`` orthonormal."""
    C = Q.T @ Y
    W = Y - Q @ C
    C2 = Q.T @ W
    W -= Q @ C2
    Qn, Rn = torch.linalg.qr(W)
    # Columns of W at rounding level normalise to directions that need one more pass.
    Qn -= Q @ (Q.T @ Qn)
    Qn = torch.linalg.qr(Qn).Q
    Rn = Qn.T @ W
    return C + C2, Qn, Rn


def _append(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``[A, B]`` by columns; ``B`` itself when ``A`` is empty (no ``n x k`` copy)."""
    return B if A.shape[1] == 0 else torch.cat([A, B], dim=1)


class _Hutchinson:
    """``mean_i z_i^T A z_i`` over Rademacher probes ``z_i``."""

    min_round = 2

    def __init__(self, op: LinearOperator, gen: torch.Generator) -> None:
        self.op, self.gen = op, gen
        self.samples = torch.zeros(0, dtype=op.dtype, device=op.device)

    def _probes(self, count: int) -> torch.Tensor:
        n = self.op.shape[0]
        return rademacher(n, count, generator=self.gen, dtype=self.op.dtype, device=self.op.device)

    def grow(self, budget: int) -> int:
        Z = self._probes(budget)
        values = (Z * self.op._matmat(Z)).sum(0)
        self.samples = torch.cat([self.samples, values])
        return budget

    def estimate(self) -> Estimate:
        return from_draws(self.samples, 0)


class _HutchPlusPlus(_Hutchinson):
    """``tr(Q^T A Q)`` exactly plus Hutchinson on ``(I - QQ^T) A (I - QQ^T)``.

    The sketch ``Q`` grows in blocks while deflation keeps paying (see NOTE
    [adaptive Hutch++ split]); the rest of the budget goes to probes.
    """

    min_round = 4

    def __init__(self, op: LinearOperator, gen: torch.Generator) -> None:
        super().__init__(op, gen)
        n = op.shape[0]
        self.Q = torch.zeros(n, 0, dtype=op.dtype, device=op.device)
        self.exact = torch.zeros((), dtype=op.dtype, device=op.device)
        self.X = torch.zeros(n, 0, dtype=op.dtype, device=op.device)  # deflated probes P z
        self.AX = torch.zeros(n, 0, dtype=op.dtype, device=op.device)  # A P z
        self.frobenius = [0.0, 0]  # sum of ||A s||^2 over Gaussian sketch columns, count
        self.captured = 0.0  # ||A Q||_F^2, exactly
        self.sketching = True

    def _deflate(self, Y: torch.Tensor) -> int:
        """Add ``range(Y)`` to the sketch and ``tr`` of the new part; returns products."""
        _, Qn, _ = _orthonormal_extension(self.Q, Y)
        AQn = self.op._matmat(Qn)
        self.exact = self.exact + (Qn * AQn).sum()
        self.captured += float((AQn * AQn).sum())
        coeff = Qn.T @ self.X
        self.X = self.X - Qn @ coeff
        self.AX = self.AX - AQn @ coeff
        self.Q = _append(self.Q, Qn)
        return Qn.shape[1]

    def grow(self, budget: int) -> int:
        # NOTE [adaptive Hutch++ split]
        # Hutch++'s fixed thirds lose to plain Hutchinson when the spectrum is flat (a
        # network Hessian's bulk): the sketch then removes little of ||A||_F and costs
        # two thirds of the products. So the sketch grows block by block, and after
        # each block the decay it bought is measured: ||A||_F^2 is estimated from all
        # Gaussian sketch products so far (E ||A s||^2 = ||A||_F^2) and ||A Q||_F^2 is
        # known exactly, so f = ||A||_F^2 - ||A Q||_F^2 estimates the remainder's
        # squared Frobenius norm (for symmetric A) before and after the block; rho is
        # their ratio. With r products left, stopping now leaves a Hutchinson variance
        # ~ 2 f / r and one more block of b ~ 2 rho f / (r - 2b): continue while
        # rho < (r - 2b) / r. Probes are drawn only after the decision, so the estimate
        # is unbiased given Q. (In the spirit of A-Hutch++: Persson, Cortinovis &
        # Kressner, 2022.)
        n = self.op.shape[0]
        b = max(2, budget // 20)
        eps = torch.finfo(self.op.dtype).eps
        spent = 0
        while self.sketching and n > self.Q.shape[1] and budget - spent >= 2 * b + 2:
            width = min(b, n - self.Q.shape[1])
            S = gaussian(n, width, generator=self.gen, dtype=self.op.dtype, device=self.op.device)
            Y = self.op._matmat(S)
            spent += width
            fresh = float(((Y - self.Q @ (self.Q.T @ Y)) ** 2).sum()) / width
            self.frobenius[0] += float((Y * Y).sum())
            self.frobenius[1] += width
            before = self.captured
            spent += self._deflate(Y)
            total = self.frobenius[0] / self.frobenius[1]
            left = budget - spent
            rho = max(total - self.captured, 0.0) / max(total - before, 1e-300)
            if fresh <= (100 * eps) ** 2 * total:
                self.sketching = False  # the new block was already in the sketch: range captured
            elif left <= 2 * b:
                self.sketching = False
            elif self.frobenius[1] >= 2 * b and rho >= (left - 2 * b) / left:
                # (not before two blocks: ||A||_F^2 from fewer samples is too noisy)
                self.sketching = False
        probes = budget - spent
        Z = self._probes(probes)
        Z -= self.Q @ (self.Q.T @ Z)
        self.X = _append(self.X, Z)
        self.AX = _append(self.AX, self.op._matmat(Z))
        self.samples = (self.X * self.AX).sum(0)
        return spent + probes

    def estimate(self) -> Estimate:
        # Given Q the deflated probes are independent (they are drawn after the sketch
        # stopped growing), so their sample variance with m - 1 degrees of freedom is
        # exactly the conditional variance of the estimate; tr(Q^T A Q) adds none.
        return from_draws(self.samples, 0, offset=self.exact)


class _XTrace:
    """Exchangeable leave-one-out Hutch++ over one Gaussian test matrix ``Omega``."""

    min_round = 4

    def __init__(self, op: LinearOperator, gen: torch.Generator) -> None:
        self.op, self.gen = op, gen
        n = op.shape[0]

        def empty(cols: int) -> torch.Tensor:
            return torch.zeros(n, cols, dtype=op.dtype, device=op.device)

        self.Omega, self.Y, self.Q, self.Z = empty(0), empty(0), empty(0), empty(0)
        self.R = torch.zeros(0, 0, dtype=op.dtype, device=op.device)

    def grow(self, budget: int) -> int:
        n = self.op.shape[0]
        cols = min(budget // 2, n - self.Q.shape[1])
        if cols <= 0:
            return 0
        s = self.Q.shape[1]
        Om = gaussian(n, cols, generator=self.gen, dtype=self.op.dtype, device=self.op.device)
        Yn = self.op._matmat(Om)
        C, Qn, Rn = _orthonormal_extension(self.Q, Yn)
        R = self.R.new_zeros(s + cols, s + cols)
        R[:s, :s] = self.R
        R[:s, s:] = C
        R[s:, s:] = Rn
        self.R = R
        self.Omega = _append(self.Omega, Om)
        self.Y = _append(self.Y, Yn)
        self.Q = _append(self.Q, Qn)
        self.Z = _append(self.Z, self.op._matmat(Qn))
        return 2 * cols

    def estimate(self) -> Estimate:
        terms = _xtrace_terms(self.Omega, self.Y, self.Q, self.R, self.Z)
        value = terms.mean()
        s = terms.numel()
        if s < 2:
            return Estimate(value, torch.full_like(value, math.nan), 0, dof=math.nan)
        # NOTE [calibrated intervals]: the leave-one-out terms share all but one column,
        # so their spread alone understates the error; the pair term of
        # exchangeable_stderr needs every term recomputed without each of g columns.
        # Every quantity is an inner product of columns of [Omega, Y, A Q], so these
        # run in the coordinates of that span (O(s^3) each, no products).
        B = torch.linalg.qr(torch.cat([self.Omega, self.Y, self.Z], dim=1)).Q
        om, y, q, z = (B.T @ M for M in (self.Omega, self.Y, self.Q, self.Z))
        g = min(s, MAX_PAIRS_COLUMNS)
        without = terms.new_zeros(g, g)
        for j in range(g):
            keep = torch.arange(s, device=y.device) != j
            qk, rk = torch.linalg.qr(y[:, keep])
            zk = z @ (q.T @ qk)  # A Q_k = A Q (Q^T Q_k): range(Q_k) lies in range(Q)
            row = terms.new_zeros(s)
            row[keep] = _xtrace_terms(om[:, keep], y[:, keep], qk, rk, zk)
            without[j] = row[:g]
        stderr, dof = exchangeable_stderr(terms, without)
        return Estimate(value, stderr, 0, dof=dof)


def _xtrace_terms(
    Om: torch.Tensor, Y: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, Z: torch.Tensor
) -> torch.Tensor:
    """XTrace's ``s`` leave-one-out Hutch++ estimates from ``Y = A Om = Q R``, ``Z = A Q``."""
    sig = torch.linalg.svdvals(R)
    W = Q.T @ Om
    floor = 10 * R.shape[0] * torch.finfo(R.dtype).eps * sig[0]
    if sig[-1] > floor:
        # Leaving column i out of Y removes the direction Q s_i, s_i ~ R^{-T} e_i,
        # from the range: Q_(i) Q_(i)^T = Q Q^T - (Q s_i)(Q s_i)^T.
        S = torch.linalg.solve_triangular(
            R.T, torch.eye(R.shape[0], dtype=R.dtype, device=R.device), upper=False
        )
        S = S / torch.linalg.vector_norm(S, dim=0)
        H = Q.T @ Z
        d = (S * W).sum(0)
        loo = torch.trace(H) - (S * (H @ S)).sum(0)
        U = Om - Q @ W + (Q @ S) * d
        AU = Y - Z @ W + (Z @ S) * d
    else:
        # Y is rank deficient: its range already holds range(A) (generically every
        # leave-one-out subset spans it too), so no direction is left out.
        Ur = torch.linalg.svd(R).U[:, sig > floor]
        Qr, Zr = Q @ Ur, Z @ Ur
        Wr = Qr.T @ Om
        loo = torch.trace(Qr.T @ Zr).expand(Om.shape[1])
        U = Om - Qr @ Wr
        AU = Y - Zr @ Wr
    return loo + (U * AU).sum(0)


_ESTIMATORS = {"hutchinson": _Hutchinson, "hutch++": _HutchPlusPlus, "xtrace": _XTrace}


@keeping_graphs
def trace(
    A: LinearOperator | torch.Tensor,
    *,
    method: str = "hutch++",
    num_matvecs: int = 100,
    rtol: float | None = None,
    generator: torch.Generator | None = None,
) -> Estimate:
    """Estimate ``tr(A)`` from matrix-vector products, with a standard error.

    Methods (``m`` = ``num_matvecs``):

    * ``"hutchinson"``: ``(1/m) sum_i z_i^T A z_i`` over Rademacher ``z_i``
      (Hutchinson, 1989). ``stderr`` = sample standard deviation / ``sqrt(m)``,
      ``m - 1`` degrees of freedom. Error ``O(||A||_F / sqrt(m))``.
    * ``"hutch++"``: a sketch ``Q = orth(A S)`` gives ``tr(Q^T A Q)`` exactly and
      Hutchinson estimates the deflated remainder ``(I - QQ^T) A (I - QQ^T)``
      (Meyer, Musco, Musco & Woodruff, 2021). Instead of the paper's fixed thirds
      the sketch grows in blocks of ``max(2, m/20)`` only while the measured decay
      of the remainder's Frobenius norm predicts a smaller final variance (NOTE
      [adaptive Hutch++ split], after A-Hutch++: Persson, Cortinovis & Kressner,
      2022): close to Hutchinson on flat spectra, ``O(1/m)`` error on decaying PSD
      ones. ``stderr`` is that of the Hutchinson part given ``Q`` (the exact part
      adds none; the probes are drawn after the sketch, so given ``Q`` they are
      independent), with (probes - 1) degrees of freedom. Exact (stderr 0) once the
      sketch holds the range.
    * ``"xtrace"``: ``m/2`` Gaussian test vectors serve as both sketch and probes;
      the estimate averages the ``m/2`` leave-one-out Hutch++ estimates (Epperly,
      Tropp & Webber, 2024). These share all but one column, so their standard
      deviation / ``sqrt(m/2)`` (the paper's error estimate) is too small at
      practical budgets (83-90 % coverage of nominal 95 % intervals measured on a
      network GGN); ``stderr`` adds their covariance, estimated without bias from
      the terms recomputed without each of up to 40 columns
      (:func:`hesse._estimate.exchangeable_stderr`), with ``m/2 - 1`` degrees of
      freedom. Exact when ``rank(A) < m/2``.

    Intervals: ``Estimate.interval(level)`` uses Student-t quantiles with the
    estimate's ``dof`` (NOTE [calibrated intervals] in ``hesse._estimate``);
    ``benchmarks/interval_coverage.py`` prints their measured coverage.

    Exact: when ``num_matvecs >= n`` the trace is computed exactly instead (``n``
    basis products, or the operator's exact diagonal path), with ``exact=True``,
    ``stderr = 0`` and ``num_matvecs = n``, whatever ``method`` and ``rtol``.

    With ``rtol`` the estimate is adaptive: products are added in rounds (reusing
    all earlier ones) until ``stderr <= rtol * |value|`` or ``num_matvecs`` are spent.
    The stopping rule makes the stopped estimate very slightly biased, as any
    sequential rule does.

    Args:
        A: a square operator or dense tensor (symmetry is not required).
        method: ``"hutch++"`` (default), ``"hutchinson"`` or ``"xtrace"``.
        num_matvecs: products to spend (the budget when ``rtol`` is given); at least
            2 for Hutchinson and 4 for the others.
        rtol: requested relative standard error, or ``None`` for a fixed budget.
        generator: source of all probes; ``None`` uses a fixed-seed generator.

    Returns:
        An :class:`~hesse.Estimate` with ``value``, ``stderr``, ``num_matvecs``,
        ``dof`` and ``exact`` (``.interval(0.95)`` gives the t interval).

    Raises:
        TypeError: bad argument types.
        ValueError: non-square ``A``, unknown ``method``, a budget below the minimum,
            a non-positive ``rtol``.

    Cost: at most ``num_matvecs`` products in a few batched calls; memory
    ``O(n * num_matvecs)`` for Hutch++/XTrace (the sketch and probes), ``O(n * m)``
    per round for Hutchinson; ``O(n s^2)`` flops for XTrace's ``s = m/2`` columns plus
    ``O(min(s, 40) s^3)`` for its error estimate.

    Example:
        >>> U = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> A = U @ U.T  # rank 3: a sketch of 4 columns captures it, the estimate is exact
        >>> est = trace(A, method="xtrace", num_matvecs=8)
        >>> bool(torch.isclose(est.value, torch.trace(A))), est.num_matvecs
        (True, 8)

    References:
        Hutchinson, M. F. (1989). A stochastic estimator of the trace of the influence
        matrix for Laplacian smoothing splines.
        Meyer, R. A., Musco, C., Musco, C. & Woodruff, D. P. (2021). Hutch++: Optimal
        stochastic trace estimation. SOSA.
        Persson, D., Cortinovis, A. & Kressner, D. (2022). Improved variants of the
        Hutch++ algorithm for trace estimation. SIAM J. Matrix Anal. Appl. 43(3).
        Epperly, E. N., Tropp, J. A. & Webber, R. J. (2024). XTrace: Making the most
        of every sample in stochastic trace estimation. SIAM J. Matrix Anal. Appl.
    """
    call = "hesse.trace(A)"
    op = square_operator(call, A)
    check_choice(call, "method", method, METHODS)
    cls = _ESTIMATORS[method]
    check_int(call, "num_matvecs", num_matvecs, 1)
    if num_matvecs < cls.min_round:
        fail(
            call,
            f"method={method!r} needs num_matvecs >= {cls.min_round} (to estimate its own "
            f"error), got {num_matvecs}.",
        )
    if rtol is not None:
        rtol = check_positive_float(call, "rtol", rtol)
    check_generator(call, generator)
    n = op.shape[0]
    if num_matvecs >= n:
        # The budget buys the exact answer: n basis products (or the operator's exact
        # diagonal path), no error.
        from hesse.estimators._diagonal import exact_estimate

        diag = exact_estimate(op, chunk_size=None, call=call)
        return Estimate(value=diag.value.sum(), stderr=diag.stderr.sum(), num_matvecs=n, exact=True)
    est = cls(op, resolve_generator(generator))
    if rtol is None:
        used = est.grow(num_matvecs)
        return replace(est.estimate(), num_matvecs=used)
    used = est.grow(min(num_matvecs, max(cls.min_round, 12)))
    result = est.estimate()
    while not result.stderr <= rtol * result.value.abs():  # (NaN: too few draws yet)
        round_budget = min(num_matvecs - used, max(cls.min_round, used // 2))
        if round_budget < cls.min_round:
            break
        spent = est.grow(round_budget)
        if spent == 0:
            break
        used += spent
        result = est.estimate()
    return replace(result, num_matvecs=used)
