"""The batched double backward (NOTE [batched backward]) and the priced strategy race.

Every path is checked against plain autograd double backward, one row at a time
(no vmap anywhere in the reference), in float64 to 1e-10.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hesse
import hesse._hvp as hvp_module
from hesse._hvp import FlatHVP, batched_grad
from tests.problems import Residual

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def loop_hessian(f, x: torch.Tensor) -> torch.Tensor:
    """Row by row with torch.autograd.grad: the reference that needs no batching rule."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    g = g.reshape(-1)
    rows = []
    for i in range(g.numel()):
        (r,) = torch.autograd.grad(g[i], x, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(x) if r is None else r)
    return torch.stack(rows).reshape(g.numel(), -1)


def param_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The loss as a function of the flat parameter vector, and that vector."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(v: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(v, [s.numel() for s in shapes])
        params = {k: c.reshape(s) for k, c, s in zip(names, pieces, shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return f, flat


class TiedWeight(nn.Module):
    """One weight used twice (a tied encoder/decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return torch.tanh(x @ self.w.T) @ self.w[:, :3]


class _SquareNoVmap(torch.autograd.Function):
    """x^2 with a backward but no vmap rule: functorch cannot batch through it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def _seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = model.to(DT)
    with torch.no_grad():  # away from the initialisation's symmetric values
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


CASES = {
    # torch.func.hessian (forward over reverse) gets these input-weight terms wrong in
    # torch 2.13; the batched double backward must not.
    "linear-layernorm": lambda: (_seeded(Residual()), (5, 4)),
    "tied-weight": lambda: (_seeded(TiedWeight()), (5, 4)),
    "batchnorm-train": lambda: (
        _seeded(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))),
        (6, 4),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_grad_matches_row_by_row_double_backward(case: str) -> None:
    model, shape = CASES[case]()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (shape[0],), generator=gen)
    f, flat = param_loss(model, x, y)
    ref = loop_hessian(f, flat)
    p = flat.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(p), p, create_graph=True)
    eye = torch.eye(p.numel(), dtype=DT)
    (H,) = batched_grad(g, [p], eye)
    torch.testing.assert_close(H, ref, **TOL)
    for mode in ("auto", "reverse-over-reverse"):
        torch.testing.assert_close(hesse.hessian(f, mode=mode)(flat), ref, **TOL)
    if case != "batchnorm-train":  # in place in train mode: forward-over-reverse refuses it
        # hesse's own vmap(jvp(grad)) is right where torch.func.hessian is not (LayerNorm).
        H = hesse.hessian(f, mode="forward-over-reverse")(flat)
        torch.testing.assert_close(H, ref, **TOL)


def test_race_won_by_forward_over_reverse_is_right_after_layernorm(monkeypatch) -> None:
    """NOTE [strategy race]: a switch to forward-over-reverse keeps the LayerNorm terms."""
    model, shape = CASES["linear-layernorm"]()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (shape[0],), generator=gen)
    f, flat = param_loss(model, x, y)
    monkeypatch.setattr(hvp_module, "RACE_MIN_SECONDS", 0.0)
    monkeypatch.setattr(hvp_module, "RACE_MARGIN", float("inf"))  # forward-over-reverse wins
    engine = FlatHVP(f, (flat,), 0, call="test")
    H = engine.apply(flat.numel(), None, chunk_size=4)
    assert engine.mode == "forward-over-reverse"
    torch.testing.assert_close(H, loop_hessian(f, flat), **TOL)


def test_batched_grad_unreached_input_gives_zeros() -> None:
    a = torch.randn(3, dtype=DT, requires_grad=True)
    b = torch.randn(2, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad((a**3).sum(), a, create_graph=True)
    ga, gb = batched_grad(g, [a, b], torch.eye(3, dtype=DT))
    torch.testing.assert_close(ga, torch.diag(6 * a.detach()), **TOL)
    assert gb.shape == (3, 2) and not gb.any()


def test_custom_function_without_vmap_hands_over_and_agrees() -> None:
    x = torch.randn(6, dtype=DT)
    f = lambda x: (_SquareNoVmap.apply(x) * x.roll(1)).sum() ** 2  # noqa: E731
    ref = loop_hessian(f, x)
    p = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(p), p, create_graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hesse.LoopFallbackWarning)
        torch.testing.assert_close(hesse.hessian(f)(x), ref, **TOL)
        try:  # functorch cannot batch it; the legacy batching may or may not
            (H,) = batched_grad(g, [p], torch.eye(6, dtype=DT))
        except Exception:  # noqa: BLE001 - then hesse.hessian's loop above covered it
            return
    torch.testing.assert_close(H, ref, **TOL)


