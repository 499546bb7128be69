"""Structured problems whose Hessian patterns are known (shared by the sparse tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sum_sin(x):
    return x.sin().sum()


def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def broyden_tridiagonal(x):
    """Sum of squared residuals ``(3 - 2 x_i) x_i - x_{i-1} - 2 x_{i+1} + 1`` (x_0 = x_{n+1} = 0)."""
    z = F.pad(x, (1, 1))
    r = (3 - 2 * x) * x - z[:-2] - 2 * z[2:] + 1
    return (r**2).sum()


def bratu_energy(u):
    """2-D 5-point-stencil energy: 1/2 |grad u|^2 - exp(u) on a square grid (flattened)."""
    m = int(round(u.numel() ** 0.5))
    g = u.reshape(m, m)
    dx = g[1:, :] - g[:-1, :]
    dy = g[:, 1:] - g[:, :-1]
    return 0.5 * (dx**2).sum() + 0.5 * (dy**2).sum() - 0.1 * g.exp().sum()


def arrowhead(x):
    return x[0] * (x[1:] ** 2).sum() + (x**4).sum()


def banded(k):
    """Sum of fourth powers of windows of ``k + 1`` consecutive entries: bandwidth ``k``."""

    def f(x):
        w = torch.ones(1, 1, k + 1, dtype=x.dtype)
        return (F.conv1d(x.reshape(1, 1, -1), w) ** 4).sum()

    return f


_g = torch.Generator().manual_seed(3)
D_IN, HIDDEN = 4, 6
W1 = torch.randn(D_IN, HIDDEN, generator=_g, dtype=torch.float64) / 2
B1 = torch.randn(HIDDEN, generator=_g, dtype=torch.float64)
W2 = torch.randn(HIDDEN, 3, generator=_g, dtype=torch.float64) / 2
LABELS = torch.tensor([0, 2, 1, 1, 0])


def per_sample_mlp(X):
    """``sum_b loss(mlp(X[b]))`` for ``X`` of shape ``(B, D_IN)``: block diagonal Hessian."""
    h = torch.tanh(X @ W1 + B1)
    return F.cross_entropy(h @ W2, LABELS[: X.shape[0]], reduction="sum")
