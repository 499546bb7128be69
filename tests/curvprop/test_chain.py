"""NOTE [chain fast path]: module-level exact diagonals of Linear/activation chains.

Checked in float64 to 1e-10 against the diagonal of the plain-autograd Hessian (row by
row double backward, no vmap) and against the traced engine; the cases it must hand
over (a weight used twice, BatchNorm in train mode, a custom autograd.Function, a
parameter subset, another loss) are checked to take the general path and stay exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hesse
from hesse.curvprop import _api
from hesse.curvprop._api import batch_diagonal

D = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def autograd_diagonal(model, loss_fn, x, y, params=None, per_sample=False):
    """diag of the Hessian by row-by-row double backward (per sample: one loss each)."""
    params = params or dict(model.named_parameters())
    names = list(params)
    shapes = [params[k].shape for k in names]
    flat0 = torch.cat([params[k].detach().reshape(-1) for k in names])

    def diag(xb, yb, scale):
        v = flat0.clone().requires_grad_(True)
        state = dict(
            zip(
                names,
                (c.reshape(s) for c, s in zip(torch.split(v, [s.numel() for s in shapes]), shapes)),
            )
        )
        (g,) = torch.autograd.grad(
            scale * loss_fn(functional_call(model, state, (xb,)), yb), v, create_graph=True
        )
        return torch.stack(
            [torch.autograd.grad(g[i], v, retain_graph=True)[0][i] for i in range(v.numel())]
        )

    if not per_sample:
        return diag(x, y, 1.0)
    scale = 1.0 / x.shape[0] if loss_fn.reduction == "mean" else 1.0
    sample_loss = type(loss_fn)(reduction="sum")
    old = loss_fn
    out = []
    for i in range(x.shape[0]):
        loss_fn = sample_loss
        out.append(diag(x[i : i + 1], y[i : i + 1], scale))
    loss_fn = old
    return torch.stack(out)


def mlp(act1=nn.Tanh, act2=nn.Sigmoid, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 4, bias=bias), act1(), nn.Linear(4, 4), act2(), nn.Linear(4, 3)
    ).to(D)


def data(b=6):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(b, 5, generator=gen, dtype=D), torch.randint(0, 3, (b,), generator=gen)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    original = _api.chain_diagonal

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_api, "chain_diagonal", wrapped)
    return calls


CHAINS = {  # MLPs, and CNNs (defined below)
    "mlp tanh-tanh": lambda: (mlp(nn.Tanh, nn.Tanh), data()),
    "mlp relu-sigmoid": lambda: (mlp(nn.ReLU, nn.Sigmoid), data()),
    "mlp sigmoid-relu, no bias": lambda: (mlp(nn.Sigmoid, nn.ReLU, bias=False), data()),
    "cnn tanh": lambda: (cnn(nn.Tanh), images()),
    "cnn relu": lambda: (cnn(nn.ReLU), images()),
    # residual columns meet Flatten (reshaped), a convolution (closed form) and max pooling
    "cnn pool-tanh-conv-flatten-sigmoid": lambda: (
        seeded(
            nn.Conv2d(2, 3, 3),
            nn.MaxPool2d(2),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2),
            nn.Flatten(),
            nn.Sigmoid(),
            nn.Linear(8, 3),
        ),
        images(),
    ),  # fmt: skip
}


def seeded(*layers: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*layers).to(D)


@pytest.mark.parametrize("case", list(CHAINS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_chain_matches_double_backward(spy, case, reduction, per_sample) -> None:
    model, (x, y) = CHAINS[case]()
    loss = nn.CrossEntropyLoss(reduction=reduction)
    params = dict(model.named_parameters())
    got = batch_diagonal("t", model, loss, params, x, y, method="exact", per_sample=per_sample)
    assert spy, "the chain fast path did not run"
    ref = autograd_diagonal(model, loss, x, y, per_sample=per_sample)
    torch.testing.assert_close(got, ref, **TOL)


def test_consecutive_curved_activations(spy) -> None:
    """Sigmoid then Tanh: the first one's residual columns must pass through the second."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Tanh(), nn.Linear(4, 3)).to(D)
    x, y = data()
    loss = nn.CrossEntropyLoss()
    params = dict(model.named_parameters())
    for per_sample in (False, True):
        got = batch_diagonal("t", model, loss, params, x, y, method="exact", per_sample=per_sample)
        ref = autograd_diagonal(model, loss, x, y, per_sample=per_sample)
        torch.testing.assert_close(got, ref, **TOL)
    assert len(spy) == 2


