"""Detected Hessian patterns: supersets on random programs, exact on known problems, errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import hesse

from . import problems as P
from ._helpers import dense_hessian_pattern

# -- random compositions of supported operators ----------------------------------------

UNARY = [
    lambda a: a.sin(),
    lambda a: a.tanh(),
    lambda a: torch.sigmoid(a),
    lambda a: a**2,
    lambda a: 2 * a + 1,
    lambda a: F.relu(a) * 3,
    lambda a: a.abs() + a,
    lambda a: a.flip(0),
    lambda a: a.roll(1),
    lambda a: a.cumsum(0),
    lambda a: a[1:] if a.numel() > 2 else a,
    lambda a: a[:-1] if a.numel() > 2 else a,
    lambda a: a.softmax(0),
    lambda a: torch.logsumexp(a, 0, keepdim=True),
    lambda a: a.sum(0, keepdim=True).expand(3),
    lambda a: torch.log(a**2 + 1),
    lambda a: a.reshape(-1, 1).expand(-1, 2).reshape(-1),
    lambda a: a[torch.arange(a.numel()).flip(0)[: max(1, a.numel() // 2)]],
    lambda a: a.amax(0, keepdim=True),
    lambda a: a.prod(0, keepdim=True),
]


def _fit(a, b):
    m = min(a.numel(), b.numel())
    return a[:m], b[:m]


BINARY = [
    lambda a, b: (lambda u, v: u + v)(*_fit(a, b)),
    lambda a, b: (lambda u, v: u * v)(*_fit(a, b)),
    lambda a, b: (lambda u, v: u - 2 * v)(*_fit(a, b)),
    lambda a, b: (lambda u, v: u / (v**2 + 1))(*_fit(a, b)),
    lambda a, b: (lambda u, v: torch.maximum(u, v))(*_fit(a, b)),
    lambda a, b: (lambda u, v: torch.where(torch.arange(u.numel()) % 2 == 0, u, v**2))(*_fit(a, b)),
    lambda a, b: torch.cat([a, b]),
    lambda a, b: (a[:, None] * b[None, :]).sum(1),
    lambda a, b: a[:, None] @ b[None, :1] @ torch.ones(1, 2, dtype=a.dtype).reshape(1, 2)[:, :1],
    lambda a, b: torch.stack(_fit(a, b)).sum(0),
    lambda a, b: (lambda u, v: F.mse_loss(u, v, reduction="none"))(*_fit(a, b)),
]


def _program(steps, n):
    def f(x):
        vals = [x]
        for kind, i, j, op in steps:
            a = vals[i % len(vals)].reshape(-1)
            if kind == 0:
                vals.append(UNARY[op % len(UNARY)](a))
            else:
                vals.append(BINARY[op % len(BINARY)](a, vals[j % len(vals)].reshape(-1)))
        return sum(v.sum() for v in vals[-2:]) + vals[-1].square().sum()

    return f


step = st.tuples(st.integers(0, 1), st.integers(0, 20), st.integers(0, 20), st.integers(0, 40))


@settings(max_examples=30, deadline=None)
@given(
    steps=st.lists(step, min_size=1, max_size=6), n=st.integers(3, 7), seed=st.integers(0, 2**16)
)
def test_random_programs_never_miss_a_nonzero(steps, n, seed):
    gen = torch.Generator().manual_seed(seed)
    f = _program(steps, n)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    detected = hesse.hessian_sparsity(f)(x).to_dense()
    truth = dense_hessian_pattern(f, x, gen, points=3)
    assert not (truth & ~detected).any()


# -- known problems: the exact pattern -------------------------------------------------


def _band(n, k):
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= k


def _grid5(m):
    i, j = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    d = (i[:, None] - i[None, :]).abs() + (j[:, None] - j[None, :]).abs()
    return d <= 1


def _arrow(n):
    p = torch.eye(n, dtype=torch.bool)
    p[0, :] = True
    p[:, 0] = True
    return p


KNOWN = [
    ("sum_sin", P.sum_sin, (7,), lambda: torch.eye(7, dtype=torch.bool)),
    ("rosenbrock", P.rosenbrock, (8,), lambda: _band(8, 1)),
    ("broyden_tridiagonal", P.broyden_tridiagonal, (8,), lambda: _band(8, 2)),
    ("bratu_5_point", P.bratu_energy, (16,), lambda: _grid5(4)),
    ("arrowhead", P.arrowhead, (6,), lambda: _arrow(6)),
    ("banded_3", P.banded(3), (10,), lambda: _band(10, 3)),
    (
        "per_sample_mlp",
        P.per_sample_mlp,
        (5, P.D_IN),
        lambda: torch.block_diag(*[torch.ones(P.D_IN, P.D_IN, dtype=torch.bool)] * 5),
    ),
]


@pytest.mark.parametrize("name,f,shape,expected", KNOWN, ids=[k[0] for k in KNOWN])
def test_known_patterns_are_exact(name, f, shape, expected, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    detected = hesse.hessian_sparsity(f)(x).to_dense()
    assert torch.equal(detected, expected())
    assert torch.equal(detected, dense_hessian_pattern(f, x, gen))


def test_pattern_is_a_sparse_bool_tensor_for_tuple_argnums(gen):
    def f(x, y):
        return (x * y[:3]).sum() + y.sin().sum()

    x = torch.randn(3, generator=gen, dtype=torch.float64)
    y = torch.randn(4, generator=gen, dtype=torch.float64)
    p = hesse.hessian_sparsity(f, argnums=(0, 1))(x, y)
    assert p.layout == torch.sparse_coo and p.dtype == torch.bool and p.shape == (7, 7)
    truth = torch.func.hessian(lambda v: f(v[:3], v[3:]))(torch.cat([x, y])) != 0
    assert torch.equal(p.to_dense(), truth)


def test_jacobian_sparsity_shape(gen):
    x = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    p = hesse.jacobian_sparsity(lambda x: x.sum(1))(x)
    assert p.shape == (2, 6) and p.to_dense().sum() == 6


def test_function_of_constants_only_has_an_empty_pattern(gen):
    w = torch.randn(3, generator=gen, dtype=torch.float64)
    p = hesse.hessian_sparsity(lambda x: (x * w).sum() + w.square().sum())(w.clone())
    assert p._nnz() == 0


# -- value-dependent control flow --------------------------------------------------------

VALUE_DEPENDENT = [
    ("branch", lambda x: x.sum() if x.sum() > 0 else (x**2).sum()),
    ("item_branch", lambda x: x.sum() if x.max().item() > 0 else x.prod()),
    ("mask_index", lambda x: x[x > 0].sum()),
]


@pytest.mark.parametrize("name,f", VALUE_DEPENDENT, ids=[v[0] for v in VALUE_DEPENDENT])
def test_value_dependent_control_flow_is_an_error(name, f, gen):
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    with pytest.raises(
        NotImplementedError,
        match=r"hesse.hessian_sparsity\(f\)\(x\): f has value-dependent control flow.*pattern=",
    ):
        hesse.hessian_sparsity(f)(x)


def test_item_used_as_a_number_is_a_constant(gen):
    # autograd treats a value read with .item() as a constant, and so does the pattern
    def f(x):
        return (x * x.max().item()).sum() + x[0] * x[1] * x.sum().item()

    x = torch.randn(3, generator=gen, dtype=torch.float64)
    detected = hesse.hessian_sparsity(f)(x).to_dense()
    assert not (dense_hessian_pattern(f, x, gen) & ~detected).any()
    assert detected[0, 1] and not detected[2, 2]


def test_untraceable_function_is_an_error(gen):
    def f(x):  # tracing has no storage to read
        return torch.tensor(x.tolist()).sum() + x.sum()

    x = torch.randn(3, generator=gen, dtype=torch.float64)
    with pytest.raises(
        NotImplementedError, match=r"hesse.hessian_sparsity\(f\)\(x\): could not trace f.*pattern="
    ):
        hesse.hessian_sparsity(f)(x)


def test_non_tensor_argument_is_a_type_error():
    with pytest.raises(
        TypeError, match=r"hesse.hessian_sparsity\(f\)\(x\): expected the differentiated argument"
    ):
        hesse.hessian_sparsity(lambda x: x)([1.0, 2.0])
