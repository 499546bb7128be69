"""Classic unconstrained test problems, written here from their published formulas.

Moré, Garbow & Hillstrom (1981), "Testing unconstrained optimization software", ACM TOMS
7(1) (``mgh_*``), and the CUTEst collection's SIF problem descriptions (Gould, Orban &
Toint 2015; problem names in capitals), with 0-based indices. Each entry is
``(name, f, n)``; ``n`` is small so that a dense reference Hessian is cheap. The sparse
tests check that detected patterns contain every nonzero and that sparse Hessians equal
dense ones.
"""

from __future__ import annotations

import math

import torch


def _i(n, x, start=1):
    """The 1-based indices ``start..n`` as a float tensor like ``x``."""
    return torch.arange(start, n + 1, dtype=x.dtype)


# -- Moré, Garbow & Hillstrom (1981) ------------------------------------------------------


def mgh_extended_rosenbrock(x):  # (21)
    a, b = x[0::2], x[1::2]
    return ((10 * (b - a**2)) ** 2 + (1 - a) ** 2).sum()


def mgh_extended_powell(x):  # (22)
    a, b, c, d = x[0::4], x[1::4], x[2::4], x[3::4]
    return ((a + 10 * b) ** 2 + 5 * (c - d) ** 2 + (b - 2 * c) ** 4 + 10 * (a - d) ** 4).sum()


def mgh_penalty_1(x):  # (23)
    return (1e-5 * (x - 1) ** 2).sum() + ((x**2).sum() - 0.25) ** 2


def mgh_variably_dimensioned(x):  # (25)
    s = (_i(x.numel(), x) * (x - 1)).sum()
    return ((x - 1) ** 2).sum() + s**2 + s**4


def mgh_trigonometric(x):  # (26)
    n = x.numel()
    r = n - x.cos().sum() + _i(n, x) * (1 - x.cos()) - x.sin()
    return (r**2).sum()


def mgh_brown_almost_linear(x):  # (27)
    n = x.numel()
    r = x[:-1] + x.sum() - (n + 1)
    return (r**2).sum() + (x.prod() - 1) ** 2


def mgh_discrete_boundary_value(x):  # (28)
    n = x.numel()
    h = 1 / (n + 1)
    t = _i(n, x) * h
    z = torch.nn.functional.pad(x, (1, 1))
    r = 2 * x - z[:-2] - z[2:] + h**2 * (x + t + 1) ** 3 / 2
    return (r**2).sum()


def mgh_discrete_integral_equation(x):  # (29)
    n = x.numel()
    h = 1 / (n + 1)
    t = _i(n, x) * h
    c = (x + t + 1) ** 3
    lower = torch.cumsum(t * c, 0)  # sum_{j <= i} t_j c_j
    upper = torch.flip(torch.cumsum(torch.flip((1 - t) * c, [0]), 0), [0])  # sum_{j >= i}
    r = x + h / 2 * ((1 - t) * lower + t * (upper - (1 - t) * c))
    return (r**2).sum()


def mgh_broyden_tridiagonal(x):  # (30)
    z = torch.nn.functional.pad(x, (1, 1))
    r = (3 - 2 * x) * x - z[:-2] - 2 * z[2:] + 1
    return (r**2).sum()


def mgh_broyden_banded(x):  # (31): J_i = {j != i : i - 5 <= j <= i + 1}
    n = x.numel()
    z = torch.nn.functional.pad(x, (5, 1))
    s = sum(z[5 + k : 5 + k + n] * (1 + z[5 + k : 5 + k + n]) for k in (-5, -4, -3, -2, -1, 1))
    r = x * (2 + 5 * x**2) + 1 - s
    return (r**2).sum()


def mgh_linear_full_rank(x):  # (32), m = n
    n = x.numel()
    r = x - 2 / n * x.sum() - 1
    return (r**2).sum()


def mgh_beale(x):  # (5)
    y = torch.tensor([1.5, 2.25, 2.625], dtype=x.dtype)
    k = torch.arange(1, 4, dtype=x.dtype)
    return ((y - x[0] * (1 - x[1] ** k)) ** 2).sum()


