"""Symmetric test matrices with known spectra, and a small model's dense Hessian.

The references here never use hesse: spectra are chosen, matrices are built as
``Q diag(lambda) Q^T`` with a random orthogonal ``Q``, and the model Hessian comes
from ``torch.func.hessian``.
"""

from __future__ import annotations

import functools

import torch
from torch.func import functional_call, hessian

F64 = torch.float64


def rotated(evals: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(evals) Q^T`` with a random orthogonal ``Q`` (exactly symmetrised)."""
    n = evals.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=evals.dtype))
    A = (Q * evals) @ Q.T
    return (A + A.T) / 2


def spectrum(name: str, n: int = 120) -> torch.Tensor:
    """Named spectra: the hard cases for Lanczos."""
    g = torch.Generator().manual_seed(1)
    bulk = torch.rand(n, generator=g, dtype=F64)
    if name == "decaying":
        return 1.0 / torch.arange(1, n + 1, dtype=F64) ** 1.5
    if name == "clustered":  # top eigenvalues in two tight clusters
        top = torch.tensor([10.0, 10.0 - 1e-3, 10.0 - 2e-3, 8.0, 8.0 - 1e-3, 8.0 - 2e-3], dtype=F64)
        return torch.cat([top, bulk[6:]])
    if name == "degenerate":  # exactly repeated top eigenvalues
        return torch.cat([torch.tensor([5.0, 5.0, 5.0, 4.0, 4.0, 3.0], dtype=F64), bulk[6:]])
    if name == "negative":  # indefinite, largest magnitude negative
        return torch.linspace(-7.0, 3.0, n, dtype=F64)
    if name == "tiny_gap":  # relative eigengap 1e-7 at the top
        return torch.cat([torch.tensor([2.0, 2.0 - 2e-7, 1.5, 1.4, 1.3, 1.2], dtype=F64), bulk[6:]])
    raise KeyError(name)


SPECTRA = ("decaying", "clustered", "degenerate", "negative", "tiny_gap")


def reference_order(evals: torch.Tensor, which: str) -> torch.Tensor:
    """Eigenvalues sorted as eigsh promises for ``which``."""
    if which == "LA":
        return evals.sort(descending=True).values
    if which == "SA":
        return evals.sort().values
    return evals[evals.abs().argsort(descending=True)]


def mlp_hessian() -> torch.Tensor:
    """Dense float64 Hessian of a small tanh MLP's cross-entropy w.r.t. all its parameters."""
    return mlp_problem()[2]


@functools.cache
def mlp_problem() -> tuple[
    torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor
]:
    """(Cached: do not modify.) A tanh MLP, its data in two unequal batches, and the dense Hessian of the mean
    cross-entropy over all of it: w.r.t. every parameter and w.r.t. ``"2.weight"`` alone."""
    g = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    x = torch.randn(14, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (14,), generator=g)
    data = [(x[:9], y[:9]), (x[9:], y[9:])]
    params = dict(model.named_parameters())
    names = list(params)

    def dense(selected: list[str]) -> torch.Tensor:
        fixed = {k: v.detach() for k, v in params.items() if k not in selected}
        shapes = [params[k].shape for k in selected]
        sizes = [params[k].numel() for k in selected]

        def loss(flat: torch.Tensor) -> torch.Tensor:
            chosen = {k: t.reshape(s) for k, t, s in zip(selected, flat.split(sizes), shapes)}
            out = functional_call(model, {**fixed, **chosen}, (x,))
            return torch.nn.functional.cross_entropy(out, y)

        flat = torch.cat([params[k].detach().reshape(-1) for k in selected])
        H = hessian(loss)(flat)
        return (H + H.T) / 2

    return model, data, dense(names), dense(["2.weight"])
