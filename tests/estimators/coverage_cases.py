"""Operator families and estimators for the interval-coverage checks.

Used by ``tests/estimators/test_coverage.py`` (asserts) and ``benchmarks/coverage.py``
(prints the table). Every family is a small dense symmetric matrix wrapped as a
:class:`~hesse.operators._base.DenseOperator`, so hundreds of seeds stay cheap; the
network families are the dense Hessian and GGN of a small MLP's cross-entropy, built
once (the Hessian by plain autograd double backward, the GGN from ``J^T H J`` with
``torch.func`` Jacobians), never by the estimators under test.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch.func import functional_call, jacrev

import hesse
from hesse._estimate import Estimate
from hesse.operators._base import SYMMETRIC, DenseOperator
from tests.spectra.matrices import F64, rotated

#: operator products per estimate (below every family's dimension, so nothing is exact).
BUDGET = 24

FAMILIES = ("decaying SPD", "flat", "indefinite", "MLP Hessian", "MLP GGN")

ESTIMATORS: dict[str, Callable[[DenseOperator, torch.Generator], Estimate]] = {
    "trace hutchinson": lambda A, g: hesse.trace(
        A, method="hutchinson", num_matvecs=BUDGET, generator=g
    ),
    "trace hutch++": lambda A, g: hesse.trace(A, method="hutch++", num_matvecs=BUDGET, generator=g),
    "trace xtrace": lambda A, g: hesse.trace(A, method="xtrace", num_matvecs=BUDGET, generator=g),
    "diagonal hutchinson": lambda A, g: hesse.diagonal(
        A, method="hutchinson", num_matvecs=BUDGET, generator=g
    ),
    "diagonal xdiag": lambda A, g: hesse.diagonal(
        A, method="xdiag", num_matvecs=BUDGET, generator=g
    ),
}


@functools.cache
def mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(Cached: do not modify.) A 6-16-4 tanh MLP (180 parameters) and 48 samples."""
    g = torch.Generator().manual_seed(11)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    x = torch.randn(48, 6, generator=g, dtype=F64)
    y = torch.randint(0, 4, (48,), generator=g)
    return model, x, y


def _mlp_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    model, x, y = mlp()
    params = {k: p.detach() for k, p in model.named_parameters()}
    shapes = {k: p.shape for k, p in params.items()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k, s in shapes.items():
            out[k] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def logits(v: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflat(v), (x,))

    # Hessian: plain autograd double backward, one row per parameter.
    v = flat.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(logits(v), y), v, create_graph=True
    )
    H = torch.stack([torch.autograd.grad(grad[i], v, retain_graph=True)[0] for i in range(len(v))])
    # GGN: J^T (diag(p) - p p^T) J / N with the per-sample logit Jacobians.
    J = jacrev(logits)(flat)  # (N, C, n)
    p = torch.softmax(logits(flat), dim=1).detach()
    Hout = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    G = torch.einsum("nci,ncd,ndj->ij", J, Hout, J) / x.shape[0]
    return (H + H.T) / 2, (G + G.T) / 2


@functools.cache
def family(name: str) -> torch.Tensor:
    """(Cached: do not modify.) The dense symmetric matrix of a family."""
    n = 100
    if name == "decaying SPD":
        return rotated(1.0 / torch.arange(1, n + 1, dtype=F64), seed=2)
    if name == "flat":
        g = torch.Generator().manual_seed(3)
        return rotated(1.0 + torch.rand(n, generator=g, dtype=F64), seed=3)
    if name == "indefinite":
        return rotated(torch.linspace(-7.0, 3.0, n, dtype=F64), seed=4)
    H, G = _mlp_matrices()
    return {"MLP Hessian": H, "MLP GGN": G}[name]


def coverage(estimator: str, name: str, seeds: int, level: float = 0.95) -> dict[str, float]:
    """Coverage of ``level`` intervals over ``seeds`` seeds, and the bias in standard errors.

    For diagonals, coverage is averaged over the entries. ``bias_z`` is the mean error
    over seeds divided by its standard error (about N(0, 1) for an unbiased estimator,
    averaged in absolute value over entries for diagonals... reported as the max).
    """
    A = family(name)
    op = DenseOperator(A, tags=frozenset({SYMMETRIC}))
    truth = A.trace() if estimator.startswith("trace") else A.diagonal()
    run = ESTIMATORS[estimator]
    values, covered, widths = [], [], []
    for seed in range(seeds):
        est = run(op, torch.Generator().manual_seed(seed))
        assert not est.exact, f"{estimator} on {name}: the budget must stay below n"
        low, high = est.interval(level)
        slack = 1e-10 * truth.abs().max()  # entries estimated exactly (zero width)
        covered.append(((low - slack <= truth) & (truth <= high + slack)).double().mean())
        values.append(est.value)
        widths.append((high - low).mean())
    V = torch.stack(values)
    err = V.mean(0) - truth
    se = V.std(0) / math.sqrt(seeds)
    scale = V.std(0).clamp_min(1e-12 * truth.abs().max())
    return {
        "coverage": float(torch.stack(covered).mean()),
        "bias_z": float((err / se.clamp_min(1e-300)).abs().max()) if bool((se > 0).any()) else 0.0,
        "rel_rmse": float(((V - truth).square().mean(0).sqrt() / scale).mean()),
        "width": float(torch.stack(widths).mean()),
        "n": A.shape[0],
    }
