"""The dense GGN / Fisher as a Gram product of per-sample VJPs (NOTE [factor Gram]).

References: the operator's own products against the identity (``P`` matmats, an
independent code path) and a plain-autograd ``sum_b (M_b / M) J_b^T H_b J_b``
with ``J_b`` the Jacobian of the whole batch output and ``H_b`` the Hessian of the
batch loss with respect to it, ``M_b`` counted by hand (NOTE [loss normalisation]).
"""

import pytest
import torch
from torch import nn

import hesse
from hesse._chunking import map_chunks
from hesse.operators._base import LinearOperator
from hesse.operators._squares import batch_factor_gram

DT = torch.float64


def products(op):
    """The dense matrix from ``P`` products (the generic ``to_dense``)."""
    return LinearOperator.to_dense(op)


def autograd_ggn(model, loss_fn, data, counts):
    """``sum_b (M_b / M) J_b^T H_b J_b``, by plain autograd on the whole batch output."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(counts)
    G = 0
    for (x, y), m in zip(data, counts):
        out = model(x).reshape(-1)
        J = torch.stack(
            [
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)]
                )
                for o in out
            ]
        )
        f = out.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(f.reshape(model(x).shape), y), f, create_graph=True)
        H = torch.stack([torch.autograd.grad(gi, f, retain_graph=True)[0] for gi in g])
        G = G + (m / total) * J.T @ H @ J
    return G


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 16, 2)
    ).to(DT)


class LayerNormNet(nn.Module):  # LayerNorm's parameters take the generic per-sample path
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.norm, self.out = nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


class Tokens(nn.Module):
    """``(B, T, d) -> (B*T, V)`` with a causal mix over positions: rows are not samples."""

    def __init__(self, d: int = 3, vocab: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix, self.head = nn.Linear(d, d), nn.Linear(d, vocab)

    def forward(self, x):
        h = torch.tanh(self.mix(x)).cumsum(1)
        return self.head(h).reshape(-1, self.head.out_features)


def classes(gen, n, c=3, d=5):
    return torch.randn(n, d, generator=gen, dtype=DT), torch.randint(0, c, (n,), generator=gen)


def layernorm():
    return LayerNormNet().to(DT)


def tokens(vocab=4):
    return Tokens(vocab=vocab).to(DT)


@pytest.mark.parametrize("make", [mlp, layernorm], ids=["linear", "layernorm"])
def test_ggn_cross_entropy_two_batches(make):
    gen = torch.Generator().manual_seed(1)
    data = [classes(gen, 7), classes(gen, 3)]  # a short last batch weighs what it holds
    model, loss = make(), nn.CrossEntropyLoss()
    op = hesse.GGNOperator(model, loss, data)
    dense = op.to_dense()
    torch.testing.assert_close(dense, products(op), atol=1e-10, rtol=0)
    torch.testing.assert_close(dense, autograd_ggn(model, loss, data, [7, 3]), atol=1e-10, rtol=0)


def test_ggn_mse_conv():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 1, 4, 4, generator=gen, dtype=DT)
    data = [(x, torch.randn(6, 2, generator=gen, dtype=DT))]
    model, loss = cnn(), nn.MSELoss()
    op = hesse.GGNOperator(model, loss, data)
    dense = op.to_dense()
    torch.testing.assert_close(dense, products(op), atol=1e-10, rtol=0)
    torch.testing.assert_close(dense, autograd_ggn(model, loss, data, [12]), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["empirical", "mc"])
def test_fisher_equals_products(kind):
    gen = torch.Generator().manual_seed(3)
    data = [classes(gen, 5), classes(gen, 4)]
    op = hesse.FisherOperator(
        layernorm(), nn.CrossEntropyLoss(reduction="sum"), data, kind=kind, mc_samples=2
    )
    torch.testing.assert_close(op.to_dense(), products(op), atol=1e-10, rtol=0)


@pytest.mark.parametrize("V", [4, 8], ids=["gram", "products"])  # N * K vs n
def test_flattened_tokens_with_ignored_targets(V):
    gen = torch.Generator().manual_seed(4)
    B, T = 2, 3
    data = []
    for _ in range(2):
        y = torch.randint(0, V, (B * T,), generator=gen)
        data.append((torch.randn(B, T, 3, generator=gen, dtype=DT), y))
    data[0][1][1] = -100
    data[1][1][[0, 4]] = -100
    model, loss = tokens(V), nn.CrossEntropyLoss()
    op = hesse.GGNOperator(model, loss, data)
    dense = op.to_dense()
    assert op._rows_independent is False  # NOTE [coupled rows]
    torch.testing.assert_close(dense, products(op), atol=1e-10, rtol=0)
    ref = autograd_ggn(model, loss, data, [5, 4])  # targets not ignored
    torch.testing.assert_close(dense, ref, atol=1e-10, rtol=0)


def test_column_block_is_the_submatrix():
    gen = torch.Generator().manual_seed(5)
    op = hesse.GGNOperator(mlp(), nn.CrossEntropyLoss(), [classes(gen, 6)])
    idx = torch.tensor([0, 3, 7, 20, 30])
    torch.testing.assert_close(op._dense_block(idx), op.to_dense()[idx][:, idx], atol=1e-12, rtol=0)


def test_map_chunks_total_sums_chunks_and_the_fallback():
    rows = torch.arange(10.0).reshape(5, 2)

    def batched(chunk):
        return chunk.T @ chunk

    def failing(chunk):
        raise RuntimeError("no vmap")

    expected = rows.T @ rows
    got = map_chunks(batched, None, 5, lambda s, e: rows[s:e], chunk_size=2, call="t", total=True)
    torch.testing.assert_close(got, expected)
    with pytest.warns(UserWarning, match="falling back"):
        got = map_chunks(
            failing,
            lambda r: torch.outer(r, r),
            5,
            lambda s, e: rows[s:e],
            chunk_size=2,
            call="t",
            total=True,
        )
    torch.testing.assert_close(got, expected)


def test_output_layer_alone_dense_and_diagonal():
    # The module output is the model output (last-layer Laplace): its VJP is the cotangent.
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    model, loss = nn.Linear(5, 3).to(DT), nn.CrossEntropyLoss()
    data = [classes(gen, 8)]
    op = hesse.GGNOperator(model, loss, data)
    ref = autograd_ggn(model, loss, data, [8])
    torch.testing.assert_close(op.to_dense(), ref, atol=1e-10, rtol=0)
    diag = hesse.diagonal(op, method="exact")
    torch.testing.assert_close(diag, ref.diagonal(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("make", [layernorm, tokens], ids=["samples", "coupled"])
def test_groups_of_rows_sum_to_the_whole(make):
    gen = torch.Generator().manual_seed(7)
    if make is tokens:
        batch = (torch.randn(2, 3, 3, generator=gen, dtype=DT), torch.randint(0, 4, (6,)))
    else:
        batch = classes(gen, 7)
    op = hesse.GGNOperator(make(), nn.CrossEntropyLoss(reduction="sum"), [batch])
    whole = op.to_dense()
    grouped = batch_factor_gram(op, op._factor, 0, *batch, columns=None, chunk_size=2, verify=False)
    torch.testing.assert_close(grouped, whole, atol=1e-12, rtol=0)
    idx = torch.tensor([1, 5, 9, 12])
    torch.testing.assert_close(op._dense_block(idx), whole[idx][:, idx], atol=1e-12, rtol=0)
