"""Extreme eigenpairs of a symmetric operator: thick-restart block Lanczos.

# NOTE [block Lanczos]
The basis ``V`` (``n x m``) grows by one block of ``b`` orthonormal vectors per
step. Each step multiplies the newest block by the operator (one batched product
of ``b`` columns), orthogonalises the result against the *whole* basis twice
(classical Gram-Schmidt, "twice is enough"), and records the coefficients as the
projected matrix ``T = V^T A V``. Full reorthogonalisation keeps ``V`` orthonormal
to working precision, so no spurious copies of converged eigenvalues appear and the
residual norms read off ``T`` are reliable:

.. math:: \\| A y_i - \\theta_i y_i \\| = \\| B_j s_i^{(j)} \\|

where ``B_j`` couples the newest block to the next and ``s_i^{(j)}`` is the last
block of the Ritz vector's coordinates. When the basis is full it is restarted
with the ``p`` best Ritz vectors plus the next block (thick restart; Wu & Simon,
2000): ``T`` becomes ``[[diag(theta), E^T], [E, .]]`` and the recurrence goes on.
A block that loses rank (an invariant subspace was found, or the space is
exhausted) is refilled with fresh random vectors from the caller's generator.

The basis vectors are stored as the contiguous *rows* of an ``m x n`` tensor: the
block handed to the operator is an ``(n, b)`` view whose columns are contiguous,
and each Gram-Schmidt pass and the Ritz rotation at a restart are single matrix
products (BLAS-3 for blocks). Per step the linear algebra costs four passes over
the basis (``O(n m b)`` flops, ``O(n m)`` memory, no ``n x n`` or ``n x m^2``
temporaries); the new block's singular values come from a QR of the tall block
and an SVD of its small triangular factor.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from hesse._probes import gaussian, resolve_generator
from hesse._validation import check_choice, check_generator, fail
from hesse.operators._base import LinearOperator, keeping_graphs
from hesse.spectra._input import check_int, check_positive_float, symmetric_operator
from hesse.spectra._timing import TimedOperator

WHICH = ("LA", "SA", "LM")


@dataclass(frozen=True)
class EigshResult:
    """Eigenpairs from :func:`eigsh`; unpacks as ``(eigenvalues, eigenvectors)``.

    Attributes:
        eigenvalues: ``(k,)``, in the order ``which`` implies.
        eigenvectors: ``(n, k)`` orthonormal columns, column ``i`` for ``eigenvalues[i]``.
        num_matvecs: operator-vector products spent (a block of ``b`` counts ``b``).
        residuals: ``(k,)`` residual norms ``||A v_i - lambda_i v_i||``.
        converged: ``(k,)`` bool, whether each pair met the tolerance.
        product_seconds: wall time spent in operator products.
        total_seconds: wall time of the whole call; the difference is Lanczos's own
            linear algebra (see NOTE [time split] in ``_timing.py``).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    num_matvecs: int
    residuals: torch.Tensor
    converged: torch.Tensor
    product_seconds: float = 0.0
    total_seconds: float = 0.0

    def __iter__(self) -> Any:
        return iter((self.eigenvalues, self.eigenvectors))


