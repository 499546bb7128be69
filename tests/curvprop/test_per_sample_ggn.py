"""``hesse.per_sample_diagonal(..., method="ggn" | "ggn-mc")`` against brute force."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hesse
from tests.curvprop.test_chain import CubeAct


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


# -- NOTE [chain fast path] for "ggn": chains of Linear/Conv2d and activations -------------
def _seeded(*layers):
    torch.manual_seed(0)
    return nn.Sequential(*layers).double()


GGN_CHAINS = {  # model, input shape
    "tanh-sigmoid mlp": (
        lambda: _seeded(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 3)),
        (5,),
    ),
    "relu mlp, no bias": (
        lambda: _seeded(nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 3)),
        (5,),
    ),
    "cnn pool-tanh-conv-flatten": (
        lambda: _seeded(
            nn.Conv2d(2, 3, 3, padding=1, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
            nn.Conv2d(3, 2, 2),
            nn.Flatten(),
            nn.Sigmoid(),
            nn.Linear(8, 3),
        ),
        (2, 8, 8),
    ),  # fmt: skip
}


@pytest.fixture
def chain_spy(monkeypatch):
    from hesse.curvprop import _api

    calls = []
    original = _api.chain_diagonal

    def wrapped(*args, **kwargs):
        calls.append(kwargs.get("residuals"))
        return original(*args, **kwargs)

    monkeypatch.setattr(_api, "chain_diagonal", wrapped)
    return calls


@pytest.mark.parametrize("case", list(GGN_CHAINS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_chain_matches_brute_force(chain_spy, case, reduction):
    build, shape = GGN_CHAINS[case]
    model, loss_fn = build(), nn.CrossEntropyLoss(reduction=reduction)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    got = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn")
    assert chain_spy == [False], "the chain fast path (without residuals) did not run"
    want = brute_per_sample_ggn(model, loss_fn, X, y)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10)
        assert want[k].abs().max() > 1e-6
    # NOTE [per-parameter results]: one tensor per parameter, no views of one block
    storages = {v.untyped_storage().data_ptr() for v in got.values()}
    assert len(storages) == len(got) and all(v.is_contiguous() for v in got.values())


GGN_HAND_OVER = {  # model, loss: each must take the general path
    "weight used twice": lambda: (
        nn.Sequential(*(lambda lin: [lin, nn.Tanh(), lin])(nn.Linear(5, 5)), nn.Linear(5, 3)),
        nn.CrossEntropyLoss(),
    ),
    "batchnorm train": lambda: (
        nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)),
        nn.CrossEntropyLoss(),
    ),
    "custom Function": lambda: (
        nn.Sequential(nn.Linear(5, 4), CubeAct(), nn.Linear(4, 3)),
        nn.CrossEntropyLoss(),
    ),
    "label smoothing": lambda: (_mlp(), nn.CrossEntropyLoss(label_smoothing=0.1)),
    "mse": lambda: (_mlp(), nn.MSELoss()),
}


@pytest.mark.parametrize("case", list(GGN_HAND_OVER))
def test_ggn_chain_hands_over(chain_spy, case):
    torch.manual_seed(2)
    model, loss_fn = GGN_HAND_OVER[case]()
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    if case == "mse":
        y = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(0, 3, (6,), generator=gen)
    got = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn")
    assert not chain_spy, f"{case}: the chain fast path must not run"
    want = brute_per_sample_ggn(model, loss_fn, X, y)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10)


def test_ggn_chain_parameter_subset_hands_over(chain_spy):
    model, loss_fn, X, y = _case("ce-mlp")
    got = hesse.per_sample_diagonal(
        model, loss_fn, X, y, method="ggn", params={"0.bias": model[0].bias}
    )
    assert not chain_spy
    want = brute_per_sample_ggn(model, loss_fn, X, y)
    torch.testing.assert_close(got["0.bias"], want["0.bias"], rtol=0, atol=1e-10)


def test_ggn_chain_leaves_int32_targets_to_the_loss_check(chain_spy):
    model, loss_fn, X, y = _case("ce-mlp")
    with pytest.raises(ValueError, match="CrossEntropyLoss needs class-index targets of dtype"):
        hesse.per_sample_diagonal(model, loss_fn, X, y.to(torch.int32), method="ggn")
    assert not chain_spy


def test_ggn_chain_agrees_with_the_factor_path(chain_spy, monkeypatch):
    """The chain and the hooks-and-autograd path of NOTE [linear fast path] agree."""
    from hesse.curvprop import _api

    build, shape = GGN_CHAINS["cnn pool-tanh-conv-flatten"]
    model, loss_fn = build(), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(7, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    fast = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn")
    assert chain_spy
    monkeypatch.setattr(_api, "_chain_fast", lambda *args: None)
    slow = hesse.per_sample_diagonal(model, loss_fn, X, y, method="ggn")
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=0, atol=1e-12)
