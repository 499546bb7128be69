"""Exact Hessian diagonals by curvature backpropagation, against dense torch.func Hessians."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian

import hesse
from hesse.curvprop import CurvpropFallbackWarning, per_sample_diagonal
from hesse.curvprop._api import batch_diagonal

D = torch.float64


# -- references ------------------------------------------------------------------------
def dense_diagonal(model, loss_fn, x, y, params=None):
    """diag of torch.func.hessian of the loss over the flattened parameters."""
    params = params or {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    shapes = [params[k].shape for k in names]
    flat = torch.cat([params[k].reshape(-1) for k in names])

    def f(v):
        state = {k: b.clone() for k, b in model.named_buffers()}
        state.update({k: v.detach() for k, v in model.named_parameters() if k not in params})
        pieces = torch.split(v, [s.numel() for s in shapes])
        state.update({k: p.reshape(s) for k, p, s in zip(names, pieces, shapes)})
        return loss_fn(functional_call(model, state, (x,)), y)

    return torch.diagonal(hessian(f)(flat))


def flat(d: dict[str, torch.Tensor], per_sample: bool = False) -> torch.Tensor:
    if per_sample:
        return torch.cat([v.reshape(v.shape[0], -1) for v in d.values()], dim=1)
    return torch.cat([v.reshape(-1) for v in d.values()])


def engine_diagonal(model, loss_fn, x, y, **kw):
    params = {k: v for k, v in model.named_parameters()}
    return batch_diagonal(
        "test", model, loss_fn, params, x, y, method="exact", per_sample=False, **kw
    )


# -- models ------------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self, d=4, c=3):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, c)

    def forward(self, x):
        h = self.inp(x)
        h = self.norm(h + torch.tanh(self.lin(h)))
        return self.out(h)


class Attention(nn.Module):
    """Single-head self-attention block (q, k, v from one projection), mean-pooled."""

    def __init__(self, d=4, c=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 1, batch_first=True)
        self.out = nn.Linear(d, c)

    def forward(self, x):
        # need_weights=True takes the explicit softmax(q k^T) v path, which the dense
        # torch.func reference can differentiate twice (the fused CPU kernel cannot).
        h = self.attn(x, x, x, need_weights=True)[0]
        return self.out(h.mean(1))


class Twice(nn.Module):
    """Functional code that uses one weight twice (and a bias as a multiplier)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) / 2)
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.tanh(torch.nn.functional.linear(x, self.w, self.b))
        return torch.sigmoid(h @ self.w) * self.b


def mlp():
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3)
    ).to(D)


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 2, 3),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2, 3),
    ).to(D)


def cases(gen):
    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=D)

    def labels(b, c=3):
        return torch.randint(0, c, (b,), generator=gen)

    torch.manual_seed(0)
    return {
        "mlp_tanh_relu_ce": (mlp(), nn.CrossEntropyLoss(), randn(6, 4), labels(6)),
        "mlp_mse_sum": (mlp(), nn.MSELoss(reduction="sum"), randn(5, 4), randn(5, 3)),
        "cnn_pooling": (cnn(), nn.CrossEntropyLoss(), randn(3, 1, 8, 8), labels(3)),
        "residual_layernorm": (Residual().to(D), nn.CrossEntropyLoss(), randn(5, 3), labels(5)),
        "self_attention": (Attention().to(D), nn.CrossEntropyLoss(), randn(3, 5, 4), labels(3)),
        "weight_used_twice": (Twice().to(D), nn.MSELoss(), randn(5, 4), randn(5, 4)),
    }


NAMES = [
    "mlp_tanh_relu_ce",
    "mlp_mse_sum",
    "cnn_pooling",
    "residual_layernorm",
    "self_attention",
    "weight_used_twice",
]


# -- exactness -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_exact_diagonal_equals_dense(name, gen):
    model, loss_fn, x, y = cases(gen)[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvpropFallbackWarning)  # the engine, not a fallback
        got = engine_diagonal(model, loss_fn, x, y)
    ref = dense_diagonal(model, loss_fn, x, y)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("name", ["mlp_tanh_relu_ce", "self_attention", "weight_used_twice"])
