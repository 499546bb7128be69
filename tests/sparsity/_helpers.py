"""Dense references for sparsity tests: nonzeros of torch.func derivatives at random points.

An entry counts as nonzero when it exceeds ``1e-12`` times the largest entry: vmapped
kernels (group norm) leave rounding noise of ~1e-16 where the exact value is zero.
"""

from __future__ import annotations

import torch
from torch.func import hessian, jacrev


def dense_hessian_pattern(
    f, x: torch.Tensor, gen: torch.Generator, points: int = 3
) -> torch.Tensor:
    """Union over random points of the nonzeros of ``torch.func.hessian`` (flat, bool)."""
    n = x.numel()
    out = torch.zeros(n, n, dtype=torch.bool)
    for _ in range(points):
        p = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        H = hessian(f)(p).reshape(n, n)
        out |= H.abs() > 1e-12 * max(H.abs().max().item(), 1e-300)
    return out


def dense_jacobian_pattern(
    f, x: torch.Tensor, gen: torch.Generator, points: int = 3
) -> torch.Tensor:
    n = x.numel()
    out = None
    for _ in range(points):
        p = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        J = jacrev(lambda v: f(v).reshape(-1))(p).reshape(-1, n)
        J = J.abs() > 1e-12 * max(J.abs().max().item(), 1e-300)
        out = J if out is None else out | J
    return out
