"""Chunk sizing of curvature propagation: the in-sweep memory estimate and the first call.

NOTE [memory estimate from the sweep] in ``hesse.curvprop._api``: the first sample's
sweep counts the bytes it makes; four times that count must bound what a dispatch
mode that sees every allocation counts (itself an upper bound on the peak), and the
first call must sweep each sample once (no second, instrumented run of a sample).
"""

import pytest
import torch
from torch import nn
from torch.func import vmap
from torch.utils._python_dispatch import _get_current_dispatch_mode

import hesse
from hesse._chunking import allocated_bytes
from hesse.curvprop import _api

DT = torch.float64


def _mlp():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.GELU(), nn.LayerNorm(12),
        nn.Linear(12, 4),
    ).to(DT)  # fmt: skip
    x, y = torch.randn(3, 6, dtype=DT), torch.tensor([0, 3, 1])
    return net, nn.CrossEntropyLoss(), x, y


class Attention(nn.Module):
    """One softmax-attention head with a residual stream and LayerNorm."""

    def __init__(self, d: int = 6, v: int = 5) -> None:
        super().__init__()
        self.qkv, self.ln, self.out = nn.Linear(d, 3 * d), nn.LayerNorm(d), nn.Linear(d, v)

    def forward(self, x):
        q, k, w = self.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ w
        return self.out(self.ln(x + a)).flatten(0, 1)


def _attention():
    torch.manual_seed(0)
    x, y = torch.randn(2, 4, 6, dtype=DT), torch.randint(0, 5, (8,))
    return Attention().to(DT), nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("make", [_mlp, _attention])
@pytest.mark.parametrize("method", ["exact", "becker-lecun"])
def test_sweep_estimate_bounds_every_allocation(make, method):
    model, loss_fn, x, y = make()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tr = _api.prepare("test", model, loss_fn, params, x, y)
    plist = [params[k] for k in tr.names]
    others = _api._others(model, params)
    olist = [others[k] for k in tr.others]
    grouped = _api.by_sample(x, y)
    holder: list = []

    def first_sample():
        return vmap(lambda a, b: _api.sample_row(tr, method, plist, olist, a[None], b, holder))(
            x[:1], grouped[:1]
        )

    _, counted = allocated_bytes(first_sample)
    made = holder[0].made_bytes
    assert made > 0
    assert counted <= _api.SWEEP_OVERHEAD * made


@pytest.mark.parametrize("make", [_mlp, _attention])
def test_first_call_sweeps_each_sample_once(make, monkeypatch):
    model, loss_fn, x, y = make()
    sweeps, modes = [], []
    real = _api.sample_row

    def counted(tr, method, plist, olist, x, *rest):
        # Under vmap ``x`` is one sample; count the samples of the batch it stands for.
        level = torch._C._functorch
        modes.append(_get_current_dispatch_mode())
        sweeps.append(level.get_unwrapped(x).shape[0] if level.is_batchedtensor(x) else 1)
        return real(tr, method, plist, olist, x, *rest)

    monkeypatch.setattr(_api, "sample_row", counted)
    H = hesse.HessianOperator(model, loss_fn, [(x, y)])
    got = hesse.diagonal(H, method="exact")
    assert sum(sweeps) == x.shape[0]  # the memory estimate costs no extra sweep ...
    assert modes == [None] * len(modes)  # ... and no sweep under a counting dispatch mode
    assert torch.allclose(got, H.to_dense().diagonal(), atol=1e-10, rtol=1e-10)
