"""One check per rule family: detected patterns against torch.func at random points.

``exact`` cases must match the autograd pattern entry for entry; the others must
contain it (a detected pattern may be larger, never smaller).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import hesse
from hesse.sparsity._rules import DenseRuleWarning

from ._helpers import dense_hessian_pattern, dense_jacobian_pattern

_g = torch.Generator().manual_seed(7)
W34 = torch.randn(3, 4, generator=_g, dtype=torch.float64)
W44 = torch.randn(4, 4, generator=_g, dtype=torch.float64)
K1 = torch.randn(2, 1, 3, generator=_g, dtype=torch.float64)
K2 = torch.randn(2, 1, 2, 2, generator=_g, dtype=torch.float64)
IDX = torch.tensor([4, 0, 0, 7])
Y3 = torch.tensor([0, 2, 1])


def _inplace(x):
    y = x.clone()
    y[1:] += x[:-1] ** 2
    y.mul_(2)
    return (y**2).sum()


# name, f, input shape, exact?
HESSIAN_CASES = [
    ("sin", lambda x: x.sin().sum(), (6,), True),
    (
        "exp_log_tanh",
        lambda x: (x.exp() + (x**2 + 1).log() + x.tanh() + x.sigmoid()).sum(),
        (5,),
        True,
    ),
    (
        "relu_abs_clamp",
        lambda x: (F.relu(x) + x.abs() + x.clamp(-0.5, 0.5) + F.leaky_relu(x)).sum(),
        (5,),
        True,
    ),
    ("relu_then_square", lambda x: (F.relu(x[1:] - x[:-1]) ** 2).sum(), (5,), True),
    ("mul_bilinear", lambda x: (x[:3] * x[3:]).sum(), (6,), True),
    ("mul_self", lambda x: (x * x).sum(), (4,), True),
    ("div", lambda x: (x[:3] / (x[3:] ** 2 + 1)).sum(), (6,), True),
    ("div_by_constant", lambda x: (x / 3.0).sum() + (x[0] * x[1]), (4,), True),
    (
        "pow_scalar_tensor",
        lambda x: (2.0 ** x[:2]).sum() + ((x[2:] ** 2 + 1) ** x[:2]).sum(),
        (4,),
        True,
    ),
    ("sum_dim_square", lambda x: (x.reshape(3, 4).sum(1) ** 2).sum(), (12,), True),
    (
        "mean_amax",
        lambda x: x.reshape(3, 4).mean(0).sin().sum() + x.reshape(3, 4).amax(1).sum(),
        (12,),
        True,
    ),
    ("prod", lambda x: x.reshape(2, 3).prod(1).sum(), (6,), False),  # diagonal is a superset
    ("logsumexp", lambda x: torch.logsumexp(x.reshape(3, 2), 1).sum(), (6,), True),
    ("var_std", lambda x: x.reshape(2, 3).var(1).sum() + x.reshape(3, 2).std(0).sum(), (6,), False),
    ("softmax_rows", lambda x: (x.reshape(2, 3).softmax(-1) * torch.arange(3.0)).sum(), (6,), True),
    ("log_softmax_cross_entropy", lambda x: F.cross_entropy(x.reshape(3, 3), Y3), (9,), True),
    ("mse", lambda x: F.mse_loss(x[:3], x[3:].sin()), (6,), True),
    (
        "views",
        lambda x: (x.reshape(3, 4).t().flip(0).permute(1, 0).reshape(-1)[2:9] ** 3).sum(),
        (12,),
        True,
    ),
    ("expand_broadcast", lambda x: ((x[:3, None] - x[None, 3:]) ** 2).sum(), (6,), True),
    (
        "cat_stack",
        lambda x: (torch.cat([x[:2], x[3:]]) * torch.stack([x[2:4], x[:2]]).reshape(-1)).sum(),
        (5,),
        True,
    ),
    (
        "index_gather",
        lambda x: (x[IDX] ** 2).sum() + x.reshape(2, 4).gather(1, torch.tensor([[1], [3]])).prod(),
        (8,),
        False,
    ),
    ("index_select_roll", lambda x: (x.index_select(0, IDX).roll(1) * x[:4]).sum(), (8,), True),
    (
        "scatter_add",
        lambda x: (
            torch.zeros(3, dtype=x.dtype).scatter_add(0, torch.tensor([0, 0, 2, 1]), x) ** 2
        ).sum(),
        (4,),
        True,
    ),
    (
        "pad",
        lambda x: (F.pad(x.reshape(1, 1, 4), (1, 1), value=1.0) ** 2 * torch.arange(6.0)).sum(),
        (4,),
        True,
    ),
    ("mm_constant", lambda x: torch.tanh(x.reshape(2, 3) @ W34).sum(), (6,), True),
    ("mm_bilinear", lambda x: (x[:6].reshape(2, 3) @ x[6:].reshape(3, 2)).sum(), (12,), True),
    (
        "bmm",
        lambda x: torch.bmm(x[:8].reshape(2, 2, 2), x[8:].reshape(2, 2, 2)).square().sum(),
        (16,),
        False,
    ),
    ("linear_bias", lambda x: F.linear(x.reshape(2, 4), W44, x[:4]).sin().sum(), (8,), False),
    (
        "einsum",
        lambda x: torch.einsum("ij,jk->ik", x.reshape(2, 2), x.reshape(2, 2)).sum(),
        (4,),
        True,
    ),
    ("conv1d", lambda x: torch.tanh(F.conv1d(x.reshape(1, 1, 6), K1)).sum(), (6,), True),
    ("conv2d", lambda x: F.conv2d(x.reshape(1, 1, 3, 3), K2, padding=1).square().sum(), (9,), True),
    (
        "where_maximum",
        lambda x: (
            torch.where(x[:3] > 0, x[:3] ** 2, x[3:]) + torch.maximum(x[:3], x[3:]) ** 2
        ).sum(),
        (6,),
        False,
    ),
    ("layer_norm", lambda x: F.layer_norm(x.reshape(2, 3), (3,)).square().sum(), (6,), True),
    (
        "layer_norm_affine",
        lambda x: F.layer_norm(x[:6].reshape(2, 3), (3,), x[6:9], x[9:]).sum(),
        (12,),
        False,
    ),
    (
        "batch_norm_train",
        lambda x: F.batch_norm(x.reshape(4, 2), None, None, training=True).square().sum(),
        (8,),
        True,
    ),
    (
        "batch_norm_eval",
        lambda x: (
            F.batch_norm(
                x.reshape(4, 2),
                torch.zeros(2, dtype=x.dtype),
                torch.ones(2, dtype=x.dtype),
                training=False,
            )
            .square()
            .sum()
        ),
        (8,),
        True,
    ),
    ("group_norm", lambda x: F.group_norm(x.reshape(2, 4, 2), 2).pow(3).sum(), (16,), True),
    ("max_pool", lambda x: F.max_pool2d(x.reshape(1, 1, 4, 4), 2).square().sum(), (16,), False),
    (
        "avg_pool",
        lambda x: F.avg_pool2d(x.reshape(1, 1, 4, 4), 2, padding=1).square().sum(),
        (16,),
        True,
    ),
    ("constant_and_detach", lambda x: (x * W34[0, :2]).sum() + (x.detach() * x).sum(), (2,), True),
    ("inplace", _inplace, (5,), True),
    (
        "sort_topk",
        lambda x: (x.sort().values * torch.arange(5.0)).sum() + x.topk(2).values.square().sum(),
        (5,),
        False,
    ),
    ("cumsum", lambda x: x.cumsum(0).square().sum(), (4,), True),
    ("dead_elements", lambda x: (x**2)[:3].sum() + x[3:].sum(), (5,), True),
]


@pytest.mark.parametrize("name,f,shape,exact", HESSIAN_CASES, ids=[c[0] for c in HESSIAN_CASES])
def test_hessian_rule(name, f, shape, exact, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseRuleWarning)
        detected = hesse.hessian_sparsity(f)(x).to_dense()
    truth = dense_hessian_pattern(f, x, gen)
    assert not (truth & ~detected).any(), f"{name}: the pattern misses a nonzero"
    if exact:
        assert torch.equal(detected, truth), f"{name}: pattern is not exact"
    assert torch.equal(detected, detected.T)


JACOBIAN_CASES = [
    ("stencil", lambda x: x[2:] - 2 * x[1:-1] + x[:-2], (6,), True),
    ("broadcast_mm", lambda x: x.reshape(2, 3) @ W34[:, :2] + x[:2], (6,), True),
    ("softmax", lambda x: x.reshape(2, 3).softmax(1), (6,), True),
    (
        "reductions",
        lambda x: torch.stack([x.reshape(2, 3).sum(1), x.reshape(2, 3).amax(1)]),
        (6,),
        False,
    ),
    ("comparison_is_constant", lambda x: x * (x > -100), (4,), True),
]


@pytest.mark.parametrize("name,f,shape,exact", JACOBIAN_CASES, ids=[c[0] for c in JACOBIAN_CASES])
def test_jacobian_rule(name, f, shape, exact, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    detected = hesse.jacobian_sparsity(f)(x).to_dense()
    truth = dense_jacobian_pattern(f, x, gen)
    assert not (truth & ~detected).any(), name
    if exact:
        assert torch.equal(detected, truth), name


def test_unknown_operator_is_dense_with_a_warning(gen):
    def f(x):
        return torch.linalg.inv(x.reshape(2, 2) + 3 * torch.eye(2, dtype=x.dtype)).sum()

    x = torch.randn(4, generator=gen, dtype=torch.float64)
    with pytest.warns(DenseRuleWarning, match="no rule for aten.linalg_inv_ex"):
        detected = hesse.hessian_sparsity(f)(x).to_dense()
    assert detected.all()
    assert not (dense_hessian_pattern(f, x, gen) & ~detected).any()


def test_value_dependent_index_is_conservative(gen):
    def f(x):
        return (x[x.argsort()][:2] ** 2).sum()

    x = torch.randn(4, generator=gen, dtype=torch.float64)
    detected = hesse.hessian_sparsity(f)(x).to_dense()
    assert not (dense_hessian_pattern(f, x, gen, points=5) & ~detected).any()


def test_detached_values_are_unknown_not_zero(gen):
    # an index computed from x.detach() depends on x's values: the rule must not
    # evaluate it (with placeholder zeros) as if it were a constant
    def f(x):
        i = (x.detach().abs() * 100).long() % 4
        return (x[i] ** 2).sum()

    x = torch.randn(4, generator=gen, dtype=torch.float64)
    detected = hesse.hessian_sparsity(f)(x).to_dense()
    assert not (dense_hessian_pattern(f, x, gen, points=6) & ~detected).any()
    assert detected.diagonal().all()
