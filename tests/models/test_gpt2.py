"""A HuggingFace GPT-2 causal LM (tiny config, random init, float64) against plain autograd.

The operators run the model with ``scaled_dot_product_attention`` (``attn_implementation
= "sdpa"``, whose CPU kernel has no double backward) or eager attention; the references
always run an eager-attention twin with the same weights, so the SDPA path is checked
against an independent implementation. Logits are flattened to ``(B*T, V)`` with
``nn.CrossEntropyLoss`` or kept ``(B, T, V)`` with a token-mean loss. The parameter
block holds the tied embedding (``wte`` is also ``lm_head``), a LayerNorm and the
attention's QKV projection.
"""

import warnings

import pytest
import torch
from torch import nn

import hesse
from tests.models._reference import Block

transformers = pytest.importorskip("transformers")

DT = torch.float64
B, T, V = 2, 4, 11
NAMES = ["m.transformer.wte.weight", "m.transformer.h.0.ln_1.weight", "m.transformer.h.0.attn.c_attn.bias"]  # fmt: skip


class LM(nn.Module):
    def __init__(self, m, flat):
        super().__init__()
        self.m, self.flat = m, flat

    def forward(self, ids):
        logits = self.m(input_ids=ids, use_cache=False).logits
        return logits.flatten(0, 1) if self.flat else logits


def token_mean(logits, y):
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def models(attn, flat):
    """``(model, eager twin)`` with the same weights."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=V, n_positions=T, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    cfg._attn_implementation = attn
    m = transformers.GPT2LMHeadModel(cfg).to(DT).eval()
    cfg_eager = transformers.GPT2Config(**cfg.to_dict())
    cfg_eager._attn_implementation = "eager"
    twin = transformers.GPT2LMHeadModel(cfg_eager).to(DT).eval()
    twin.load_state_dict(m.state_dict())
    assert m.lm_head.weight is m.transformer.wte.weight  # tied
    return LM(m, flat), LM(twin, flat)


def problem(attn, flat):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    model, twin = models(attn, flat)
    loss_fn = nn.CrossEntropyLoss() if flat else token_mean
    targets = y.flatten() if flat else y
    return model, loss_fn, [(ids, targets)], Block(twin, loss_fn, ids, targets, NAMES)


@pytest.mark.parametrize("attn,flat", [("sdpa", True), ("eager", False), ("sdpa", False)])
def test_hessian_products_and_exact_diagonal(attn, flat, gen):
    model, loss_fn, data, ref = problem(attn, flat)
    H = hesse.HessianOperator(model, loss_fn, data, params=NAMES)
    dense = ref.hessian()
    X = torch.randn(H.shape[0], 2, generator=gen, dtype=DT)
    torch.testing.assert_close(H @ X, dense @ X, rtol=1e-8, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hesse.CurvpropFallbackWarning)  # traced, not HVPs
        diag = hesse.diagonal(H, method="exact")
    torch.testing.assert_close(diag, dense.diagonal(), rtol=1e-8, atol=1e-10)


def test_kept_graphs_give_the_autograd_hessian(gen):
    """``cache_graphs=True`` and a graph session (``to_dense``) through the tied GPT-2."""
    model, loss_fn, data, ref = problem("sdpa", True)
    cached = hesse.HessianOperator(model, loss_fn, data, params=NAMES, cache_graphs=True)
    X = torch.randn(cached.shape[0], 2, generator=gen, dtype=DT)
    expected = ref.hvp(X)
    for _ in range(2):  # builds and keeps the graph, then answers from it
        torch.testing.assert_close(cached @ X, expected, rtol=0, atol=1e-10)
    assert cached._graphs.entries
    H = hesse.HessianOperator(model, loss_fn, data, params=NAMES)
    H.chunk_size = 64  # two products, one forward
    torch.testing.assert_close(H.to_dense() @ X, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("attn,flat", [("sdpa", True), ("eager", False)])
def test_ggn_products_and_exact_diagonal(attn, flat, gen):
    model, loss_fn, data, ref = problem(attn, flat)
    kwargs = {}
    if not flat:  # a token-mean callable: the GGN needs the output Hessian, give it in closed form

        def blocks(out, y):
            p = torch.softmax(out, -1)  # (B, T, V) -> per-sample (T*V) blocks, token-mean scaled
            h = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
            full = torch.zeros(out.shape[0], T, V, T, V, dtype=out.dtype)
            for t in range(T):
                full[:, t, :, t, :] = h[:, t]
            return full.reshape(out.shape[0], T * V, T * V) / (out.shape[0] * T)

        kwargs = {"output_hessian": blocks}
    G = hesse.GGNOperator(model, loss_fn, data, params=NAMES, **kwargs)
    dense = ref.ggn()
    X = torch.randn(G.shape[0], 2, generator=gen, dtype=DT)
    torch.testing.assert_close(G @ X, dense @ X, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(hesse.diagonal(G), dense.diagonal(), rtol=1e-8, atol=1e-10)
    assert G._rows_per_sample == (T if flat else 1)  # NOTE [coupled rows]: per sequence


@pytest.mark.parametrize("flat", [False, True])
def test_per_sample_diagonals_and_eigsh(flat, gen):
    """Per-sample diagonals with (B, T) targets, or (B*T,) targets grouped T per sample."""
    model, loss_fn, data, ref = problem("sdpa", flat)
    ((ids, y),) = data
    params = {k: v for k, v in model.named_parameters() if k in NAMES}
    per = hesse.per_sample_diagonal(model, loss_fn, ids, y, params=params)
    got = torch.cat([per[k].reshape(B, -1) for k in NAMES], 1)
    expected = ref.per_sample_hessian_diagonals(1 / B, group=T if flat else 1)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    if flat:
        return
    H = hesse.HessianOperator(model, loss_fn, data, params=NAMES)
    result = hesse.eigsh(H, 2, which="LA", generator=gen)
    top = torch.linalg.eigvalsh(ref.hessian())[-2:]
    torch.testing.assert_close(result.eigenvalues.sort().values, top, rtol=1e-6, atol=1e-8)