def mgh_freudenstein_roth(x):  # (2)
    a = -13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1]
    b = -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1]
    return a**2 + b**2


def mgh_powell_badly_scaled(x):  # (3)
    return (1e4 * x[0] * x[1] - 1) ** 2 + ((-x[0]).exp() + (-x[1]).exp() - 1.0001) ** 2


def mgh_brown_badly_scaled(x):  # (4)
    return (x[0] - 1e6) ** 2 + (x[1] - 2e-6) ** 2 + (x[0] * x[1] - 2) ** 2


def mgh_wood(x):  # (14)
    return (
        100 * (x[1] - x[0] ** 2) ** 2
        + (1 - x[0]) ** 2
        + 90 * (x[3] - x[2] ** 2) ** 2
        + (1 - x[2]) ** 2
        + 10 * (x[1] + x[3] - 2) ** 2
        + 0.1 * (x[1] - x[3]) ** 2
    )


def mgh_box_3d(x):  # (12), m = 10
    t = 0.1 * torch.arange(1, 11, dtype=x.dtype)
    r = (-t * x[0]).exp() - (-t * x[1]).exp() - x[2] * ((-t).exp() - (-10 * t).exp())
    return (r**2).sum()


def mgh_brown_dennis(x):  # (16), m = 20
    t = torch.arange(1, 21, dtype=x.dtype) / 5
    r = (x[0] + t * x[1] - t.exp()) ** 2 + (x[2] + x[3] * t.sin() - t.cos()) ** 2
    return (r**2).sum()


def mgh_gaussian(x):  # (9), m = 15
    y = torch.tensor(
        [9e-4, 44e-4, 175e-4, 540e-4, 1295e-4, 2420e-4, 3521e-4, 3989e-4]
        + [3521e-4, 2420e-4, 1295e-4, 540e-4, 175e-4, 44e-4, 9e-4],
        dtype=x.dtype,
    )
    t = (7 - torch.arange(1, 16, dtype=x.dtype)) / 2
    return ((x[0] * (-x[1] * (t - x[2]) ** 2 / 2).exp() - y) ** 2).sum()


# -- CUTEst ---------------------------------------------------------------------------------


def ARWHEAD(x):
    return (-4 * x[:-1] + 3).sum() + ((x[:-1] ** 2 + x[-1] ** 2) ** 2).sum()


def BDQRTIC(x):
    n = x.numel()
    m = n - 4
    q = x[:m] ** 2 + 2 * x[1 : m + 1] ** 2 + 3 * x[2 : m + 2] ** 2 + 4 * x[3 : m + 3] ** 2
    return ((-4 * x[:m] + 3) ** 2).sum() + ((q + 5 * x[-1] ** 2) ** 2).sum()


def BROYDN7D(x):
    n = x.numel()
    z = torch.nn.functional.pad(x, (1, 1))
    r = (3 - 2 * x) * x - z[:-2] - z[2:] + 1
    h = n // 2
    return (r.abs() ** (7 / 3)).sum() + ((x[:h] + x[h : 2 * h]).abs() ** (7 / 3)).sum()


def SPARSINE(x):
    n = x.numel()
    i = torch.arange(1, n + 1)
    s = x.sin()
    total = s.clone()
    for k in (2, 3, 5, 7, 11):
        total = total + s[(k * i - 1) % n]
    return 0.5 * (i.to(x.dtype) * total**2).sum()


def _dixmaan(alpha, beta, gamma, delta, k1, k2, k3, k4):
    def f(x):
        n = x.numel()
        m = n // 3
        r = _i(n, x) / n
        return (
            1
            + (alpha * x**2 * r**k1).sum()
            + (beta * x[:-1] ** 2 * (x[1:] + x[1:] ** 2) ** 2 * r[:-1] ** k2).sum()
            + (gamma * x[: 2 * m] ** 2 * x[m : 3 * m] ** 4 * r[: 2 * m] ** k3).sum()
            + (delta * x[:m] * x[2 * m : 3 * m] * r[:m] ** k4).sum()
        )

    return f


