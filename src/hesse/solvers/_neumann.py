"""The truncated Neumann series for ``(A + damping I)^{-1} b``.

# NOTE [neumann]
For a symmetric positive definite ``C = A + damping I`` whose eigenvalues lie in
``(0, 2 scale)``,

.. math:: C^{-1} b = \\frac{1}{s} \\sum_{i \\ge 0} \\Big(I - \\frac{C}{s}\\Big)^i b,

with ``s = scale``. The partial sums follow the recursion ``h_0 = b``,
``h_{j+1} = b + (I - C/s) h_j`` and ``x_j = h_j / s``. Its residual is free:
``b - C x_j = h_{j+1} - h_j``, so each step is one product and the stopping test
costs nothing. The error contracts by ``max_i |1 - lambda_i / s|`` per step:
``scale`` just above ``lambda_max / 2`` is fastest, and small eigenvalues (or
small damping) make the series slow. A ``scale`` below ``lambda_max / 2`` makes
it diverge, which is detected (the residual grows 10^4-fold) and reported.
"""

from __future__ import annotations

import torch

from hesse.solvers._system import Outcome, System, column_norms, exhausted

#: residual growth (relative to ||b||) taken as divergence.
DIVERGED = 1e4


def diverging(scale: float) -> str:
    return (
        f"the series diverges: scale={scale:g} is below half the largest eigenvalue of "
        "A + damping I. Raise scale above lambda_max / 2 (estimate lambda_max with "
        "hesse.eigsh(op, 1))"
    )


def neumann(
    system: System,
    B: torch.Tensor,
    target: torch.Tensor,
    *,
    scale: float,
    depth: int | None,
) -> Outcome:
    """Neumann iteration from ``h_0 = b`` for at most ``depth`` products per column."""
    H = B.clone()
    bnorms = column_norms(B)
    active = bnorms > target
    steps = 0
    while bool(active.any()) and (depth is None or steps < depth):
        if not system.affords(int(active.sum())):
            return Outcome(H / scale, steps, exhausted(system))
        steps += 1
        R = B[:, active] - system(H[:, active]) / scale  # the residual of x = H / scale
        norms = column_norms(R)
        if not bool(torch.isfinite(norms).all()) or bool((norms > DIVERGED * bnorms[active]).any()):
            return Outcome(H / scale, steps, diverging(scale))
        still = norms > target[active]
        H[:, active] += torch.where(still, R, 0)
        active[active.clone()] = still
    return Outcome(H / scale, steps)
