"""Index assignment and constant masks keep patterns exact (issue: ``g[i] = v`` densified).

Every case is compared entry for entry with the union of ``torch.func.hessian``'s nonzeros
at random points; a value-dependent mask must stay a superset.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import hesse

from ._helpers import dense_hessian_pattern


def _loop_fill(y):
    g = torch.zeros(y.numel() - 1, dtype=y.dtype)
    for i in range(y.numel() - 1):
        g[i] = y[i] * y[i + 1]
    return (g**2).sum()


def _slice_assign(y):
    g = torch.zeros_like(y)
    g[1:] = y[:-1] * y[1:]
    g[0] = y[0] ** 3
    return (g**2).sum()


def _masked_fill(y):
    m = torch.arange(y.numel()) % 3 == 0
    return (y.masked_fill(m, 1.0) ** 3).sum() + (y.exp() * y).masked_fill(~m, 0.0).sum()


def _where_constant(y):
    m = torch.arange(y.numel()) < 3
    z = torch.where(m, y.sin(), y.roll(1) * y)
    return (z**2).sum()


def _index_put(y):
    g = torch.zeros(4, dtype=y.dtype)
    g = g.index_put((torch.tensor([0, 2]),), y[:2] * y[1:3])
    return (g**3).sum() + (y[4:] ** 2).sum()


def _index_put_accumulate(y):
    g = torch.zeros(3, dtype=y.dtype)
    g = g.index_put((torch.tensor([0, 0, 2]),), y[:3] ** 2, accumulate=True)
    return (g.exp()).sum()


def _scatter(y):
    g = torch.zeros(6, dtype=y.dtype).scatter(0, torch.tensor([1, 3, 5]), y[:3] * y[3:])
    return (g**2).sum()


def _select_slice_scatter(y):
    g = torch.zeros(3, 2, dtype=y.dtype)
    g = torch.select_scatter(g, y[:2] * y[2:4], 0, 1)
    g = torch.slice_scatter(g, (y[4:6] ** 2).reshape(1, 2), 0, 2, 3)
    return (g.sin()).sum()


def _setitem_2d(y):
    g = y.new_zeros(3, 3)
    g[0, 1] = y[0] * y[1]
    g[2] = y[2:5]
    g[:, 0] += y[5]
    return (g**2).sum()


def _value_mask(y):  # the mask depends on y: both branches may be read
    return torch.where(y > 0, y.roll(1) * y, y**2).sum()


CASES = [
    ("loop_fill", _loop_fill, 7),
    ("slice_assign", _slice_assign, 6),
    ("masked_fill", _masked_fill, 7),
    ("where_constant", _where_constant, 6),
    ("index_put", _index_put, 6),
    ("index_put_accumulate", _index_put_accumulate, 4),
    ("scatter", _scatter, 6),
    ("select_slice_scatter", _select_slice_scatter, 6),
    ("setitem_2d", _setitem_2d, 6),
]


@pytest.mark.parametrize("name,f,n", CASES, ids=[c[0] for c in CASES])
def test_assignment_patterns_are_exact(name, f, n, gen):
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    detected = hesse.hessian_sparsity(f)(x).to_dense()
    assert torch.equal(detected, dense_hessian_pattern(f, x, gen))


def test_loop_fill_is_tridiagonal_not_dense(gen):
    x = torch.randn(30, generator=gen, dtype=torch.float64)
    P = hesse.hessian_sparsity(_loop_fill)(x)
    assert P._nnz() == 30 + 2 * 29  # a dense pattern would hold 900


def test_value_dependent_mask_stays_a_superset(gen):
    x = torch.randn(6, generator=gen, dtype=torch.float64)
    detected = hesse.hessian_sparsity(_value_mask)(x).to_dense()
    i = torch.arange(6)
    assert torch.equal(
        detected, ((i[:, None] - i[None, :]) % 6 <= 1) | ((i[None] - i[:, None]) % 6 <= 1)
    )


ASSIGN = [
    lambda g, a, k: g.index_put((torch.tensor([k % g.numel()]),), a[:1]),
    lambda g, a, k: g.masked_fill(torch.arange(g.numel()) % (k % 3 + 2) == 0, 0.5),
    lambda g, a, k: torch.where(torch.arange(g.numel()) < k % g.numel(), g, a[: g.numel()] ** 2),
    lambda g, a, k: g.scatter(0, torch.tensor([k % g.numel()]), a[:1] * g[:1]),
    lambda g, a, k: torch.slice_scatter(g, a[: g.numel() - k % g.numel()], 0, k % g.numel()),
]


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 9), st.integers(0, 3)), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_random_assignments_never_miss_a_nonzero(steps, seed):
    gen = torch.Generator().manual_seed(seed)

    def f(x):
        g = x.sin()
        a = x * x.roll(1)
        for kind, k, u in steps:
            g = ASSIGN[kind](g, a if u else F.softplus(a), k)
            g = g * x if u == 3 else g
        return (g**3).sum() + (g[1:] * g[:-1]).sum()

    x = torch.randn(6, generator=gen, dtype=torch.float64)
    detected = hesse.hessian_sparsity(f)(x).to_dense()
    assert not (dense_hessian_pattern(f, x, gen) & ~detected).any()


MASK = torch.tensor([True, False, True, False, True, False])
MASK_2D = torch.tensor([[True, False], [False, True], [True, True]])


def _constant_mask_read_write(x):
    g = x.clone()
    g[MASK] = x[MASK] ** 2 * x[1]
    return (g**2).sum()


def _constant_mask_2d(x):
    X = x.reshape(3, 2)
    return (X[MASK_2D] ** 3).sum() + X[MASK_2D][:2].prod()


@pytest.mark.parametrize("f", [_constant_mask_read_write, _constant_mask_2d])
def test_captured_boolean_masks_index_exactly(f, gen):
    # NOTE [constant masks]: a captured mask is a constant, not a value-dependent shape
    x = torch.randn(6, generator=gen, dtype=torch.float64)
    detected = hesse.hessian_sparsity(f)(x).to_dense()
    assert torch.equal(detected, dense_hessian_pattern(f, x, gen))
    H = hesse.sparse_hessian(f)(x).to_dense()
    assert torch.allclose(H, torch.func.hessian(f)(x), rtol=0, atol=1e-12)


def test_a_mask_computed_from_the_input_is_still_value_dependent(gen):
    x = torch.randn(6, generator=gen, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="value-dependent control flow"):
        hesse.hessian_sparsity(lambda x: x[x > 0].sum())(x)