def test_priced_race_runs_both_strategies_and_agrees(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(40, 7, dtype=DT, generator=gen)
    f = lambda x: torch.tanh(x @ W).pow(2).sum() + (x.sin() * x.roll(1)).sum()  # noqa: E731
    x = torch.randn(40, dtype=DT, generator=gen)
    ref = loop_hessian(f, x)
    monkeypatch.setattr(hvp_module, "RACE_MIN_SECONDS", 0.0)  # race even this small job
    raced = []
    original = FlatHVP._fwdrev_batched

    def spy(self, vs):
        raced.append(vs.shape[0])
        return original(self, vs)

    monkeypatch.setattr(FlatHVP, "_fwdrev_batched", spy)
    torch.testing.assert_close(hesse.hessian(f, chunk_size=8)(x), ref, **TOL)
    assert raced and raced[0] == 8  # the second chunk ran forward-over-reverse


def test_small_job_runs_no_race(monkeypatch) -> None:
    f = lambda x: (x.sin() * x.roll(1)).sum()  # noqa: E731
    x = torch.randn(30, dtype=DT)
    monkeypatch.setattr(
        FlatHVP, "_fwdrev_batched", lambda self, vs: pytest.fail("raced a millisecond job")
    )
    torch.testing.assert_close(hesse.hessian(f, chunk_size=5)(x), loop_hessian(f, x), **TOL)


@pytest.mark.parametrize("mode", ["auto", "reverse-over-reverse", "forward-over-reverse"])
def test_per_sample_hessians_under_vmap(mode: str) -> None:
    """NOTE [under a transform]: vmap(hesse.hessian(f)) gives one Hessian per sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(4, 6, generator=gen, dtype=DT)
    T = torch.randint(0, 3, (4,), generator=gen)

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x[None]), t[None])

    ref = torch.stack([loop_hessian(lambda x, t=t: f(x, t), x) for x, t in zip(X, T)])
    got = torch.vmap(hesse.hessian(f, mode=mode, chunk_size=4))(X, T)
    torch.testing.assert_close(got, ref, **TOL)
    V = torch.randn(4, 6, generator=gen, dtype=DT)
    _, (hv,) = torch.vmap(lambda x, t, v: hesse.hvp(lambda x: f(x, t), (x,), (v,)))(X, T, V)
    torch.testing.assert_close(hv, torch.einsum("bij,bj->bi", ref, V), **TOL)


def test_basis_rows_reuse_one_buffer_exactly() -> None:
    from hesse._hvp import basis_rows

    eye = torch.eye(7, dtype=DT)
    rows = basis_rows(7, eye, capacity=3)
    for start, stop in [(0, 3), (3, 6), (6, 7), (0, 2), (1, 7), (2, 4)]:
        assert torch.equal(rows(start, stop), eye[start:stop]), (start, stop)


def _chunk_sizes(monkeypatch) -> list[int]:
    """Rows of every reverse-over-reverse chunk hesse.hessian runs, recorded."""
    sizes: list[int] = []
    original = FlatHVP._revrev_batched

    def spy(self, vs):
        sizes.append(vs.shape[0])
        return original(self, vs)

    monkeypatch.setattr(FlatHVP, "_revrev_batched", spy)
    return sizes


@pytest.mark.parametrize("case", ["tied-weight", "linear-layernorm", "batchnorm-train"])
def test_split_rule_chunks_heavy_rows_and_agrees(case: str, monkeypatch) -> None:
    """NOTE [when to split]: parameter Hessians (intermediates >> a row) go in cache-sized chunks."""
    import hesse._chunking as chunking

    model, shape = CASES[case]()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (shape[0],), generator=gen)
    f, flat = param_loss(model, x, y)
    engine = FlatHVP(f, (flat,), 0, call="t")
    per_row = engine._per_row_bytes()
    assert engine._split  # rows carry far more intermediates than their own n entries
    monkeypatch.setattr(chunking, "EFFICIENT_CHUNK_BYTES", 5 * per_row)  # the cap: 5 rows
    monkeypatch.setattr(hvp_module, "EFFICIENT_CHUNK_BYTES", 5 * per_row)
    sizes = _chunk_sizes(monkeypatch)
    torch.testing.assert_close(hesse.hessian(f)(flat), loop_hessian(f, flat), **TOL)
    assert sizes and max(sizes) <= 5 < flat.numel()


@pytest.mark.parametrize("n", [1, 7, 60])
def test_split_rule_one_pass_for_light_rows_and_agrees(n: int, monkeypatch) -> None:
    """NOTE [when to split]: sum(sin(x)) carries 2 rows of intermediates: one pass, any cap."""
    import hesse._chunking as chunking

    x = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(n))
    f = lambda x: torch.sin(x).sum() + (x[1:] * x[:-1]).sum()  # noqa: E731
    engine = FlatHVP(f, (x,), 0, call="t")
    engine._per_row_bytes()
    assert not engine._split
    monkeypatch.setattr(chunking, "EFFICIENT_CHUNK_BYTES", 64)  # would cut every row apart
    monkeypatch.setattr(hvp_module, "EFFICIENT_CHUNK_BYTES", 64)
    sizes = _chunk_sizes(monkeypatch)
    expected = torch.diag(-torch.sin(x)) + torch.diag(torch.ones(n - 1, dtype=DT), 1)
    expected = expected + torch.diag(torch.ones(n - 1, dtype=DT), -1)
    torch.testing.assert_close(hesse.hessian(f)(x), expected, **TOL)
    torch.testing.assert_close(hesse.hessian(f)(x), loop_hessian(f, x), **TOL)
    assert sizes == [n, n]  # one pass per call


def test_scalar_input_hessian_keeps_its_shape() -> None:
    x = torch.tensor(0.7, dtype=DT)
    H = hesse.hessian(lambda x: x.sin() * x)(x)
    assert H.shape == ()
    torch.testing.assert_close(H, torch.func.hessian(lambda x: x.sin() * x)(x), **TOL)


@pytest.mark.parametrize("batch", [1, 3])
def test_per_sample_hessians_default_chunks_agree(batch: int) -> None:
    """vjp of grad under vmap, sized by the VJP's own allocations (NOTE [memory estimate])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(batch, 6, generator=gen, dtype=DT)
    T = torch.randint(0, 3, (batch,), generator=gen)

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.nll_loss(nn.functional.log_softmax(model(x[None]), -1), t[None])

    ref = torch.stack([loop_hessian(lambda x, t=t: f(x, t), x) for x, t in zip(X, T)])
    torch.testing.assert_close(torch.vmap(hesse.hessian(f))(X, T), ref, **TOL)


MEASURED = {
    "sum-sin": (lambda x: torch.sin(x).sum(), 40),
    "rosenbrock": (lambda x: (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum(), 30),
    "layernorm": (lambda x: torch.tanh(nn.functional.layer_norm(x.reshape(4, -1), (6,))).sum(), 24),
    "no-vmap-rule": (lambda x: (_SquareNoVmap.apply(x) * x.roll(1)).sum() ** 2, 6),
}


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch) -> None:
    """Each test sees no settled vectoriser choice (NOTE [batched backward])."""
    monkeypatch.setattr(hvp_module, "_chosen", {})


@pytest.mark.parametrize("case", list(MEASURED))
def test_measured_vectoriser_choice_times_both_and_agrees(case: str, monkeypatch) -> None:
    """NOTE [batched backward]: the first call of a job times vmap and the legacy batching
    in turn and settles the choice; every call equals row-by-row double backward."""
    monkeypatch.setattr(hvp_module, "_timings", {})
    f, n = MEASURED[case]
    x = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=DT)
    ref = loop_hessian(f, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hesse.LoopFallbackWarning)
        for call in range(3):
            torch.testing.assert_close(hesse.hessian(f, mode="reverse-over-reverse")(x), ref, **TOL)
            if call == 0:  # the first call explored both and settled
                (times,) = hvp_module._timings.values()
                for name in ("vmap", "legacy"):
                    assert len(times[name]) >= hvp_module.EXPLORE_CALLS
                assert len(hvp_module._chosen) == 1


