"""KFAC and EKFAC against exact curvature where theory makes them exact, dense linear
algebra on their own matrices, and independent layer equivalences (Conv1d/3d as Conv2d,
an embedding as a linear layer on one-hot inputs)."""

import pytest
import torch
from torch import nn

import hesse

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _init(model, seed=0):
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=DT))
    return model


def mlp():
    return _init(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT))


def cnn():
    return _init(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, stride=2),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2, dilation=2),
            nn.Flatten(),
            nn.Linear(2, 3),
        ).to(DT)
    )


def ce_data(sizes=(6, 3), shape=(4,), seed=1, classes=3):
    g = _gen(seed)
    return [
        (
            torch.randn(m, *shape, generator=g, dtype=DT),
            torch.randint(0, classes, (m,), generator=g),
        )
        for m in sizes
    ]


def mse_data(sizes=(6, 3), shape=(4,), out=(3,), seed=1):
    g = _gen(seed)
    return [
        (torch.randn(m, *shape, generator=g, dtype=DT), torch.randn(m, *out, generator=g, dtype=DT))
        for m in sizes
    ]


class Seq(nn.Module):
    """A sequence model: linear layers shared over positions, positions mixed in between."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l2(h + h.mean(1, keepdim=True))


def _eye(n):
    return torch.eye(n, dtype=DT)


# -- exactness --------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_type2_equals_ggn_for_one_linear_layer_and_one_sample(loss):
    model = _init(nn.Linear(4, 3).to(DT))
    data = mse_data(sizes=(1,)) if loss == "mse" else ce_data(sizes=(1,))
    loss_fn = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    K = hesse.KFACOperator(model, loss_fn, data)
    G = hesse.GGNOperator(model, loss_fn, data).to_dense()
    torch.testing.assert_close(K.to_dense(), G, rtol=1e-12, atol=1e-12)


def test_type2_equals_ggn_blockwise_for_an_mlp_on_one_sample():
    model, data, ce = mlp(), ce_data(sizes=(1,)), nn.CrossEntropyLoss()
    K = hesse.KFACOperator(model, ce, data).to_dense()
    G = hesse.GGNOperator(model, ce, data).to_dense()
    n0 = 4 * 5 + 5
    for s in (slice(0, n0), slice(n0, None)):
        torch.testing.assert_close(K[s, s], G[s, s], rtol=1e-12, atol=1e-12)
    assert K[:n0, n0:].abs().max() == 0


def test_expand_equals_reduce_without_weight_sharing_and_differs_with_it():
    ce = nn.CrossEntropyLoss()
    for model, data in [(mlp(), ce_data())]:
        a = hesse.KFACOperator(model, ce, data, kfac_approx="expand").to_dense()
        b = hesse.KFACOperator(model, ce, data, kfac_approx="reduce").to_dense()
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    data = ce_data(shape=(2, 6, 6))
    a = hesse.KFACOperator(cnn(), ce, data, kfac_approx="expand").to_dense()
    b = hesse.KFACOperator(cnn(), ce, data, kfac_approx="reduce").to_dense()
    assert (a - b).abs().max() > 1e-4


def test_ekfac_equals_kfac_on_one_sample():
    model, data, ce = mlp(), ce_data(sizes=(1,)), nn.CrossEntropyLoss()
    K = hesse.KFACOperator(model, ce, data)
    E = hesse.EKFACOperator(model, ce, data)
    torch.testing.assert_close(E.to_dense(), K.to_dense(), rtol=1e-11, atol=1e-13)


def test_ekfac_is_the_ggn_diagonal_in_the_kronecker_eigenbasis():
    # Lambda = diag(Q^T GGN_block Q) for an MLP (no shared positions): the defining property.
    model, data, ce = mlp(), ce_data(), nn.CrossEntropyLoss()
    E = hesse.EKFACOperator(model, ce, data, params=["2.weight", "2.bias"])
    G = hesse.GGNOperator(model, ce, data, params=["2.weight", "2.bias"]).to_dense()
    block = E.blocks[0]
    eg, ea = E._eigen(block)
    Q = torch.kron(eg.vectors, ea.vectors)
    # the flat layout is [W (3x5 row-major), b]; the block's matrix is [W | b] (3x6).
    perm = torch.tensor([o * 5 + i if i < 5 else 15 + o for o in range(3) for i in range(6)])
    Gp = G[perm][:, perm]
    torch.testing.assert_close(
        (Q.T @ Gp @ Q).diagonal().reshape(3, 6), E.corrections[block.name], rtol=1e-10, atol=1e-12
    )


# -- the operator's own linear algebra ---------------------------------------------------
@pytest.fixture(scope="module")
def ops():
    model, data, ce = cnn(), ce_data(shape=(2, 6, 6)), nn.CrossEntropyLoss()
    return {
        "kfac": hesse.KFACOperator(model, ce, data),
        "ekfac": hesse.EKFACOperator(model, ce, data, separate_bias=True),
    }


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_inverse_logdet_trace_diagonal_against_dense(ops, kind):
    op = ops[kind]
    K = op.to_dense()
    n = K.shape[0]
    torch.testing.assert_close(K, K.T, rtol=0, atol=1e-15)
    lam = 1e-3
    inv = op.inverse(lam, exact_damping=True) if kind == "kfac" else op.inverse(lam)
    torch.testing.assert_close(inv.to_dense() @ (K + lam * _eye(n)), _eye(n), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        op.logdet(lam), torch.linalg.slogdet(K + lam * _eye(n)).logabsdet, rtol=1e-12, atol=1e-10
    )
    torch.testing.assert_close(op.trace(), K.trace(), rtol=1e-12, atol=0)
    torch.testing.assert_close(op.diagonal(), K.diagonal(), rtol=1e-12, atol=1e-15)


def test_factor_damped_and_heuristic_inverses_against_the_factors(ops):
    op = ops["kfac"]
    lam = 1e-2
    for heuristic in (False, True):
        inv = op.inverse(lam, heuristic_damping=heuristic)
        blocks = []
        for b in op.blocks:
            A, G = op.factors[b.name]
            da = dg = lam
            if heuristic:
                pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
                da, dg = float(pi * lam**0.5), float(lam**0.5 / pi)
            blocks.append(
                torch.kron(
                    torch.linalg.inv(G + dg * _eye(G.shape[0])),
                    torch.linalg.inv(A + da * _eye(A.shape[0])),
                )
            )
        ref = _block_dense(op, blocks)
        torch.testing.assert_close(inv.to_dense(), ref, rtol=1e-10, atol=1e-10)


def _block_dense(op, blocks):
    """The flat-layout matrix of block matrices given on each block's ``vec(P)``."""
    n = op.shape[0]
    out = torch.zeros(n, n, dtype=DT)
    for b, M in zip(op.blocks, blocks):
        idx = b.pack(torch.arange(n, dtype=DT).unsqueeze(1))[0].reshape(-1).long()
        out[idx[:, None], idx[None, :]] = M
    return out


