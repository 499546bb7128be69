"""Spectral density by stochastic Lanczos quadrature (SLQ).

# NOTE [SLQ weights]
For a unit probe ``v`` and ``m`` Lanczos steps from it, the tridiagonal
``T = S diag(theta) S^T`` gives the Gauss quadrature of the measure
``mu_v = sum_i (u_i^T v)^2 delta(lambda_i)``: nodes ``theta_l`` and weights
``tau_l = S[0, l]^2``, the squared FIRST components of the eigenvectors of ``T``
(the first basis vector is ``v``). Any other row of ``S`` (or the rows and columns
mixed up, as PyHessian's density once did) gives a wrong measure. The rule is exact
for polynomials of degree ``< 2m``: ``sum_l tau_l theta_l^j = v^T A^j v``. Averaged
over Rademacher probes normalised to unit length, ``E[mu_v]`` is the spectral
measure ``(1/n) sum_i delta(lambda_i)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from hesse._probes import rademacher, resolve_generator
from hesse._validation import check_generator, describe, fail
from hesse.operators._base import LinearOperator, keeping_graphs
from hesse.spectra._input import check_int, check_positive_float, symmetric_operator
from hesse.spectra._timing import TimedOperator


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed spectral density; unpacks as ``(grid, density)``.

    Attributes:
        grid: ``(G,)`` increasing points.
        density: ``(G,)`` values, normalised so that the trapezoid rule on ``grid``
            integrates them to 1.
        nodes: ``(N,)`` quadrature nodes (Ritz values of every probe).
        weights: ``(N,)`` quadrature weights, summing to 1 (the unsmoothed measure).
        sigma: width of the Gaussian smoothing.
        mass: trapezoid integral over ``grid`` of the smoothed density before
            normalisation (close to 1 when the grid covers the spectrum and is fine
            enough for ``sigma``; small when it misses part of it).
        num_matvecs: operator-vector products spent.
        product_seconds: wall time spent in operator products.
        total_seconds: wall time of the whole call (NOTE [time split] in ``_timing.py``).
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    mass: float
    num_matvecs: int
    product_seconds: float = 0.0
    total_seconds: float = 0.0

    def __iter__(self) -> Any:
        return iter((self.grid, self.density))


#: Bytes the probes' Lanczos bases may hold at once (NOTE [SLQ memory]).
BASIS_BYTES = 512 * 1024**2


def _probe_groups(n: int, p: int, steps: int, itemsize: int) -> int:
    """Probes per group: all of them if their bases fit :data:`BASIS_BYTES`, else fewer.

    # NOTE [SLQ memory]
    Full reorthogonalisation needs each probe's whole basis (``n x steps``). Running
    every probe at once makes each step one batched product of ``p`` vectors, but
    holds ``n p steps`` numbers (15 GB for 4.7M float32 parameters, 10 probes and 80
    steps). So probes run in groups whose bases fit the bound, at least one probe
    at a time: memory ``O(n steps)`` per probe, with products batched within a group.
    """
    per_probe = n * steps * itemsize
    return max(1, min(p, BASIS_BYTES // max(per_probe, 1)))


def _batched_lanczos(
    op: LinearOperator, V: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """``steps`` Lanczos steps from every column of ``V`` (full reorthogonalisation).

    Probes run together in groups (NOTE [SLQ memory]); within a group each step is
    one batched product. Returns ``alpha (steps, p)``, ``beta (steps, p)``, the
    length of each probe's recurrence (shorter where it found an invariant
    subspace) and the products spent.
    """
    n, p = V.shape
    alpha = V.new_zeros(steps, p)
    beta = V.new_zeros(steps, p)
    lengths = [steps] * p
    group = _probe_groups(n, p, steps, V.element_size())
    matvecs = 0
    for start in range(0, p, group):
        stop = min(p, start + group)
        a, b, used, spent = _group_lanczos(op, V[:, start:stop], steps)
        alpha[:, start:stop], beta[:, start:stop] = a.T, b.T
        lengths[start:stop] = used
        matvecs += spent
    return alpha, beta, lengths, matvecs


def _group_lanczos(
    op: LinearOperator, V: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """Lanczos from the ``g`` columns of ``V`` at once: ``alpha, beta`` are ``(g, steps)``.

    Each probe's basis is the contiguous rows of ``basis[i]`` (``steps x n``), so its
    reorthogonalisation is two matrix-vector products per pass (two passes).
    """
    n, g = V.shape
    eps = torch.finfo(V.dtype).eps
    basis = V.new_zeros(g, steps, n)
    alpha = V.new_zeros(g, steps)
    beta = V.new_zeros(g, steps)
    lengths = [steps] * g
    active = torch.ones(g, dtype=torch.bool, device=V.device)
    v = V.T.contiguous()  # (g, n): one row per probe
    anorm = 0.0
    matvecs = 0
    for j in range(steps):
        basis[:, j] = v
        rows = active.nonzero().squeeze(1)
        if rows.numel() == g:
            w = op._matmat(v.T).T.contiguous()
        else:
            w = v.new_zeros(g, n)
            w[rows] = op._matmat(v[rows].T).T
        matvecs += rows.numel()
        alpha[:, j] = (v * w).sum(1)
        # Full reorthogonalisation of each probe's vector against its own basis, twice
        # (per probe: a batched bmm over such thin matrices runs ~5x slower than BLAS-2).
        for i in range(g):
            for _ in range(2):
                w[i].addmv_(basis[i, : j + 1].T, basis[i, : j + 1] @ w[i], alpha=-1)
        b = torch.linalg.vector_norm(w, dim=1)
        anorm = max(anorm, float(alpha[:, j].abs().max()), float(b.max()))
        # Below this the next vector is rounding noise: the probe found an invariant subspace.
        stopped = active & (b <= 1e3 * eps * anorm)
        for row in stopped.nonzero().squeeze(1).tolist():
            lengths[row] = j + 1
        active &= ~stopped
        beta[:, j] = torch.where(active, b, torch.zeros_like(b))
        if not bool(active.any()):
            break
        scale = torch.where(active, b, torch.ones_like(b))[:, None]
        v = torch.where(active[:, None], w / scale, torch.zeros_like(w))
    return alpha, beta, lengths, matvecs


@keeping_graphs
def spectral_density(
    A: LinearOperator | torch.Tensor,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: int | torch.Tensor | None = None,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    """The spectral density of a symmetric operator, by stochastic Lanczos quadrature.

    .. math:: \\phi(t) = \\frac{1}{p} \\sum_{j=1}^{p} \\sum_{l=1}^{m} \\tau_{jl}\\,
              g_\\sigma(t - \\theta_{jl}), \\qquad
              g_\\sigma(x) = \\frac{e^{-x^2 / 2\\sigma^2}}{\\sigma \\sqrt{2\\pi}}

    estimates the smoothed ``(1/n) sum_i g_sigma(t - lambda_i)``: ``theta_jl`` are the
    Ritz values of ``m`` Lanczos steps from the ``j``-th unit Rademacher probe and
    ``tau_jl`` the squared first components of the tridiagonal's eigenvectors (see
    the note at the top of this module). The ``p`` recurrences run together, one
    batched product of ``p`` vectors per step, each with full reorthogonalisation
    (in groups of fewer probes when their bases would exceed 512 MiB: NOTE [SLQ
    memory]).
    The quadrature measure (``nodes``, ``weights``) reproduces the moments
    ``v^T A^j v`` (``j < 2m``) of each probe exactly, so its moments estimate
    ``tr(A^j) / n``; smoothing adds ``sigma^2`` to the second central moment.

    Args:
        A: a symmetric operator or dense symmetric tensor.
        num_probes: number of probes ``p``.
        lanczos_steps: Lanczos steps ``m`` per probe (capped at ``n``).
        grid: evaluation points: a 1-D increasing tensor, an int number of points, or
            ``None`` for 1000 points spanning the Ritz values plus ``5 sigma`` each side.
        sigma: Gaussian width; default 1 % of the spread of the Ritz values (or 1e-3
            times their magnitude if they coincide).
        generator: source of the probes; ``None`` uses a fixed-seed generator.

    Returns:
        A :class:`SpectralDensity`; ``grid, density = spectral_density(A)`` unpacks it.
        ``density`` is normalised so that ``torch.trapezoid(density, grid) == 1``;
        ``.mass`` reports the integral before that normalisation.

    Raises:
        TypeError: bad argument types.
        ValueError: a non-square or non-symmetric ``A``, non-positive counts or
            ``sigma``, a grid that is not 1-D and increasing or misses the spectrum.

    Cost: ``p * m`` products in ``m`` batched calls per group of probes; memory
    ``n * m`` per probe of a group for its basis (full reorthogonalisation), at most
    512 MiB unless one probe needs more, plus ``G * p * m`` for the smoothing; the
    reorthogonalisation costs ``O(n m^2)`` flops per probe.

    Example:
        >>> A = torch.diag(torch.linspace(-1.0, 1.0, 50, dtype=torch.float64))
        >>> grid, density = spectral_density(A, num_probes=4, lanczos_steps=20)
        >>> round(float(torch.trapezoid(density, grid)), 6)
        1.0

    References:
        Golub, G. H. & Meurant, G. (2010). Matrices, Moments and Quadrature with
        Applications.
        Ubaru, S., Chen, J. & Saad, Y. (2017). Fast estimation of tr(f(A)) via
        stochastic Lanczos quadrature. SIAM J. Matrix Anal. Appl. 38(4).
        Ghorbani, B., Krishnan, S. & Xiao, Y. (2019). An investigation into neural net
        optimization via Hessian eigenvalue density. ICML.
    """
    call = "hesse.spectral_density(A)"
    started = time.perf_counter()
    op = symmetric_operator(call, A)
    n = op.shape[0]
    p = check_int(call, "num_probes", num_probes, 1)
    steps = min(check_int(call, "lanczos_steps", lanczos_steps, 1), n)
    if sigma is not None:
        sigma = check_positive_float(call, "sigma", sigma)
    points = None
    if grid is None or (isinstance(grid, int) and not isinstance(grid, bool)):
        points = 1000 if grid is None else check_int(call, "grid", grid, 2)
    elif isinstance(grid, torch.Tensor):
        if grid.dim() != 1 or grid.numel() < 2 or not grid.is_floating_point():
            fail(
                call,
                f"expected grid to be a 1-D float tensor of at least 2 points, got {describe(grid)}.",
            )
        if not bool((grid[1:] > grid[:-1]).all()):
            fail(call, "expected grid to be strictly increasing. Sort it first.")
        grid = grid.to(dtype=op.dtype, device=op.device)
    else:
        fail(
            call,
            f"expected grid to be None, an int or a 1-D tensor, got {describe(grid)}.",
            TypeError,
        )
    check_generator(call, generator)
    gen = resolve_generator(generator)

    V = rademacher(n, p, generator=gen, dtype=op.dtype, device=op.device) / math.sqrt(n)
    clock = TimedOperator(op)
    alpha, beta, lengths, matvecs = _batched_lanczos(clock, V, steps)
    nodes, weights = [], []
    for j, length in enumerate(lengths):
        a, b = alpha[:length, j], beta[: length - 1, j]
        T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        theta, S = torch.linalg.eigh(T)
        nodes.append(theta)
        weights.append(S[0] ** 2 / p)
    nodes_t, weights_t = torch.cat(nodes), torch.cat(weights)

    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 1e-3 * max(abs(hi), 1e-12)
    if points is not None:
        grid = torch.linspace(
            lo - 5 * sigma, hi + 5 * sigma, points, dtype=op.dtype, device=op.device
        )
    assert isinstance(grid, torch.Tensor)
    z = (grid[:, None] - nodes_t[None, :]) / sigma
    density = (torch.exp(-0.5 * z**2) @ weights_t) / (sigma * math.sqrt(2 * math.pi))
    mass = float(torch.trapezoid(density, grid))
    if not mass > 0:
        fail(
            call,
            f"the grid [{float(grid[0]):.4g}, {float(grid[-1]):.4g}] misses the spectrum "
            f"(Ritz values in [{lo:.4g}, {hi:.4g}], sigma={sigma:.3g}). Widen the grid.",
        )
    return SpectralDensity(
        grid=grid,
        density=density / mass,
        nodes=nodes_t,
        weights=weights_t,
        sigma=sigma,
        mass=mass,
        num_matvecs=matvecs,
        product_seconds=clock.seconds,
        total_seconds=time.perf_counter() - started,
    )