_DIXMAAN = {
    "A": (1, 0, 0.125, 0.125, 0, 0, 0, 0),
    "B": (1, 0.0625, 0.0625, 0.0625, 0, 0, 0, 0),
    "C": (1, 0.125, 0.125, 0.125, 0, 0, 0, 0),
    "D": (1, 0.26, 0.26, 0.26, 0, 0, 0, 0),
    "E": (1, 0, 0.125, 0.125, 1, 0, 0, 1),
    "F": (1, 0.0625, 0.0625, 0.0625, 1, 0, 0, 1),
    "G": (1, 0.125, 0.125, 0.125, 1, 0, 0, 1),
    "H": (1, 0.26, 0.26, 0.26, 1, 0, 0, 1),
    "I": (1, 0, 0.125, 0.125, 2, 0, 0, 2),
    "J": (1, 0.0625, 0.0625, 0.0625, 2, 0, 0, 2),
    "K": (1, 0.125, 0.125, 0.125, 2, 0, 0, 2),
    "L": (1, 0.26, 0.26, 0.26, 2, 0, 0, 2),
}


def LIARWHD(x):
    return (4 * (x**2 - x[0]) ** 2 + (x - 1) ** 2).sum()


def NONDQUAR(x):
    return (x[0] - x[1]) ** 2 + ((x[:-2] + x[1:-1] + x[-1]) ** 4).sum() + (x[-2] + x[-1]) ** 2


def INDEF(x):
    return x.sum() + 0.5 * (2 * x[1:-1] - x[-1] - x[0]).cos().sum()


def FLETCBV3(x):
    n = x.numel()
    p, h, k = 1e-8, 1 / (n + 1), 1.0
    return (
        0.5 * p * (x[0] ** 2 + ((x[:-1] - x[1:]) ** 2).sum() + x[-1] ** 2)
        - p * (h**2 + 2) / h**2 * x.sum()
        - k * p / h**2 * x.cos().sum()
    )


def CRAGGLVY(x):
    a, b, c, d = x[0:-2:2], x[1:-2:2], x[2::2], x[3::2]
    m = min(len(a), len(b), len(c), len(d))
    a, b, c, d = a[:m], b[:m], c[:m], d[:m]
    return (
        (a.exp() - b) ** 4 + 100 * (b - c) ** 6 + ((c - d).tan() + c - d) ** 4 + a**8 + (d - 1) ** 2
    ).sum()


def TRIDIA(x):
    i = _i(x.numel(), x, start=2)
    return (x[0] - 1) ** 2 + (i * (2 * x[1:] - x[:-1]) ** 2).sum()


def EDENSCH(x):
    a, b = x[:-1], x[1:]
    return 16 + ((a - 2) ** 4 + (a * b - 2 * b) ** 2 + (b + 1) ** 2).sum()


def DQDRTIC(x):
    return (x[:-2] ** 2 + 100 * x[1:-1] ** 2 + 100 * x[2:] ** 2).sum()


def QUARTC(x):
    return ((x - _i(x.numel(), x)) ** 4).sum()


def ENGVAL1(x):
    return ((x[:-1] ** 2 + x[1:] ** 2) ** 2 + (-4 * x[:-1] + 3)).sum()


def COSINE(x):
    return (-0.5 * x[1:] + x[:-1] ** 2).cos().sum()


def TQUARTIC(x):
    return (x[0] - 1) ** 2 + ((x[0] ** 2 - x[1:] ** 2) ** 2).sum()


def FREUROTH(x):
    a, b = x[:-1], x[1:]
    return ((-13 + a + ((5 - b) * b - 2) * b) ** 2 + (-29 + a + ((b + 1) * b - 14) * b) ** 2).sum()


def SCHMVETT(x):
    a, b, c = x[:-2], x[1:-1], x[2:]
    return -(
        1 / (1 + (a - b) ** 2) + ((math.pi * b + c) / 2).sin() + (-(((a + c) / b - 2) ** 2)).exp()
    ).sum()