def test_products_with_matrices_dicts_and_parameter_subsets():
    model, data, ce = mlp(), ce_data(), nn.CrossEntropyLoss()
    K = hesse.KFACOperator(model, ce, data)
    D = K.to_dense()
    V = torch.randn(K.shape[0], 3, generator=_gen(2), dtype=DT)
    torch.testing.assert_close(K @ V, D @ V)
    tree = K.layout.unflatten(V[:, 0])
    torch.testing.assert_close(K.layout.flatten(K @ tree), D @ V[:, 0])
    sub = hesse.KFACOperator(model, ce, data, params=["2.weight", "2.bias"])
    torch.testing.assert_close(sub.to_dense(), D[25:, 25:], rtol=1e-13, atol=1e-15)
    # a bias alone is the block G (x) [1], the bias-bias part of the augmented block.
    bias = hesse.KFACOperator(model, ce, data, params=["0.bias", "2.weight"])
    ref = D[[*range(20, 25), *range(25, 40)]][:, [*range(20, 25), *range(25, 40)]]
    torch.testing.assert_close(bias.to_dense(), ref, rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match=r"KFACOperator.*expected a tensor of shape \(43,\)"):
        K @ torch.zeros(5, dtype=DT)


def test_separate_bias_drops_exactly_the_weight_bias_cross_terms():
    model, data, ce = mlp(), ce_data(), nn.CrossEntropyLoss()
    joint = hesse.KFACOperator(model, ce, data).to_dense()
    sep = hesse.KFACOperator(model, ce, data, separate_bias=True).to_dense()
    mask = torch.zeros_like(joint, dtype=torch.bool)
    for s in (slice(0, 20), slice(20, 25), slice(25, 40), slice(40, 43)):
        mask[s, s] = True
    torch.testing.assert_close(sep, torch.where(mask, joint, 0.0), rtol=1e-13, atol=1e-15)


def test_short_last_batch_is_weighted_exactly():
    model, ce = mlp(), nn.CrossEntropyLoss()
    data = ce_data(sizes=(6, 3))
    whole = [(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))]
    for fisher_type in ("type-2", "empirical"):
        a = hesse.KFACOperator(model, ce, data, fisher_type=fisher_type).to_dense()
        b = hesse.KFACOperator(model, ce, whole, fisher_type=fisher_type).to_dense()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_mc_is_reproducible_and_unbiased_for_the_type2_factors():
    model, data, mse = mlp(), mse_data(sizes=(4,)), nn.MSELoss()
    a = hesse.KFACOperator(model, mse, data, fisher_type="mc", generator=_gen(3))
    b = hesse.KFACOperator(model, mse, data, fisher_type="mc", generator=_gen(3))
    torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=0, atol=0)
    t2 = hesse.KFACOperator(model, mse, data)
    many = hesse.KFACOperator(
        model, mse, data, fisher_type="mc", mc_samples=4000, generator=_gen(4)
    )
    for name, f in t2.factors.items():
        G = f.G
        err = (many.factors[name].G - G).norm() / G.norm()
        assert err < 0.08, (name, float(err))


