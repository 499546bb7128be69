"""NOTE [sweep chunks]: how many samples one curvature-propagation sweep carries.

The chunk sizes are chosen from measured time; here the clock is a fake one whose
reading advances by a chosen cost per vectorised sweep, so each choice (grow, settle,
the memory cap, a remainder joining a chunk, the caller's ``chunk_size``) is forced.
Every choice must give the same numbers: the diagonal of plain autograd double
backward (never ``torch.func.hessian``, wrong after Linear -> LayerNorm on torch
2.13), float64, to 1e-10, on a small attention block.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import hesse
from hesse import _chunking
from hesse.curvprop import _api
from hesse.curvprop._api import ChunkTuner
from tests.curvprop.test_chain import TOL, autograd_diagonal

D = torch.float64
B = 9


class Attention(nn.Module):
    """Single-head self-attention over T tokens, LayerNorm, mean-pooled, linear read-out."""

    def __init__(self, d: int = 4, c: int = 3) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 1, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, c)

    def forward(self, x):
        h = self.attn(x, x, x, need_weights=True)[0]
        return self.out(self.norm(x + h).mean(1))


def _problem():
    torch.manual_seed(0)
    model = Attention().to(D)
    return model, nn.CrossEntropyLoss(), torch.randn(B, 3, 4, dtype=D), torch.randint(0, 3, (B,))


@pytest.fixture(scope="module")
def problem():
    model, loss_fn, x, y = _problem()
    batch = autograd_diagonal(model, loss_fn, x, y)
    each = autograd_diagonal(model, loss_fn, x, y, per_sample=True)
    return model, loss_fn, x, y, batch, each


def _fake_clock(monkeypatch, cost):
    """A clock advanced by ``cost(samples)`` per vectorised sweep; the sweeps' sizes."""
    clock = SimpleNamespace(now=0.0, sizes=[])
    read = lambda: clock.now  # noqa: E731
    monkeypatch.setattr(_api, "time", SimpleNamespace(process_time=read, perf_counter=read))
    real_vmap = _api.vmap

    def vmap(f, *args, **kwargs):
        mapped = real_vmap(f, *args, **kwargs)
        if "batched" not in f.__qualname__:  # not a sweep (e.g. a per-sample chain map)
            return mapped

        def run(*inputs):
            clock.sizes.append(inputs[0].shape[0])
            clock.now += cost(inputs[0].shape[0])
            return mapped(*inputs)

        return run

    monkeypatch.setattr(_api, "vmap", vmap)
    monkeypatch.setattr(_api, "_TRACES", type(_api._TRACES)())  # a fresh trace, a fresh tuner
    # No cache-sized floor (NOTE [when to split]): the tuner's own choices from one sample.
    monkeypatch.setattr(_chunking, "EFFICIENT_CHUNK_BYTES", 1)
    return clock


def _check(model, loss_fn, x, y, batch, each):
    got = hesse.diagonal(hesse.HessianOperator(model, loss_fn, [(x, y)]), method="exact")
    torch.testing.assert_close(got, batch, **TOL)
    rows = hesse.per_sample_diagonal(model, loss_fn, x, y)
    flat = torch.cat([v.reshape(B, -1) for v in rows.values()], 1)
    torch.testing.assert_close(flat, each, **TOL)


def test_fixed_cost_grows_the_chunks(monkeypatch, problem):
    """A fixed cost per sweep (Python, dispatch): chunks double, then one sweep does it all."""
    model, loss_fn, x, y, batch, each = problem
    clock = _fake_clock(monkeypatch, lambda c: 10.0 + c)
    _check(model, loss_fn, x, y, batch, each)
    # First call: the first sample alone, then 2 and 4; the last 2 are a remainder.
    # Later calls (per_sample_diagonal): chunk 8, and the 9th sample joins it.
    assert clock.sizes == [1, 2, 4, 2, 9]
    assert clock.sizes[-1] == B


def test_growing_cost_settles_the_chunks(monkeypatch, problem):
    """Time per sample that grows with the chunk: two clear misses settle on one sample."""
    model, loss_fn, x, y, batch, each = problem
    clock = _fake_clock(monkeypatch, lambda c: float(c * c))
    _check(model, loss_fn, x, y, batch, each)
    assert clock.sizes == [1, 2, 2] + [1] * 4 + [1] * B


def test_memory_cap_bounds_the_chunks(monkeypatch, problem):
    """However cheap larger chunks look, they stay within SWEEP_CHUNK_BYTES."""
    model, loss_fn, x, y, batch, each = problem
    clock = _fake_clock(monkeypatch, lambda c: 10.0 + c)
    monkeypatch.setattr(_api, "SWEEP_CHUNK_BYTES", 1)
    _check(model, loss_fn, x, y, batch, each)
    assert set(clock.sizes) == {1}


@pytest.mark.parametrize("chunk_size", [2, 4, B])
def test_caller_chunk_size_is_used(monkeypatch, problem, chunk_size):
    model, loss_fn, x, y, batch, each = problem
    clock = _fake_clock(monkeypatch, lambda c: float(c * c))
    H = hesse.HessianOperator(model, loss_fn, [(x, y)])
    got = hesse.diagonal(H, method="exact", chunk_size=chunk_size)
    torch.testing.assert_close(got, batch, **TOL)
    rest = B - 1
    assert clock.sizes == [1] + [chunk_size] * (rest // chunk_size) + [rest % chunk_size] * (
        rest % chunk_size > 0
    )


def test_chunk_tuner_decisions():
    tuner = ChunkTuner()
    assert tuner.next(cap=64, floor=16) == 16  # at least the cache-sized chunk
    assert tuner.next(cap=3, floor=16) == 3  # never above the memory cap
    tuner.record(1, 1.0)
    assert tuner.next(cap=64, floor=1) == 2
    tuner.record(2, 1.0)  # 0.5 s per sample: kept
    assert (tuner.size, tuner.next(cap=64, floor=1)) == (2, 4)
    tuner.record(1, 0.1)  # a remainder says nothing about larger chunks
    assert tuner.size == 2
    tuner.record(4, 4 * 0.54)  # within SWEEP_SLOWER of the best: kept (larger is the bet)
    assert tuner.size == 4
    tuner.record(8, 8 * 0.7)  # clearly slower: one miss, try again
    assert (tuner.size, tuner.next(cap=64, floor=1)) == (4, 8)
    tuner.record(8, 8 * 0.7)  # second miss: settled
    assert tuner.next(cap=64, floor=1) == 4
