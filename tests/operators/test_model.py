"""Model operators against dense references built with torch.func on the whole dataset."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev

import hesse
from tests.problems import Residual

DT = torch.float64


def hessian(f):
    """Plain-autograd reference, without vmap: in torch 2.13, vmapped second derivatives
    of LayerNorm (torch.func.hessian, jacrev(jacrev)) get the input-weight cross
    terms wrong; unbatched double-backward agrees with finite differences."""

    def rows(x):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        flat = g.reshape(-1)
        out = [
            torch.autograd.grad(flat[i], x, retain_graph=True, allow_unused=True)[0]
            for i in range(flat.numel())
        ]
        out = [torch.zeros_like(x) if r is None else r for r in out]
        return torch.stack(out).reshape(*x.shape, *x.shape)

    return rows


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def cnn():
    return nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 2, 3),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2, 3),
    )


MODELS = {"mlp": mlp, "cnn": cnn, "residual": Residual}


def make(name, loss_kind, n_samples=7, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MODELS[name]().to(DT)
    in_dim = 16 if name == "cnn" else 4
    X = torch.randn(n_samples, in_dim, generator=g, dtype=DT)
    if loss_kind == "ce":
        Y = torch.randint(0, 3, (n_samples,), generator=g)
    elif loss_kind == "bce":
        Y = torch.rand(n_samples, 3, generator=g, dtype=DT).round()
    else:
        Y = torch.randn(n_samples, 3, generator=g, dtype=DT)
    data = [
        (X[i : i + batch], Y[i : i + batch]) for i in range(0, n_samples, batch)
    ]  # short last batch
    return model, X, Y, data


LOSSES = {
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
}


class Dense:
    """Dense references over the whole dataset as one batch (independent of hesse)."""

    def __init__(self, model, loss_fn, X, Y, names=None):
        self.model, self.loss_fn, self.X, self.Y = model, loss_fn, X, Y
        named = dict(model.named_parameters())
        self.names = names or list(named)
        self.params = {k: named[k].detach() for k in self.names}
        self.sizes = [p.numel() for p in self.params.values()]
        self.x = torch.cat([p.reshape(-1) for p in self.params.values()])

    def unflat(self, v):
        parts = torch.split(v, self.sizes)
        return {k: t.reshape(p.shape) for (k, p), t in zip(self.params.items(), parts)}

    def out(self, v, X=None):
        return functional_call(self.model, self.unflat(v), (self.X if X is None else X,))

    def hessian(self):
        return hessian(lambda v: self.loss_fn(self.out(v), self.Y))(self.x)

    def ggn(self):
        o = self.out(self.x)
        J = jacrev(self.out)(self.x).reshape(o.numel(), -1)
        Ho = hessian(lambda z: self.loss_fn(z, self.Y))(o).reshape(o.numel(), o.numel())
        return J.T @ Ho @ J

    def empirical_fisher(self):
        """``(1/M) sum_n g_n g_n^T``, ``g_n`` the gradient of sample n's summed loss,
        ``M`` the number of terms the dataset mean divides by (N*C for MSE)."""
        N = self.X.shape[0]
        summed = type(self.loss_fn)(reduction="sum")
        rows = []
        for i in range(N):

            def li(v, i=i):
                return summed(self.out(v, self.X[i : i + 1]), self.Y[i : i + 1])

            rows.append(torch.func.grad(li)(self.x))
        G = torch.stack(rows)
        M = N if isinstance(self.loss_fn, nn.CrossEntropyLoss) else self.Y.numel()
        return G.T @ G / M


def _check_products(op, ref, gen):
    n = ref.shape[0]
    assert op.shape == (n, n)
    v = torch.randn(n, generator=gen, dtype=DT)
    V = torch.randn(n, 3, generator=gen, dtype=DT)
    torch.testing.assert_close(op @ v, ref @ v)
    torch.testing.assert_close(op @ V, ref @ V)
    torch.testing.assert_close(op.T @ V, ref @ V)
    torch.testing.assert_close(torch.as_tensor(op.to_scipy() @ V.numpy()), ref @ V)
    tree = op.layout.unflatten(v)
    out = op @ tree
    torch.testing.assert_close(op.layout.flatten(out), ref @ v)
    torch.testing.assert_close(op.to_dense(), ref)


@pytest.mark.parametrize("name", ["mlp", "cnn", "residual"])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_hessian_and_ggn(name, loss, gen):
    model, X, Y, data = make(name, loss)
    loss_fn = LOSSES[loss]()
    dense = Dense(model, loss_fn, X, Y)
    _check_products(hesse.HessianOperator(model, loss_fn, data), dense.hessian(), gen)
    G = hesse.GGNOperator(model, loss_fn, data)
    assert "psd" in G.tags
    ref = dense.ggn()
    _check_products(G, ref, gen)
    torch.testing.assert_close(hesse.diagonal(G), ref.diagonal(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_empirical_fisher(loss, gen):
    model, X, Y, data = make("residual", loss)
    loss_fn = LOSSES[loss]()
    ref = Dense(model, loss_fn, X, Y).empirical_fisher()
    F = hesse.FisherOperator(model, loss_fn, data, kind="empirical")
    _check_products(F, ref, gen)
    torch.testing.assert_close(hesse.diagonal(F), ref.diagonal(), rtol=0, atol=1e-10)


def test_sum_reduction_and_batch_independence(gen):
    model, X, Y, data = make("mlp", "mse", n_samples=8, batch=3)
    loss_fn = nn.MSELoss(reduction="sum")
    dense = Dense(model, loss_fn, X, Y)
    H = hesse.HessianOperator(model, loss_fn, data)
    torch.testing.assert_close(H.to_dense(), dense.hessian())
    one = hesse.GGNOperator(model, loss_fn, [(X, Y)]).to_dense()
    torch.testing.assert_close(hesse.GGNOperator(model, loss_fn, data).to_dense(), one)


def test_mc_fisher_is_fixed_and_unbiased(gen):
    model, X, Y, data = make("mlp", "ce")
    loss_fn = nn.CrossEntropyLoss()
    F = hesse.FisherOperator(
        model, loss_fn, data, generator=torch.Generator().manual_seed(3), mc_samples=2
    )
    D = F.to_dense()
    torch.testing.assert_close(D, D.T)
    v = torch.randn(D.shape[0], generator=gen, dtype=DT)
    torch.testing.assert_close(F @ v, D @ v)  # the same samples in every pass
    assert torch.linalg.eigvalsh(D).min() > -1e-12
    torch.testing.assert_close(hesse.diagonal(F), D.diagonal(), rtol=0, atol=1e-12)
    # unbiased: the mean of v^T F v over seeds approaches v^T G v
    G = Dense(model, loss_fn, X, Y).ggn()
    vals = torch.stack(
        [
            v
            @ (
                hesse.FisherOperator(
                    model, loss_fn, data, mc_samples=50, generator=torch.Generator().manual_seed(s)
                )
                @ v
            )
            for s in range(20)
        ]
    )
    err = vals.std() / 20**0.5
    assert abs(vals.mean() - v @ G @ v) < 4 * err


def test_params_subsets_are_dense_blocks(gen):
    model, X, Y, data = make("residual", "ce")
    loss_fn = nn.CrossEntropyLoss()
    full = Dense(model, loss_fn, X, Y)
    H, G = full.hessian(), full.ggn()
    names = list(dict(model.named_parameters()))
    sel = ["norm.weight", "out.bias"]
    idx = []
    offset = 0
    for k, p in model.named_parameters():
        if k in sel:
            idx.extend(range(offset, offset + p.numel()))
        offset += p.numel()
    idx = torch.tensor(idx)
    Hs = hesse.HessianOperator(model, loss_fn, data, params=sel[::-1])  # order follows the model
    assert Hs.param_names == sel
    torch.testing.assert_close(Hs.to_dense(), H[idx][:, idx])
    Gs = hesse.GGNOperator(model, loss_fn, data, params=sel)
    torch.testing.assert_close(Gs.to_dense(), G[idx][:, idx])
    torch.testing.assert_close(hesse.diagonal(Gs), G.diagonal()[idx], rtol=0, atol=1e-10)
    # a dict selects the block and sets the point
    point = {k: p.detach() + 0.1 for k, p in model.named_parameters() if k in sel}
    shifted = Dense(model, loss_fn, X, Y, names=sel)
    shifted.x = shifted.x + 0.1
    Hd = hesse.HessianOperator(model, loss_fn, data, params=point)
    torch.testing.assert_close(Hd.to_dense(), shifted.hessian())
    assert set(names) >= set(Hd.layout.spec.context)


def test_train_mode_batchnorm_is_respected_and_untouched(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X = torch.randn(6, 3, generator=gen, dtype=DT)
    Y = torch.randn(6, 2, generator=gen, dtype=DT)
    loss_fn = nn.MSELoss()
    stats = model[1].running_mean.clone()
    model.train()
    H = hesse.HessianOperator(model, loss_fn, [(X, Y)])
    dense = H.to_dense()
    assert torch.equal(model[1].running_mean, stats)  # products never update buffers
    torch.testing.assert_close(dense, Dense(model, loss_fn, X, Y).hessian())  # batch statistics
    assert model.training


def test_progress_bar_and_tuple_inputs(gen, capsys):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, a, b):
            return self.lin(a) * b

    model = Two().to(DT)
    A = torch.randn(5, 3, generator=gen, dtype=DT)
    B = torch.randn(5, 2, generator=gen, dtype=DT)
    Y = torch.randn(5, 2, generator=gen, dtype=DT)
    G = hesse.GGNOperator(
        model, nn.MSELoss(), [((A[:3], B[:3]), Y[:3]), ((A[3:], B[3:]), Y[3:])], progress=True
    )
    ref = hesse.GGNOperator(model, nn.MSELoss(), [((A, B), Y)]).to_dense()
    torch.testing.assert_close(G.to_dense(), ref)
    assert "GGNOperator" in capsys.readouterr().err


def test_plain_callable_loss_is_a_mean_over_samples(gen):
    model, X, Y, data = make("mlp", "mse")

    def loss_fn(out, y):
        return ((out - y) ** 2).sum(1).mean()

    H = hesse.HessianOperator(model, loss_fn, data)
    torch.testing.assert_close(H.to_dense(), Dense(model, loss_fn, X, Y).hessian())
    with pytest.raises(
        NotImplementedError, match="no output Hessian is known for loss_fn of type function"
    ):
        hesse.GGNOperator(model, loss_fn, data)
    blocks = lambda o, y: 2 * torch.eye(3, dtype=o.dtype).expand(o.shape[0], 3, 3) / o.shape[0]  # noqa: E731
    G = hesse.GGNOperator(model, loss_fn, data, output_hessian=blocks)
    torch.testing.assert_close(G.to_dense(), Dense(model, loss_fn, X, Y).ggn())


def test_errors(gen):
    model, X, Y, data = make("mlp", "ce")
    ce = nn.CrossEntropyLoss()
    call = r"hesse.HessianOperator\(model, loss_fn, data\): "
    with pytest.raises(TypeError, match=call + "expected model to be a torch.nn.Module"):
        hesse.HessianOperator(lambda x: x, ce, data)
    with pytest.raises(TypeError, match=call + "expected loss_fn to be callable"):
        hesse.HessianOperator(model, 3, data)
    with pytest.raises(TypeError, match="one-shot iterator"):
        hesse.HessianOperator(model, ce, iter(data))
    with pytest.raises(TypeError, match="iterable of \\(inputs, targets\\) batches"):
        hesse.HessianOperator(model, ce, 5)
    with pytest.raises(ValueError, match="data yielded no batches"):
        hesse.HessianOperator(model, ce, [])
    with pytest.raises(TypeError, match="\\(inputs, targets\\) pair"):
        hesse.HessianOperator(model, ce, [X])
    with pytest.raises(ValueError, match="'nope', which is not a parameter"):
        hesse.HessianOperator(model, ce, data, params=["nope"])
    with pytest.raises(TypeError, match="expected params to be None"):
        hesse.HessianOperator(model, ce, data, params=3)
    with pytest.raises(ValueError, match=r"expected params\['0.bias'\] of shape \(5,\)"):
        hesse.HessianOperator(model, ce, data, params={"0.bias": torch.zeros(2, dtype=DT)})
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="'0.bias' does not require grad"):
        hesse.HessianOperator(model, ce, data, params=["0.bias"])
    assert "0.bias" not in hesse.HessianOperator(model, ce, data).param_names
    frozen = nn.Linear(2, 2).to(DT).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        hesse.HessianOperator(
            frozen, nn.MSELoss(), [(torch.ones(1, 2, dtype=DT), torch.ones(1, 2, dtype=DT))]
        )

    class Tup(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(
        TypeError, match="expected the model to return a tensor, got an object of type tuple"
    ):
        hesse.GGNOperator(Tup().to(DT), ce, data)
    with pytest.raises(ValueError, match="reduction='none'"):
        hesse.HessianOperator(mlp().to(DT), nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(ValueError, match="scalar tensor"):
        hesse.HessianOperator(mlp().to(DT), lambda o, y: o, data)
    with pytest.raises(
        NotImplementedError, match=r"hesse.GGNOperator\(model, loss_fn, data\): no output Hessian"
    ):
        hesse.GGNOperator(mlp().to(DT), nn.NLLLoss(), data)
    with pytest.raises(ValueError, match="kind should be one of 'mc', 'empirical'"):
        hesse.FisherOperator(mlp().to(DT), ce, data, kind="true")
    with pytest.raises(ValueError, match="mc_samples should be a positive int"):
        hesse.FisherOperator(mlp().to(DT), ce, data, mc_samples=0)
    with pytest.raises(TypeError, match="torch.Generator"):
        hesse.FisherOperator(mlp().to(DT), ce, data, generator=0)
    with pytest.raises(ValueError, match="class-probability targets needs them shaped like"):
        hesse.GGNOperator(mlp().to(DT), ce, [(X, X)])
    with pytest.raises(ValueError, match="class-index targets of shape \\(7,\\)"):
        hesse.GGNOperator(mlp().to(DT), ce, [(X, Y[:3])])


def test_check_deterministic(gen):
    model, X, Y, data = make("mlp", "ce")
    ce = nn.CrossEntropyLoss()
    hesse.HessianOperator(model, ce, data, check_deterministic=True)  # passes
    dropout = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).to(DT).train()
    with pytest.raises(ValueError, match="dropout or another random layer in train mode"):
        hesse.HessianOperator(dropout, ce, data, check_deterministic=True)
    hesse.HessianOperator(dropout.eval(), ce, data, check_deterministic=True)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, Y),
        batch_size=3,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    with pytest.raises(ValueError, match="DataLoader that shuffles"):
        hesse.GGNOperator(model, ce, loader)
    fixed = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=3)
    G = hesse.GGNOperator(model, ce, fixed, check_deterministic=True)
    torch.testing.assert_close(G.to_dense(), Dense(model, ce, X, Y).ggn())


def test_agrees_with_curvlinops_on_short_last_batch(gen):
    """A second, independent implementation (optional benchmark extra)."""
    cl = pytest.importorskip("curvlinops")
    model, X, Y, data = make("mlp", "ce", n_samples=8, batch=3)
    ce = nn.CrossEntropyLoss()
    plist = list(model.parameters())
    V = torch.randn(sum(p.numel() for p in plist), 2, generator=gen, dtype=DT)
    pairs = [
        (hesse.HessianOperator(model, ce, data), cl.HessianLinearOperator(model, ce, plist, data)),
        (hesse.GGNOperator(model, ce, data), cl.GGNLinearOperator(model, ce, plist, data)),
        (
            hesse.FisherOperator(model, ce, data, kind="empirical"),
            cl.EFLinearOperator(model, ce, plist, data),
        ),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours @ V, theirs @ V)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["hessian", "ggn", "fisher"]))
def test_symmetric_linear_and_chunk_independent(seed, kind):
    g = torch.Generator().manual_seed(seed)
    model, X, Y, data = make("residual", "ce", seed=seed % 7)
    cls = {
        "hessian": hesse.HessianOperator,
        "ggn": hesse.GGNOperator,
        "fisher": hesse.FisherOperator,
    }
    op = cls[kind](model, nn.CrossEntropyLoss(), data)
    u, v = torch.randn(2, op.shape[0], generator=g, dtype=DT)
    a, b = torch.randn(2, generator=g, dtype=DT).tolist()
    Hu, Hv = op @ u, op @ v
    torch.testing.assert_close(u @ Hv, v @ Hu)
    torch.testing.assert_close(op @ (a * u + b * v), a * Hu + b * Hv)
    W = torch.stack([u, v, u - v], 1)
    full = op @ W
    op.chunk_size = 1
    torch.testing.assert_close(op @ W, full)
    torch.testing.assert_close(full[:, 0], Hu)