def test_measured_choice_where_vmap_raises_keeps_the_legacy_batching(monkeypatch) -> None:
    """A graph functorch cannot batch marks vmap as never chosen; values stay right."""

    def failing_vmap(fn):
        def batched(*args):
            raise RuntimeError("vmap: no batching rule (simulated)")

        return batched

    monkeypatch.setattr(hvp_module, "_timings", {})
    monkeypatch.setattr(hvp_module, "vmap", failing_vmap)
    f, n = MEASURED["rosenbrock"]
    x = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=DT)
    ref = loop_hessian(f, x)
    for _ in range(3):
        torch.testing.assert_close(hesse.hessian(f, mode="reverse-over-reverse")(x), ref, **TOL)
    (times,) = hvp_module._timings.values()
    assert times["vmap"] == [float("inf")] * hvp_module.EXPLORE_CALLS


@pytest.mark.parametrize("chosen", ["vmap", "legacy"])
def test_measured_vectoriser_choice_uses_the_faster(chosen: str, monkeypatch) -> None:
    """Once both are timed, the one with the lower minimum runs, and it is right."""
    f, n = MEASURED["rosenbrock"]
    x = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=DT)
    slow = [1.0] * hvp_module.EXPLORE_CALLS
    fast = [1e-3] * hvp_module.EXPLORE_CALLS
    quick = [1e-4] * hvp_module.EXPLORE_CALLS
    times = {"vmap": fast, "legacy": slow} if chosen == "vmap" else {"vmap": fast, "legacy": quick}
    key = (f.__code__, torch.Size([n, n]), DT, torch.get_num_threads())
    monkeypatch.setattr(hvp_module, "_timings", {key: times})
    ran = []
    monkeypatch.setattr(hvp_module, "_legacy", _spy(hvp_module._legacy, ran, "legacy"))
    monkeypatch.setattr(hvp_module, "_vectorised", _spy(hvp_module._vectorised, ran, "vmap"))
    H = hesse.hessian(f, mode="reverse-over-reverse")(x)
    torch.testing.assert_close(H, loop_hessian(f, x), **TOL)
    assert ran == [chosen]


