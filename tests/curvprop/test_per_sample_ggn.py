"""``hesse.per_sample_diagonal(..., method="ggn" | "ggn-mc")`` against brute force."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hesse


def brute_per_sample_ggn(model, loss_fn, X, y) -> dict[str, torch.Tensor]:
    """``diag(J_b^T H_bb J_b)`` per sample from the full Jacobian and output Hessian.

    ``J`` is the Jacobian of the whole batch's output and ``H`` the Hessian of the
    batch loss with respect to that output (plain autograd); sample ``b`` owns the
    output rows ``b*R`` to ``b*R + R - 1``.
    """
    params = {k: p.detach() for k, p in model.named_parameters()}
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    flat0 = torch.cat([p.reshape(-1) for p in params.values()])

    def out_of(flat):
        pieces = torch.split(flat, sizes)
        p = {k: v.reshape(s) for k, v, s in zip(names, pieces, shapes)}
        return functional_call(model, p, (X,))

    f = out_of(flat0).detach()
    J = torch.autograd.functional.jacobian(lambda v: out_of(v).reshape(-1), flat0)
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(f.shape), y), f.reshape(-1))
    B = X.shape[0]
    per_row = f.numel() // B
    rows = []
    for b in range(B):
        idx = torch.arange(b * per_row, (b + 1) * per_row)
        Jb = J[idx]
        rows.append(((Jb.T @ H[idx][:, idx]) * Jb.T).sum(1))
    diag = torch.stack(rows)
    pieces = torch.split(diag, sizes, dim=1)
    return {k: v.reshape(B, *s) for k, v, s in zip(names, pieces, shapes)}


def _mlp(out=3):
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, out)).double()


def _layernorm_mlp():  # LayerNorm parameters take the generic (vmapped VJP) path
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 2, bias=False),
        nn.Flatten(), nn.Linear(2 * 4, 3),
    ).double()  # fmt: skip


def _tokens():  # (B, T, d) -> (B*T, V): rows of one sample are consecutive
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Flatten(0, 1)).double()


def _case(name):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "ce-mlp":
        return (
            _mlp(),
            nn.CrossEntropyLoss(),
            torch.randn(6, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=gen),
        )  # noqa: E501
    if name == "ce-sum-layernorm":
        return (
            _layernorm_mlp(),
            nn.CrossEntropyLoss(reduction="sum"),
            torch.randn(5, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (5,), generator=gen),
        )  # noqa: E501
    if name == "mse":
        return (
            _mlp(4),
            nn.MSELoss(),
            torch.randn(6, 5, generator=gen, dtype=torch.float64),
            torch.randn(6, 4, generator=gen, dtype=torch.float64),
        )  # noqa: E501
    if name == "ce-cnn":
        return (
            _cnn(),
            nn.CrossEntropyLoss(),
            torch.randn(4, 1, 6, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (4,), generator=gen),
        )  # noqa: E501
    assert name == "ce-tokens"
    return (
        _tokens(),
        nn.CrossEntropyLoss(),
        torch.randn(3, 4, 4, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (12,), generator=gen),
    )  # noqa: E501


CASES = ["ce-mlp", "ce-sum-layernorm", "mse", "ce-cnn", "ce-tokens"]


@pytest.mark.parametrize("name", CASES)
def test_ggn_matches_brute_force(name):
    model, loss_fn, X, y = _case(name)
    got = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn")
    want = brute_per_sample_ggn(model, loss_fn, X, y)
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10)
        assert want[k].abs().max() > 1e-4  # the reference is not trivially zero


def test_ggn_sums_to_the_batch_ggn_diagonal_and_ignores_chunk_size():
    model, loss_fn, X, y = _case("ce-sum-layernorm")
    G = hesse.GGNOperator(model, loss_fn, [(X, y)])
    batch = hesse.diagonal(G, method="exact")
    a = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn")
    b = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn", chunk_size=2)
    flat = torch.cat([v.reshape(X.shape[0], -1) for v in a.values()], 1)
    torch.testing.assert_close(flat.sum(0), batch, rtol=0, atol=1e-10)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)


def test_ggn_selected_params():
    model, loss_fn, X, y = _case("ce-mlp")
    params = {"2.weight": model[2].weight}
    got = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn", params=params)
    want = brute_per_sample_ggn(model, loss_fn, X, y)
    assert list(got) == ["2.weight"]
    torch.testing.assert_close(got["2.weight"], want["2.weight"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["ce-mlp", "ce-tokens"])
def test_ggn_mc_sums_to_the_mc_diagonal_for_the_same_generator(name):
    model, loss_fn, X, y = _case(name)
    d = hesse.per_sample_diagonal(
        model, loss_fn, X, y, method="ggn-mc", generator=torch.Generator().manual_seed(3)
    )
    flat = torch.cat([v.reshape(X.shape[0], -1) for v in d.values()], 1)
    G = hesse.GGNOperator(model, loss_fn, [(X, y)])
    mc = hesse.diagonal(G, method="mc", generator=torch.Generator().manual_seed(3)).value
    torch.testing.assert_close(flat.sum(0), mc, rtol=0, atol=1e-12)


def test_ggn_mc_is_unbiased_per_sample():
    model, loss_fn, X, y = _case("ce-mlp")
    want = brute_per_sample_ggn(model, loss_fn, X, y)
    gen = torch.Generator().manual_seed(0)
    draws = 300
    mean = {k: torch.zeros_like(v) for k, v in want.items()}
    for _ in range(draws):
        d = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn-mc", generator=gen)
        for k in mean:
            mean[k] += d[k] / draws
    w = torch.cat([v.reshape(-1) for v in want.values()])
    m = torch.cat([v.reshape(-1) for v in mean.values()])
    # 300 one-label draws per sample: a relative error near 1/sqrt(300) ~ 0.06.
    assert (m - w).norm() / w.norm() < 0.15
    a = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn-mc", generator=gen)
    b = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn-mc", generator=gen)
    assert not torch.equal(a["0.weight"], b["0.weight"])  # the generator advances


def test_bad_method_names_the_choices():
    model, loss_fn, X, y = _case("ce-mlp")
    with pytest.raises(
        ValueError, match=r"method should be one of .*'ggn', 'ggn-mc', got 'ggn_mc'"
    ):
        hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn_mc")


def test_bad_generator_is_a_type_error():
    model, loss_fn, X, y = _case("ce-mlp")
    with pytest.raises(TypeError, match="expected generator to be a torch.Generator or None"):
        hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn-mc", generator=0)


def test_ggn_needs_a_loss_with_known_curvature():
    model, _, X, y = _case("ce-mlp")

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out, t)

    for method in ("ggn", "ggn-mc"):
        with pytest.raises(
            NotImplementedError,
            match=rf"per_sample_diagonal.*method='{method}' needs a loss whose output Hessian "
            "is known in closed form .* got loss_fn of type function",
        ):
            hesse.per_sample_diagonal(model, loss_fn, X, y, method=method)


def test_ggn_second_call_sees_new_weights():  # the cached layer plan holds no values
    model, loss_fn, X, y = _case("ce-mlp")
    hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn")
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    got = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn")
    want = brute_per_sample_ggn(model, loss_fn, X, y)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10)


def test_ggn_batchnorm_in_train_mode_couples_the_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    got = hesse.per_sample_diagonal(model, nn.CrossEntropyLoss(), X, y, method="ggn")
    want = brute_per_sample_ggn(model, nn.CrossEntropyLoss(), X, y)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10)
