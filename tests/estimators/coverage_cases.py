"""Operator families and estimators for the interval-coverage checks.

Used by ``tests/estimators/test_coverage.py`` (asserts) and ``benchmarks/interval_coverage.py``
(prints the table). Every family is a small dense symmetric matrix wrapped as a
:class:`~hesse.operators._base.DenseOperator`, so hundreds of seeds stay cheap; the
network families are the dense Hessian and GGN of a small MLP's cross-entropy, built
once (the Hessian by plain autograd double backward, the GGN from ``J^T H J`` with
``torch.func`` Jacobians), never by the estimators under test.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.func import functional_call, jacrev

import hesse
from hesse._estimate import Estimate
from hesse.operators._base import SYMMETRIC, DenseOperator
from tests.spectra.matrices import F64, rotated

#: operator products per estimate (below every family's dimension, so nothing is exact)
#: and seeds per coverage cell (more where an estimate is cheap: the coverage of 200
#: seeds has a binomial standard deviation of 1.5 points; diagonals average over
#: their ~100-180 entries as well).
BUDGETS = {
    "trace hutchinson": (24, 1000),
    "trace hutch++": (40, 200),
    "trace xtrace": (24, 200),
    "diagonal hutchinson": (24, 200),
    "diagonal xdiag": (24, 200),
}

FAMILIES = ("decaying SPD", "flat", "indefinite", "MLP Hessian", "MLP GGN")


def _run(estimator: str, A: DenseOperator, g: torch.Generator) -> Estimate:
    kind, method = estimator.split()
    m = BUDGETS[estimator][0]
    if kind == "trace":
        return hesse.trace(A, method=method, num_matvecs=m, generator=g)
    return hesse.diagonal(A, method=method, num_matvecs=m, generator=g)


ESTIMATORS = tuple(BUDGETS)


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


def coverage(
    estimator: str, name: str, seeds: int | None = None, level: float = 0.95
) -> dict[str, float]:
    """Coverage of ``level`` intervals over ``seeds`` seeds, and the bias in standard errors.

    For diagonals, coverage is averaged over the entries. ``bias_z`` is the error of
    the mean over seeds in units of its standard error: ``|z|`` for a trace, the root
    mean square of the entries' ``z`` for a diagonal (about 1 when unbiased).
    """
    A = family(name)
    op = DenseOperator(A, tags=frozenset({SYMMETRIC}))
    truth = A.diagonal() if estimator.startswith("diagonal") else A.trace()
    seeds = seeds or BUDGETS[estimator][1]
    values, covered, widths = [], [], []
    slack = 1e-10 * truth.abs().max()  # entries estimated exactly have zero width
    for seed in range(seeds):
        est = _run(estimator, op, torch.Generator().manual_seed(seed))
        assert not est.exact, f"{estimator} on {name}: the budget must stay below n"
        low, high = est.interval(level)
        covered.append(((low - slack <= truth) & (truth <= high + slack)).double().mean())
        values.append(est.value)
        widths.append((high - low).mean())
    V = torch.stack(values)
    se = V.std(0) / math.sqrt(seeds)
    z = (V.mean(0) - truth) / se.clamp_min(1e-300)
    z = torch.where(se > slack / seeds, z, 0.0)  # exactly estimated entries
    return {
        "coverage": float(torch.stack(covered).mean()),
        "bias_z": float(z.square().mean().sqrt()),
        "width": float(torch.stack(widths).mean()),
        "n": A.shape[0],
        "seeds": seeds,
        "num_matvecs": BUDGETS[estimator][0],
    }
