"""NOTE [math attention]: scaled_dot_product_attention inside hesse's calls, on plain torch."""

import pytest
import torch
from torch import nn

import hesse
from tests.models._reference import Block

DT = torch.float64


class Attention(nn.Module):
    """Causal single-layer attention through SDPA (``fused``) or written out."""

    def __init__(self, fused):
        super().__init__()
        self.qkv, self.out, self.fused = nn.Linear(4, 12), nn.Linear(4, 3), fused

    def forward(self, x):  # (B, T, 4) -> (B*T, 3)
        B, T, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, 2, 2).permute(2, 0, 3, 1, 4)
        if self.fused:
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.7)
        else:
            s = q @ k.transpose(-1, -2) * 0.7
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            a = torch.softmax(s, -1) @ v
        return self.out(torch.tanh(a.transpose(1, 2).reshape(B, T, 4))).flatten(0, 1)


def test_sdpa_models_match_the_written_out_attention(gen):
    torch.manual_seed(0)
    model = Attention(fused=True).to(DT)
    twin = Attention(fused=False).to(DT)
    twin.load_state_dict(model.state_dict())
    X = torch.randn(2, 5, 4, generator=gen, dtype=DT)
    Y = torch.randint(0, 3, (10,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    ref = Block(twin, loss_fn, X, Y, [k for k, _ in twin.named_parameters()])
    dense, ggn = ref.hessian(), ref.ggn()
    flash = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
    H = hesse.HessianOperator(model, loss_fn, [(X, Y)])
    G = hesse.GGNOperator(model, loss_fn, [(X, Y)])
    V = torch.randn(H.shape[0], 2, generator=gen, dtype=DT)
    torch.testing.assert_close(H @ V, dense @ V, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(G @ V[:, 0], ggn @ V[:, 0], rtol=1e-9, atol=1e-11)  # forward AD
    torch.testing.assert_close(G @ V, ggn @ V, rtol=1e-9, atol=1e-11)  # vmapped jvp
    torch.testing.assert_close(hesse.diagonal(H), dense.diagonal(), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(hesse.diagonal(G), ggn.diagonal(), rtol=1e-9, atol=1e-11)
    f = lambda x: loss_fn(model(x), Y)  # noqa: E731 - a function transform too
    Hx = hesse.hessian(f)(X).reshape(X.numel(), X.numel())
    twin_f = lambda x: loss_fn(twin(x), Y)  # noqa: E731
    torch.testing.assert_close(Hx, torch.autograd.functional.hessian(twin_f, X).reshape(Hx.shape))
    # the backend choice is hesse's only inside its calls
    assert (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    ) == flash


class FlashOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        q = self.lin(x).reshape(x.shape[0], 1, 2, 2)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0]
        return out.reshape(x.shape[0], 4)


def test_attention_without_second_derivatives_is_named():
    data = [(torch.randn(3, 4), torch.randn(3, 4))]
    H = hesse.HessianOperator(FlashOnly(), nn.MSELoss(), data)
    with pytest.raises(
        NotImplementedError,
        match=r"HessianOperator\(model, loss_fn, data\): the model needs a derivative of "
        r"aten::_scaled_dot_product_flash_attention_for_cpu_backward that PyTorch does not",
    ):
        H @ torch.ones(H.shape[0])
    G = hesse.GGNOperator(FlashOnly(), nn.MSELoss(), data)
    with pytest.raises(NotImplementedError, match="derivative of _scaled_dot_product_flash"):
        G @ torch.ones(G.shape[0])