def test_forward_only_has_identity_output_factor_and_uncorrelated_input_mean():
    model, data, ce = mlp(), ce_data(), nn.CrossEntropyLoss()
    K = hesse.KFACOperator(model, ce, data, fisher_type="forward-only")
    X = torch.cat([x for x, _ in data])
    A = torch.cat([X, torch.ones(X.shape[0], 1, dtype=DT)], 1)
    torch.testing.assert_close(K.factors["0"].A, A.T @ A / X.shape[0])
    torch.testing.assert_close(K.factors["0"].G, _eye(5))


# -- layers: independent equivalences --------------------------------------------------
def test_conv1d_and_conv3d_equal_the_matching_conv2d():
    g = _gen(5)
    c2 = _init(nn.Conv2d(2, 3, (1, 3), stride=(1, 2), padding=(0, 1)).to(DT), 6)
    c1 = nn.Conv1d(2, 3, 3, stride=2, padding=1).to(DT)
    c3 = nn.Conv3d(2, 3, (1, 1, 3), stride=(1, 1, 2), padding=(0, 0, 1)).to(DT)
    with torch.no_grad():
        c1.weight.copy_(c2.weight[:, :, 0])
        c1.bias.copy_(c2.bias)
        c3.weight.copy_(c2.weight.unsqueeze(2))
        c3.bias.copy_(c2.bias)
    X = torch.randn(3, 2, 7, generator=g, dtype=DT)
    y = torch.randn(3, 3 * 4, generator=g, dtype=DT)
    mse = nn.MSELoss()
    ref = hesse.KFACOperator(
        nn.Sequential(nn.Unflatten(2, (1, 7)), c2, nn.Flatten()), mse, [(X, y)]
    ).to_dense()
    one = hesse.KFACOperator(nn.Sequential(c1, nn.Flatten()), mse, [(X, y)]).to_dense()
    three = hesse.KFACOperator(
        nn.Sequential(nn.Unflatten(2, (1, 1, 7)), c3, nn.Flatten()), mse, [(X, y)]
    ).to_dense()
    torch.testing.assert_close(one, ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(three, ref, rtol=1e-13, atol=1e-15)


def test_conv_same_padding_equals_explicit_padding():
    a = _init(nn.Conv2d(2, 2, 3, padding="same").to(DT))
    b = nn.Conv2d(2, 2, 3, padding=1).to(DT)
    b.load_state_dict(a.state_dict())
    data = mse_data(sizes=(2,), shape=(2, 4, 4), out=(32,))
    ka = hesse.KFACOperator(nn.Sequential(a, nn.Flatten()), nn.MSELoss(), data).to_dense()
    kb = hesse.KFACOperator(nn.Sequential(b, nn.Flatten()), nn.MSELoss(), data).to_dense()
    torch.testing.assert_close(ka, kb, rtol=1e-13, atol=1e-15)


class EmbedModel(nn.Module):
    def __init__(self, embed):
        super().__init__()
        self.embed, self.out = embed, nn.Linear(3, 2)

    def forward(self, idx):
        return self.out(torch.tanh(self.embed(idx)))


@pytest.mark.parametrize("cls", [hesse.KFACOperator, hesse.EKFACOperator])
def test_embedding_equals_a_linear_layer_on_one_hot_inputs(cls):
    V = 6
    emb = _init(nn.Embedding(V, 3, padding_idx=0).to(DT), 7)
    model = _init(EmbedModel(emb).to(DT), 7)
    lin = nn.Linear(V, 3, bias=False).to(DT)
    with torch.no_grad():
        emb.weight[0].zero_()
        lin.weight.copy_(emb.weight.T)
    onehot = EmbedModel(lin).to(DT)
    onehot.out.load_state_dict(model.out.state_dict())
    g = _gen(8)
    idx = torch.randint(0, V, (4, 5), generator=g)
    idx[0, :2] = 0  # padding tokens: no gradient, like a zero one-hot row
    y = torch.randn(4, 5, 2, generator=g, dtype=DT)
    oh = nn.functional.one_hot(idx, V).to(DT)
    oh[idx == 0] = 0
    names = ["embed.weight"]
    ke = cls(model, nn.MSELoss(), [(idx, y)], params=names, fisher_type="empirical").to_dense()
    kl = cls(onehot, nn.MSELoss(), [(oh, y)], params=["embed.weight"], fisher_type="empirical")
    # the embedding's rows are the linear weight's columns: permute (V, d) <-> (d, V).
    perm = torch.arange(V * 3).reshape(3, V).T.reshape(-1)
    torch.testing.assert_close(ke, kl.to_dense()[perm][:, perm], rtol=1e-12, atol=1e-14)


def test_float32_inverse_with_small_damping():
    model = mlp().float()
    data = [(x.float(), y) for x, y in ce_data()]
    K = hesse.KFACOperator(model, nn.CrossEntropyLoss(), data)
    D = K.to_dense().double()
    lam = 1e-4 * float(D.diagonal().max())
    inv = K.inverse(lam, exact_damping=True).to_dense().double()
    n = D.shape[0]
    torch.testing.assert_close(inv @ (D + lam * _eye(n)), _eye(n), rtol=0, atol=1e-3)