def test_per_sample_diagonals_are_the_scaled_sample_hessians(name, gen):
    model, loss_fn, x, y = cases(gen)[name]
    got = per_sample_diagonal(model, loss_fn, x, y)
    b = x.shape[0]
    assert all(v.shape[0] == b for v in got.values())
    rows = flat(got, per_sample=True)
    for i in range(b):  # reduction="mean": the batch loss is (1/B) sum_b loss_b
        ref = dense_diagonal(model, loss_fn, x[i : i + 1], y[i : i + 1]) / b
        torch.testing.assert_close(rows[i], ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        rows.sum(0), dense_diagonal(model, loss_fn, x, y), rtol=0, atol=1e-12
    )


def test_parameter_subset_and_chunk_size_independence(gen):
    model, loss_fn, x, y = cases(gen)["residual_layernorm"]
    sub = {k: v for k, v in model.named_parameters() if k.startswith(("lin", "norm"))}
    ref = dense_diagonal(model, loss_fn, x, y, {k: v.detach() for k, v in sub.items()})
    per = per_sample_diagonal(model, loss_fn, x, y, params=sub, chunk_size=2)
    torch.testing.assert_close(flat({k: v.sum(0) for k, v in per.items()}), ref, rtol=0, atol=1e-12)
    one = per_sample_diagonal(model, loss_fn, x, y, params=sub, chunk_size=1)
    torch.testing.assert_close(flat(one, True), flat(per, True), rtol=0, atol=1e-14)
    assert list(per) == list(sub)