def _spy(fn, ran: list[str], name: str):
    def spied(*args, **kwargs):
        ran.append(name)
        return fn(*args, **kwargs)

    return spied


def test_slow_jobs_never_try_the_legacy_batching(monkeypatch) -> None:
    """A job whose vmap calls take at least EXPLORE_SECONDS keeps vmap without trying."""
    monkeypatch.setattr(hvp_module, "_timings", {})
    monkeypatch.setattr(hvp_module, "EXPLORE_SECONDS", 0.0)
    f, n = MEASURED["sum-sin"]
    x = torch.randn(n, dtype=DT)
    for _ in range(3):
        hesse.hessian(f, mode="reverse-over-reverse")(x)
    (times,) = hvp_module._timings.values()
    assert times["legacy"] == []


def _count_calls(monkeypatch, name: str) -> list[int]:
    """A fresh memory memo, and a list that grows by one per call of ``hvp_module.name``."""
    counted: list[int] = []
    original = getattr(hvp_module, name)

    def counting(*args, **kwargs):
        counted.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(hvp_module, name, counting)
    monkeypatch.setattr(hvp_module, "_saved_memo", {})
    return counted


def test_memory_memo_counts_once_per_function_and_shapes(monkeypatch) -> None:
    """NOTE [memory memo]: a repeated call reuses the saved-bytes count; other shapes of
    any argument count again; values equal double backward either way."""
    counted = _count_calls(monkeypatch, "saved_bytes")

    def f(x, a):
        return (torch.tanh(a @ x) ** 2).sum()

    x = torch.randn(7, generator=torch.Generator().manual_seed(6), dtype=DT)
    for rows in (5, 5, 9, 5):
        a = torch.randn(rows, 7, generator=torch.Generator().manual_seed(rows), dtype=DT)
        ref = loop_hessian(lambda v, a=a: f(v, a), x)
        torch.testing.assert_close(hesse.hessian(f, mode="reverse-over-reverse")(x, a), ref, **TOL)
    assert len(counted) == 2  # rows=5 once, rows=9 once


def test_memory_memo_under_vmap_counts_the_vjp_once(monkeypatch) -> None:
    """NOTE [memory memo] under a transform: per-sample Hessians (``vmap`` of
    ``hesse.hessian``) count the VJP's allocations on the first call only; each call
    equals row-by-row double backward per sample."""
    counted = _count_calls(monkeypatch, "allocated_bytes")
    a = torch.randn(5, 7, generator=torch.Generator().manual_seed(7), dtype=DT)

    def f(x):
        return (torch.tanh(a @ x) ** 2).sum() + x.pow(3).sum()

    X = torch.randn(3, 7, generator=torch.Generator().manual_seed(8), dtype=DT)
    for _ in range(3):
        got = torch.vmap(hesse.hessian(f))(X)
        torch.testing.assert_close(got, torch.stack([loop_hessian(f, x) for x in X]), **TOL)
    assert len(counted) == 1