def _wanted(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of ``theta`` from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _orthogonalise(V: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Coefficients ``C`` (``m x b``) with rows ``W <- W - C^T V`` orthogonal to ``V``'s rows.

    Classical Gram-Schmidt twice ("twice is enough", Giraud et al. 2005), in place:
    four matrix-matrix products over the basis, no Python loop over its vectors.
    """
    C = V @ W.T
    W.addmm_(C.T, V, alpha=-1)
    C2 = V @ W.T
    W.addmm_(C2.T, V, alpha=-1)
    return C + C2


def _next_block(
    V: torch.Tensor,
    W: torch.Tensor,
    width: int,
    threshold: float,
    draw: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal rows ``Q`` (``width x n``) and ``B`` with ``W^T = Q^T B`` (up to noise).

    ``W``'s rows are already orthogonal to ``V``'s (two Gram-Schmidt passes). Its
    singular values come from a Householder QR of ``W^T`` and an SVD of the small
    ``R``, never from an SVD of the tall matrix. Directions with singular value
    below ``threshold`` are noise (an invariant subspace was reached): they are
    replaced by random vectors orthogonal to everything so far, with no coupling.
    """
    Qt, R = torch.linalg.qr(W.T)
    U, sig, Zh = torch.linalg.svd(R)
    weak = sig[:width] <= threshold
    # After two passes the rows of W overlap V by ~eps ||W||, so the normalised
    # directions overlap it by ~eps sigma_max / sigma_min: one more pass is needed
    # only for badly conditioned blocks (never for a single vector) and refills.
    if not bool(weak.any()) and float(sig[width - 1]) * 1e2 >= float(sig[0]):
        Q = (Qt @ U[:, :width]).T.contiguous()
        return Q, sig[:width, None] * Zh[:width]
    Q = (Qt @ U[:, :width]).T[~weak]
    if bool(weak.any()):
        Q = torch.cat([Q, draw(int(weak.sum())).T])
    for _ in range(2):
        _orthogonalise(V, Q)
        Q = torch.linalg.qr(Q.T).Q.T.contiguous()
    B = Q @ W.T
    if bool(weak.any()):
        B[-int(weak.sum()) :] = 0
    return Q, B


@keeping_graphs
def eigsh(
    A: LinearOperator | torch.Tensor,
    k: int = 6,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    block_size: int | None = None,
    basis_size: int | None = None,
    generator: torch.Generator | None = None,
) -> EigshResult:
    """``k`` extreme eigenvalues and eigenvectors of a symmetric operator.

    Thick-restart block Lanczos with full reorthogonalisation (see the note at the
    top of this module). Each step is one batched product with ``block_size``
    vectors, which vectorised operators evaluate much faster than ``block_size``
    single products. A pair ``(theta, y)`` has converged when

    .. math:: \\| A y - \\theta y \\| \\le \\max(\\mathrm{tol}\\,|\\theta|,\\;
              100\\,\\varepsilon\\,\\|A\\|),

    with ``||A||`` estimated by the largest Ritz value seen and ``epsilon`` the
    dtype's machine epsilon (the floor makes eigenvalues near zero reachable).
    The residual bounds the eigenvalue error: some eigenvalue lies within
    ``||A y - theta y||`` of ``theta``, so ``tol`` is the relative accuracy of the
    eigenvalues (and much better, ``residual^2 / gap``, for separated ones).

    Args:
        A: a symmetric :class:`~hesse.operators.LinearOperator` (tagged
            ``"symmetric"``) or a dense symmetric ``(n, n)`` tensor.
        k: number of eigenpairs, ``1 <= k < n``.
        which: ``"LA"`` largest algebraic (returned in descending order), ``"SA"``
            smallest algebraic (ascending), ``"LM"`` largest magnitude (by
            descending ``|lambda|``).
        tol: relative residual tolerance (above).
        max_matvecs: budget of operator-vector products; default ``100 *
            basis_size``. When it runs out the best pairs are returned with
            ``converged`` False where they missed ``tol``, and a warning.
        block_size: vectors per step (default 1, which needs the fewest products).
            A single-vector Krylov space holds only one vector of a repeated
            eigenvalue's eigenspace, so pass a block at least as large as the
            multiplicity you expect; blocks also turn each step into one batched
            product, which vectorised operators evaluate faster per vector.
        basis_size: basis vectors held before a restart; default
            ``min(n, max(2 k + 2 block_size, 30))``.
        generator: source of the random starting block (and of refills after an
            invariant subspace). ``None`` uses a fixed-seed generator.

    Returns:
        An :class:`EigshResult`; ``values, vectors = eigsh(A, k)`` unpacks it. The
        number of products spent is ``result.num_matvecs``.

    Raises:
        TypeError: ``A`` is not an operator or tensor; bad argument types.
        ValueError: a non-square or non-symmetric ``A``, ``k`` outside ``[1, n)``,
            an unknown ``which``, a non-positive ``tol`` or budget.

    Cost: ``num_matvecs`` products in steps of ``block_size``; memory
    ``n * basis_size`` for the basis plus ``n * block_size`` for one product.

    Example:
        >>> A = torch.diag(torch.arange(10.0, dtype=torch.float64))
        >>> values, vectors = eigsh(A, k=3)
        >>> values.round(decimals=8)
        tensor([9., 8., 7.], dtype=torch.float64)

    References:
        Lanczos, C. (1950). An iteration method for the solution of the eigenvalue
        problem of linear differential and integral operators.
        Golub, G. H. & Underwood, R. (1977). The block Lanczos method for computing
        eigenvalues.
        Wu, K. & Simon, H. (2000). Thick-restart Lanczos method for large symmetric
        eigenvalue problems. SIAM J. Matrix Anal. Appl. 22(2).
    """
    call = "hesse.eigsh(A, k)"
    started = time.perf_counter()
    op = symmetric_operator(call, A)
    n = op.shape[0]
    check_int(call, "k", k, 1)
    if k >= n:
        fail(
            call,
            f"expected k < n = {n}, got k={k}. For all eigenvalues use "
            "torch.linalg.eigh(A.to_dense()).",
        )
    check_choice(call, "which", which, WHICH)
    tol = check_positive_float(call, "tol", tol)
    check_generator(call, generator)
    b = 1 if block_size is None else check_int(call, "block_size", block_size, 1)
    if k + b > n:
        if block_size is not None:
            fail(call, f"expected k + block_size <= n = {n}, got k={k}, block_size={b}.")
        b = n - k
    m = (
        min(n, max(2 * k + 2 * b, 30))
        if basis_size is None
        else check_int(call, "basis_size", basis_size, 1)
    )
    if not k + b <= m <= n:
        fail(
            call,
            f"expected k + block_size <= basis_size <= n, got k={k}, block_size={b}, basis_size={m}, n={n}.",
        )
    budget = 100 * m if max_matvecs is None else check_int(call, "max_matvecs", max_matvecs, 1)
    if budget < k + b - 1:  # fewer products leave fewer than k Ritz pairs
        fail(
            call,
            f"expected max_matvecs >= k + block_size - 1 = {k + b - 1}, got {budget}. Raise "
            "the budget.",
        )
    # Ritz vectors kept at a restart: at least k, leaving room for one new block.
    keep = max(k, min(m - b, k + (m - k - b) // 2))

    gen = resolve_generator(generator)
    clock = TimedOperator(op)
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps
    V = torch.zeros(m, n, dtype=dtype, device=device)  # rows: NOTE [block Lanczos]
    T = torch.zeros(m, m, dtype=dtype, device=device)

    def draw(count: int) -> torch.Tensor:
        return gaussian(n, count, generator=gen, dtype=dtype, device=device)

    V[:b] = torch.linalg.qr(draw(b)).Q.T
    s, e = 0, b
    matvecs = 0
    anorm = 0.0
    while True:
        W = clock._matmat(V[s:e].T).T.contiguous()
        matvecs += e - s
        anorm = max(anorm, float(torch.linalg.vector_norm(W, dim=1).max()))
        C = _orthogonalise(V[:e], W)
        T[:e, s:e] = C
        T[s:e, :e] = C.T
        T[s:e, s:e] = (C[s:e] + C[s:e].T) / 2
        width = min(b, n - e)
        threshold = 100 * eps * anorm
        if width > 0:
            Q, B = _next_block(V[:e], W, width, threshold, draw)
        else:  # the basis spans the whole space: the Ritz pairs are exact
            Q, B = W[:0], W.new_zeros(0, e - s)
        theta, S = torch.linalg.eigh(T[:e, :e])
        anorm = max(anorm, float(theta.abs().max()))
        residuals = torch.linalg.vector_norm(B @ S[s:e], dim=0)
        order = _wanted(theta, which)
        top = order[:k]
        floor = 100 * eps * anorm
        converged = residuals[top] <= torch.clamp(tol * theta[top].abs(), min=floor)
        next_width = Q.shape[0]
        if (e >= k and bool(converged.all())) or next_width == 0 or matvecs + next_width > budget:
            break
        if e + next_width <= m:
            V[e : e + next_width] = Q
            s, e = e, e + next_width
            continue
        # Thick restart: the best `keep` Ritz vectors (one matrix product), then the next block.
        kept = order[:keep]
        coupling = B @ S[s:e, kept]
        V[:keep] = S[:, kept].T @ V[:e]
        V[keep : keep + next_width] = Q
        T.zero_()
        T[:keep, :keep] = torch.diag(theta[kept])
        T[keep : keep + next_width, :keep] = coupling
        T[:keep, keep : keep + next_width] = coupling.T
        s, e = keep, keep + next_width

    vectors = V[:e].T @ S[:, top]
    if not bool(converged.all()):
        warnings.warn(
            f"{call}: {int(converged.sum())} of {k} eigenpairs reached tol={tol:g} within "
            f"max_matvecs={budget}; largest relative residual "
            f"{float((residuals[top] / theta[top].abs().clamp(min=floor)).max()):.3g}. Raise "
            "max_matvecs (or basis_size) for more.",
            stacklevel=2,
        )
    return EigshResult(
        eigenvalues=theta[top].clone(),
        eigenvectors=vectors,
        num_matvecs=matvecs,
        residuals=residuals[top].clone(),
        converged=converged,
        product_seconds=clock.seconds,
        total_seconds=time.perf_counter() - started,
    )