def test_batchnorm_train_mode_is_one_unit_and_leaves_buffers_alone(gen):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    x, y = torch.randn(6, 3, generator=gen, dtype=D), torch.randint(0, 2, (6,), generator=gen)
    before = model[1].running_mean.clone()
    got = engine_diagonal(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(
        got, dense_diagonal(model, nn.CrossEntropyLoss(), x, y), rtol=0, atol=1e-10
    )
    assert torch.equal(model[1].running_mean, before)
    with pytest.raises(NotImplementedError, match="does not split into per-sample terms"):
        per_sample_diagonal(model, nn.CrossEntropyLoss(), x, y)


def test_detach_stops_curvature(gen):
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = torch.tanh(self.lin(x))
            return h * h.detach()

    model = Detached().to(D)
    x, y = torch.randn(4, 3, generator=gen, dtype=D), torch.randn(4, 3, generator=gen, dtype=D)
    got = engine_diagonal(model, nn.MSELoss(), x, y)
    torch.testing.assert_close(got, dense_diagonal(model, nn.MSELoss(), x, y), rtol=0, atol=1e-12)


def test_float32(gen):
    model = mlp().float()
    x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    got = engine_diagonal(model, nn.CrossEntropyLoss(), x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, dense_diagonal(model, nn.CrossEntropyLoss(), x, y), rtol=1e-4, atol=1e-5
    )


@settings(max_examples=6, deadline=None)
@given(
    widths=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    act=st.sampled_from([nn.Tanh, nn.Sigmoid, nn.GELU, nn.Softplus, nn.ReLU]),
    seed=st.integers(0, 2**16),
)
def test_random_mlps(widths, act, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers, d = [], 3
    for w in widths:
        layers += [nn.Linear(d, w), act()]
        d = w
    model = nn.Sequential(*layers, nn.Linear(d, 2)).to(D)
    x, y = torch.randn(3, 3, generator=gen, dtype=D), torch.randint(0, 2, (3,), generator=gen)
    got = engine_diagonal(model, nn.CrossEntropyLoss(), x, y)
    ref = dense_diagonal(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


# -- the operator path ----------------------------------------------------------------------
def test_operator_exact_diagonal_uses_the_engine(gen):
    model = mlp()
    data = [
        (torch.randn(6, 4, generator=gen, dtype=D), torch.randint(0, 3, (6,), generator=gen)),
        (torch.randn(3, 4, generator=gen, dtype=D), torch.randint(0, 3, (3,), generator=gen)),
    ]
    for reduction in ("mean", "sum"):
        op = hesse.HessianOperator(model, nn.CrossEntropyLoss(reduction=reduction), data)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CurvpropFallbackWarning)
            got = hesse.diagonal(op, method="exact")
        torch.testing.assert_close(got, op.to_dense().diagonal(), rtol=0, atol=1e-12)


def test_operator_falls_back_with_a_warning(gen):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, a, b):
            return torch.tanh(self.lin(a)) * b.sum()

    model = TwoInputs().to(D)
    data = [
        (
            (torch.randn(4, 3, generator=gen, dtype=D), torch.randn(4, 2, generator=gen, dtype=D)),
            torch.randint(0, 2, (4,), generator=gen),
        )
    ]
    op = hesse.HessianOperator(model, nn.CrossEntropyLoss(), data)
    with pytest.warns(CurvpropFallbackWarning, match="one input tensor"):
        got = hesse.diagonal(op, method="exact")
    torch.testing.assert_close(got, op.to_dense().diagonal(), rtol=0, atol=1e-12)


def test_untraceable_model_falls_back(gen):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            return torch.tanh(h) if self.lin.bias.sum() > 0 else torch.sigmoid(h)

    model = Branchy().to(D)
    x, y = torch.randn(4, 3, generator=gen, dtype=D), torch.randint(0, 2, (4,), generator=gen)
    with pytest.warns(CurvpropFallbackWarning, match="tracing failed"):
        got = engine_diagonal(model, nn.CrossEntropyLoss(), x, y)
    ref = dense_diagonal(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    with pytest.warns(CurvpropFallbackWarning, match="brute-force exact diagonal"):
        per = per_sample_diagonal(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(flat({k: v.sum(0) for k, v in per.items()}), ref, rtol=0, atol=1e-12)


# -- errors --------------------------------------------------------------------------------
def test_errors(gen):
    model = mlp()
    x, y = torch.randn(4, 4, generator=gen, dtype=D), torch.randint(0, 3, (4,), generator=gen)
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="method should be one of"):
        per_sample_diagonal(model, loss, x, y, method="diag")
    with pytest.raises(TypeError, match="expected model to be a torch.nn.Module"):
        per_sample_diagonal(lambda t: t, loss, x, y)
    with pytest.raises(TypeError, match="expected inputs to be a tensor"):
        per_sample_diagonal(model, loss, [x], y)
    with pytest.raises(
        ValueError, match="leading dimension is the inputs. batch size B \\(or a multiple"
    ):
        per_sample_diagonal(model, loss, x, y[:3])
    with pytest.raises(ValueError, match="chunk_size should be a positive int"):
        per_sample_diagonal(model, loss, x, y, chunk_size=0)
    with pytest.raises(TypeError, match="expected params to be a non-empty dict"):
        per_sample_diagonal(model, loss, x, y, params={})
    with pytest.raises(TypeError, match="expected a floating-point tensor"):
        per_sample_diagonal(model, loss, x, y, params={"0.bias": torch.zeros(5, dtype=torch.long)})


def test_trace_cache_never_mixes_up_losses(gen):
    """Two lambdas in a row may share an id once the first is freed; the cache must not."""
    model = nn.Sequential(nn.Linear(3, 2)).to(D)
    x, y = torch.randn(4, 3, generator=gen, dtype=D), torch.randn(4, 2, generator=gen, dtype=D)
    for power in (2, 4, 2):
        loss = lambda o, t, k=power: ((o - t) ** k).sum()  # noqa: E731
        got = flat({k: v.sum(0) for k, v in per_sample_diagonal(model, loss, x, y).items()})
        torch.testing.assert_close(got, dense_diagonal(model, loss, x, y), rtol=0, atol=1e-10)