def NONDIA(x):
    return (x[0] - 1) ** 2 + (100 * (x[0] - x[:-1] ** 2) ** 2).sum()


def DIXON3DQ(x):
    return (x[0] - 1) ** 2 + ((x[1:-1] - x[2:]) ** 2).sum() + (x[-1] - 1) ** 2


def GENHUMPS(x):
    a, b = x[:-1], x[1:]
    return ((2 * a).sin() ** 2 * (2 * b).sin() ** 2 + 0.05 * (a**2 + b**2)).sum()


def EG2(x):
    return (x[0] + x[:-1] ** 2 - 1).sin().sum() + 0.5 * (x[-1] ** 2).sin()


def FLETCHCR(x):
    return (100 * (x[1:] - x[:-1] + 1 - x[:-1] ** 2) ** 2).sum()


def _setitem_residuals(x):
    """Residuals filled element by element (``r[i] = ...``), a common way to write them."""
    n = x.numel()
    r = x.new_zeros(n - 1)
    for i in range(n - 1):
        r[i] = x[i] * x[i + 1] - 1
    return (r**2).sum()


PROBLEMS = [
    ("mgh_extended_rosenbrock", mgh_extended_rosenbrock, 12),
    ("mgh_extended_powell", mgh_extended_powell, 12),
    ("mgh_penalty_1", mgh_penalty_1, 8),
    ("mgh_variably_dimensioned", mgh_variably_dimensioned, 8),
    ("mgh_trigonometric", mgh_trigonometric, 8),
    ("mgh_brown_almost_linear", mgh_brown_almost_linear, 8),
    ("mgh_discrete_boundary_value", mgh_discrete_boundary_value, 12),
    ("mgh_discrete_integral_equation", mgh_discrete_integral_equation, 8),
    ("mgh_broyden_tridiagonal", mgh_broyden_tridiagonal, 12),
    ("mgh_broyden_banded", mgh_broyden_banded, 14),
    ("mgh_linear_full_rank", mgh_linear_full_rank, 8),
    ("mgh_beale", mgh_beale, 2),
    ("mgh_freudenstein_roth", mgh_freudenstein_roth, 2),
    ("mgh_powell_badly_scaled", mgh_powell_badly_scaled, 2),
    ("mgh_brown_badly_scaled", mgh_brown_badly_scaled, 2),
    ("mgh_wood", mgh_wood, 4),
    ("mgh_box_3d", mgh_box_3d, 3),
    ("mgh_brown_dennis", mgh_brown_dennis, 4),
    ("mgh_gaussian", mgh_gaussian, 3),
    ("ARWHEAD", ARWHEAD, 12),
    ("BDQRTIC", BDQRTIC, 12),
    ("BROYDN7D", BROYDN7D, 12),
    ("SPARSINE", SPARSINE, 13),
    *[(f"DIXMAAN{k}", _dixmaan(*p), 12) for k, p in _DIXMAAN.items()],
    ("LIARWHD", LIARWHD, 12),
    ("NONDQUAR", NONDQUAR, 12),
    ("INDEF", INDEF, 12),
    ("FLETCBV3", FLETCBV3, 12),
    ("CRAGGLVY", CRAGGLVY, 12),
    ("TRIDIA", TRIDIA, 12),
    ("EDENSCH", EDENSCH, 12),
    ("DQDRTIC", DQDRTIC, 12),
    ("QUARTC", QUARTC, 12),
    ("ENGVAL1", ENGVAL1, 12),
    ("COSINE", COSINE, 12),
    ("TQUARTIC", TQUARTIC, 12),
    ("FREUROTH", FREUROTH, 12),
    ("SCHMVETT", SCHMVETT, 12),
    ("NONDIA", NONDIA, 12),
    ("DIXON3DQ", DIXON3DQ, 12),
    ("GENHUMPS", GENHUMPS, 12),
    ("EG2", EG2, 12),
    ("FLETCHCR", FLETCHCR, 12),
    ("setitem_residuals", _setitem_residuals, 12),
]
