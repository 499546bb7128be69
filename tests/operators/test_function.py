"""hessian_operator: the function Hessian as an operator, against torch.func.hessian."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian

import hesse


def rosen(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def test_matches_torch_func_hessian(gen):
    x = torch.randn(6, generator=gen, dtype=torch.float64)
    H = hesse.hessian_operator(rosen)(x)
    ref = hessian(rosen)(x)
    assert H.shape == (6, 6) and H.is_symmetric and H.dtype == torch.float64
    V = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(H @ V, ref @ V)
    torch.testing.assert_close(H @ V[:, 0], ref @ V[:, 0])
    torch.testing.assert_close(H.to_dense(), ref)
    torch.testing.assert_close(H.T @ V, ref @ V)
    torch.testing.assert_close(torch.as_tensor(H.to_scipy() @ V.numpy()), ref @ V)
    torch.testing.assert_close(H.gradient, torch.func.grad(rosen)(x))


def test_chunk_size_independent(gen):
    x = torch.randn(5, generator=gen, dtype=torch.float64)
    V = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    a = hesse.hessian_operator(rosen, chunk_size=2)(x) @ V
    b = hesse.hessian_operator(rosen, chunk_size=64)(x) @ V
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_tuple_argnums_and_extra_args(gen):
    def f(x, y, c):
        return (x.sin() * y).sum() * c + (x**2).sum() * (y**3).sum()

    x = torch.randn(3, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    H = hesse.hessian_operator(f, argnums=(0, 1))(x, y.reshape(-1)[:3], 2.0)
    ref = hessian(lambda z: f(z[:3], z[3:], 2.0))(torch.cat([x, y.reshape(-1)[:3]]))
    torch.testing.assert_close(H.to_dense(), ref)


def test_dict_params_of_a_model(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(p):
        return functional_call(model, p, (X,)).square().sum()

    H = hesse.hessian_operator(loss)(params)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
    out = H @ v
    ref = hessian(loss)(params)
    for k in params:
        expect = sum(torch.tensordot(ref[k][j], v[j], dims=v[j].dim()) for j in params)
        torch.testing.assert_close(out[k], expect)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000))
def test_symmetry_property(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, generator=g, dtype=torch.float64)
    u, v = torch.randn(2, 4, generator=g, dtype=torch.float64)
    H = hesse.hessian_operator(lambda z: (z.exp() * z.roll(1)).sum() + z.prod())(x)
    torch.testing.assert_close(u @ (H @ v), v @ (H @ u))


def test_float32(gen):
    x = torch.randn(4, generator=gen)
    H = hesse.hessian_operator(rosen)(x)
    assert H.dtype == torch.float32
    torch.testing.assert_close(H.to_dense(), hessian(rosen)(x))


def test_linear_function_has_zero_hessian():
    x = torch.ones(3, dtype=torch.float64)
    H = hesse.hessian_operator(lambda z: z.sum())(x)
    assert torch.equal(H.to_dense(), torch.zeros(3, 3, dtype=torch.float64))


def test_errors():
    x = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"hesse.hessian_operator\(f\): expected f to be callable"):
        hesse.hessian_operator(3)
    with pytest.raises(ValueError, match="chunk_size should be a positive int"):
        hesse.hessian_operator(rosen, chunk_size=0)
    with pytest.raises(
        ValueError, match=r"hesse.hessian_operator\(f\)\(\*args\): expected f to return a scalar"
    ):
        hesse.hessian_operator(lambda z: z**2)(x)
    with pytest.raises(TypeError, match="Derivatives with respect to integer"):
        hesse.hessian_operator(lambda z: z.sum())(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        hesse.hessian_operator(rosen, argnums=2)(x)
    H = hesse.hessian_operator(rosen)(x)
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(3,\)"):
        H @ torch.ones(4, dtype=torch.float64)