def cnn(act=nn.Tanh):
    """Strided, padded and dilated convolutions, overlapping max pooling, Flatten."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2), act(), nn.MaxPool2d(2, stride=1),
        nn.Conv2d(3, 4, 2, dilation=2, bias=act is not nn.ReLU), act(), nn.Flatten(),
        nn.Linear(4 * 1 * 1, 5), nn.Sigmoid(), nn.Linear(5, 3),
    ).to(D)  # fmt: skip


def images(b=3):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, 2, 8, 8, generator=gen, dtype=D)
    return x, torch.randint(0, 3, (b,), generator=gen)


CONV_HAND_OVER = {
    "grouped conv": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(144, 3)
    ),
    "padding='same'": lambda: nn.Sequential(
        nn.Conv2d(2, 2, 3, padding="same"), nn.Tanh(), nn.Flatten(), nn.Linear(128, 3)
    ),
    "batchnorm train": lambda: nn.Sequential(
        nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(72, 3)
    ),
    "avg pooling": lambda: nn.Sequential(
        nn.Conv2d(2, 2, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(18, 3)
    ),
}


@pytest.mark.parametrize("case", list(CONV_HAND_OVER))
def test_conv_hand_over_to_the_general_path(spy, case) -> None:
    torch.manual_seed(0)
    model, (x, y), loss = CONV_HAND_OVER[case]().to(D), images(), nn.CrossEntropyLoss()
    params = dict(model.named_parameters())
    got = batch_diagonal("t", model, loss, params, x, y, method="exact", per_sample=False)
    assert not spy, f"{case}: the chain fast path must not run"
    torch.testing.assert_close(got, autograd_diagonal(model, loss, x, y), **TOL)


def test_chain_agrees_with_the_traced_engine(monkeypatch) -> None:
    model, (x, y), loss = mlp(), data(9), nn.CrossEntropyLoss()
    op = hesse.HessianOperator(model, loss, [(x[:5], y[:5]), (x[5:], y[5:])])
    fast = hesse.diagonal(op, method="exact")
    per = hesse.per_sample_diagonal(model, loss, x, y)
    monkeypatch.setattr(_api, "_chain_fast", lambda *args: None)
    torch.testing.assert_close(fast, hesse.diagonal(op, method="exact"), **TOL)
    slow = hesse.per_sample_diagonal(model, loss, x, y)
    for k in per:
        torch.testing.assert_close(per[k], slow[k], **TOL)


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class CubeAct(nn.Module):
    def forward(self, x):
        return _Cube.apply(x)


HAND_OVER = {
    "weight used twice": lambda: (
        nn.Sequential(
            *(lambda lin: [lin, nn.Tanh(), lin])(nn.Linear(5, 5).to(D)), nn.Linear(5, 3).to(D)
        ),
        nn.CrossEntropyLoss(),
        None,
    ),
    "batchnorm train": lambda: (
        nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(D),
        nn.CrossEntropyLoss(),
        None,
    ),
    "custom Function": lambda: (
        nn.Sequential(nn.Linear(5, 4), CubeAct(), nn.Linear(4, 3)).to(D),
        nn.CrossEntropyLoss(),
        None,
    ),
    "parameter subset": lambda: (mlp(), nn.CrossEntropyLoss(), ["2.weight", "4.bias"]),
    "label smoothing": lambda: (mlp(), nn.CrossEntropyLoss(label_smoothing=0.1), None),
}


@pytest.mark.parametrize("case", list(HAND_OVER))
def test_hand_over_to_the_general_path(spy, case) -> None:
    torch.manual_seed(3)
    model, loss, subset = HAND_OVER[case]()
    x, y = data()
    params = dict(model.named_parameters())
    if subset is not None:
        params = {k: params[k] for k in subset}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the custom Function falls back to brute force
        got = batch_diagonal("t", model, loss, params, x, y, method="exact", per_sample=False)
    assert not spy, f"{case}: the chain fast path must not run"
    torch.testing.assert_close(got, autograd_diagonal(model, loss, x, y, params), **TOL)


@pytest.mark.parametrize("per_sample", [False, True])
def test_chain_in_sample_groups_agrees(spy, monkeypatch, per_sample) -> None:
    import hesse._chunking

    model, (x, y), loss = mlp(), data(7), nn.CrossEntropyLoss()
    params = dict(model.named_parameters())
    whole = batch_diagonal("t", model, loss, params, x, y, method="exact", per_sample=per_sample)
    monkeypatch.setattr(hesse._chunking, "EFFICIENT_CHUNK_BYTES", 3 * 4 * 11 * 4 * 8)  # 3 samples
    grouped = batch_diagonal("t", model, loss, params, x, y, method="exact", per_sample=per_sample)
    assert len(spy) == 2
    torch.testing.assert_close(grouped, whole, **TOL)
    torch.testing.assert_close(
        grouped, autograd_diagonal(model, loss, x, y, per_sample=per_sample), **TOL
    )


@pytest.mark.parametrize("per_sample", [False, True])
def test_conv_chain_one_sample_per_group_agrees(spy, monkeypatch, per_sample) -> None:
    import hesse._chunking

    model, (x, y), loss = cnn(), images(3), nn.CrossEntropyLoss()
    params = dict(model.named_parameters())
    monkeypatch.setattr(hesse._chunking, "EFFICIENT_CHUNK_BYTES", 1)  # groups of one sample
    got = batch_diagonal("t", model, loss, params, x, y, method="exact", per_sample=per_sample)
    assert spy
    ref = autograd_diagonal(model, loss, x, y, per_sample=per_sample)
    torch.testing.assert_close(got, ref, **TOL)
