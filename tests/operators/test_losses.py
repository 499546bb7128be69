"""Output curvature of losses against torch.func.hessian of the loss itself."""

import pytest
import torch
from torch import nn
from torch.func import hessian

from hesse.operators._losses import PlainLoss, output_curvature

N, C = 4, 3


def _cases(gen):
    f = torch.randn(N, C, generator=gen, dtype=torch.float64)
    return [
        (nn.MSELoss(), f, torch.randn(N, C, generator=gen, dtype=torch.float64)),
        (nn.MSELoss(reduction="sum"), f, torch.randn(N, C, generator=gen, dtype=torch.float64)),
        (nn.CrossEntropyLoss(), f, torch.randint(0, C, (N,), generator=gen)),
        (nn.CrossEntropyLoss(reduction="sum"), f, torch.randint(0, C, (N,), generator=gen)),
        (nn.BCEWithLogitsLoss(), f, torch.rand(N, C, generator=gen, dtype=torch.float64).round()),
        (
            nn.BCELoss(),
            torch.sigmoid(f),
            torch.rand(N, C, generator=gen, dtype=torch.float64).round(),
        ),
    ]


def _reference_blocks(loss_fn, f, y, count):
    """Per-sample blocks of the Hessian of the sum form, by torch.func.hessian."""
    scale = count if loss_fn.reduction == "mean" else 1
    H = hessian(lambda o: loss_fn(o, y) * scale)(f)  # (N, C, N, C)
    blocks = torch.stack([H[n, :, n, :] for n in range(N)])
    off = H.clone()
    for n in range(N):
        off[n, :, n, :] = 0
    assert off.abs().max() < 1e-12  # separable: block diagonal
    return blocks


@pytest.mark.parametrize("case", range(6))
def test_hessian_factor_gradient(case, gen):
    loss_fn, f, y = _cases(gen)[case]
    curv = output_curvature("t", loss_fn)
    curv.check("t", f, y)
    count = curv.count(y, N)
    assert count == (N if isinstance(loss_fn, nn.CrossEntropyLoss) else N * C)
    ref = _reference_blocks(loss_fn, f, y, count)
    V = torch.randn(N, C, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(curv.hessian_vector(f, y, V), torch.einsum("nij,nj->ni", ref, V))
    S = curv.factor(f, y)
    torch.testing.assert_close(S @ S.transpose(1, 2), ref)
    scale = count if loss_fn.reduction == "mean" else 1
    g = torch.func.grad(lambda o: loss_fn(o, y) * scale)(f)
    torch.testing.assert_close(curv.gradient(f, y), g)


@pytest.mark.parametrize("case", [0, 2, 4, 5])
def test_samples_have_the_fisher_covariance(case, gen):
    loss_fn, f, y = _cases(gen)[case]
    curv = output_curvature("t", loss_fn)
    m = 40_000
    s = curv.sample(f, y, gen, m)  # (N, C, m), scaled by 1/sqrt(m)
    cov = s @ s.transpose(1, 2)
    if isinstance(loss_fn, nn.BCELoss):
        p = f
        expect = torch.diag_embed(1 / (p * (1 - p)))
    else:
        expect = _reference_blocks(loss_fn, f, y, curv.count(y, N))
    torch.testing.assert_close(cov, expect, rtol=0.05, atol=0.05 * expect.abs().max().item())


def test_custom_output_hessian(gen):
    def loss_fn(o, y):
        return ((o - y) ** 4).sum(1).mean()

    def blocks(o, y):
        return torch.diag_embed(12 * (o - y) ** 2) / o.shape[0]

    f = torch.randn(N, C, generator=gen, dtype=torch.float64)
    y = torch.randn(N, C, generator=gen, dtype=torch.float64)
    curv = output_curvature("t", loss_fn, blocks)
    ref = _reference_blocks(
        type("L", (), {"reduction": "mean", "__call__": lambda s, o, t: loss_fn(o, t)})(), f, y, N
    )
    S = curv.factor(f, y)
    torch.testing.assert_close(S @ S.transpose(1, 2), ref)
    V = torch.randn(N, C, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(curv.hessian_vector(f, y, V), torch.einsum("nij,nj->ni", ref, V))


def test_errors(gen):
    f = torch.randn(N, C, dtype=torch.float64)
    with pytest.raises(
        NotImplementedError, match="no output Hessian is known for loss_fn of type HuberLoss"
    ):
        output_curvature("GGN", nn.HuberLoss())
    assert isinstance(output_curvature("H", nn.HuberLoss(), required=False), PlainLoss)
    with pytest.raises(ValueError, match="reduction='none'"):
        output_curvature("GGN", nn.MSELoss(reduction="none"))
    with pytest.raises(TypeError, match="expected output_hessian to be callable"):
        output_curvature("GGN", nn.MSELoss(), 3)
    with pytest.raises(ValueError, match="class-index targets of dtype torch.long"):
        output_curvature("c", nn.CrossEntropyLoss()).check("c", f, torch.zeros(N, dtype=torch.int))
    bad = output_curvature("c", nn.MSELoss(), lambda o, y: torch.zeros(N, C))
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(4, 3, 3\)"):
        bad.check("c", f, f)
    neg = output_curvature(
        "c", nn.MSELoss(), lambda o, y: -torch.eye(C, dtype=o.dtype).expand(N, C, C)
    )
    with pytest.raises(ValueError, match="negative eigenvalues"):
        neg.factor(f, f)
