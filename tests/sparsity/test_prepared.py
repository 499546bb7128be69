"""The prepared reuse path of sparse_hessian (pattern=), its compiled mode, and the
one-shot cost model (dense products vs colouring), against dense references."""

import shutil
import warnings

import pytest
import torch

import hesse
import hesse.sparsity._prepared as prepared_module
import hesse.sparsity._sparse as sparse_module
from hesse.sparsity._prepared import STRATEGIES, CompileFallbackWarning
from tests.problems import double_backward_hessian

from .classic import ARWHEAD, BDQRTIC


def rosenbrock(x):  # chained (tridiagonal Hessian)
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def stencil5(u):
    m = int(round(u.shape[0] ** 0.5))
    g = u.reshape(m, m)
    dx, dy = g[1:, :] - g[:-1, :], g[:, 1:] - g[:, :-1]
    return 0.5 * (dx**2).sum() + 0.5 * (dy**2).sum() - 0.1 * torch.exp(g).sum()


def brusselator(w):
    m = int(round((w.shape[0] // 2) ** 0.5))
    u, v = w[: m * m].reshape(m, m), w[m * m :].reshape(m, m)

    def lap(z):
        rolls = [torch.roll(z, s, a) for s in (1, -1) for a in (0, 1)]
        return sum(rolls) - 4 * z

    fu = 1 + u * u * v - 4.4 * u + 0.3 * lap(u)
    fv = 3.4 * u - u * u * v + 0.3 * lap(v)
    return 0.5 * ((fu**2).sum() + (fv**2).sum())


PROBLEMS = {
    "rosenbrock": (rosenbrock, 40),
    "stencil-5": (stencil5, 36),
    "brusselator": (brusselator, 50),
    "arwhead": (ARWHEAD, 30),
    "bdqrtic": (BDQRTIC, 30),
}


def _point(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)


def _close(H, ref):
    scale = max(ref.abs().max().item(), 1.0)
    assert (H.to_dense() - ref).abs().max().item() <= 1e-10 * scale


@pytest.mark.parametrize("coloring", ["auto", "acyclic", "star"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_reuse_equals_dense_at_new_points(name, coloring):
    f, n = PROBLEMS[name]
    pattern = hesse.hessian_sparsity(f)(_point(n, 0))
    step = hesse.sparse_hessian(f, pattern=pattern, coloring=coloring)
    for seed in range(3):  # the first call prepares, the others reuse
        x = _point(n, seed)
        _close(step(x), double_backward_hessian(f, x))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_raced_strategy_gives_the_same_hessian(strategy, monkeypatch):
    # NOTE [prepared strategy]: whichever strategy wins, the values are the dense ones
    monkeypatch.setattr(prepared_module, "STRATEGIES", (strategy,))
    monkeypatch.setattr(prepared_module, "RACE_MIN_SECONDS", 0.0)
    f, n = PROBLEMS["brusselator"]
    step = hesse.sparse_hessian(f, pattern=hesse.hessian_sparsity(f)(_point(n, 0)))
    step(_point(n, 0))
    prep = next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, dict))
    (p,) = prep.values()
    assert (p.mode, p.chunk_size) == strategy
    x = _point(n, 7)
    _close(step(x), double_backward_hessian(f, x))


def test_the_repeated_call_neither_colours_nor_checks(monkeypatch):
    # NOTE [prepared reuse]: after the first call, only the products and the recovery run
    f, n = PROBLEMS["bdqrtic"]
    step = hesse.sparse_hessian(f, pattern=hesse.hessian_sparsity(f)(_point(n, 0)))
    step(_point(n, 0))

    def never(*args, **kwargs):
        raise AssertionError("ran on a repeated call")

    for name in ("_plan", "_kind", "_check_pattern", "_from_torch", "symmetric"):
        monkeypatch.setattr(sparse_module, name, never)
    x = _point(n, 4)
    _close(step(x), double_backward_hessian(f, x))


def test_reuse_of_a_zero_hessian():
    empty = torch.zeros(5, 5, dtype=torch.bool)
    step = hesse.sparse_hessian(lambda x: 3 * x.sum(), pattern=empty, compile=True)
    for seed in (0, 1):
        H = step(_point(5, seed))
        assert H.to_dense().abs().max().item() == 0.0


def test_reuse_with_a_changing_extra_argument():
    def f(x, a):
        return (a * (x[1:] - x[:-1] ** 2) ** 2).sum() + (x**4).sum()

    n = 20
    pattern = hesse.hessian_sparsity(f)(_point(n, 0), torch.tensor(1.0, dtype=torch.float64))
    step = hesse.sparse_hessian(f, pattern=pattern)
    for a in (1.0, 3.0, -2.0):
        a = torch.tensor(a, dtype=torch.float64)
        x = _point(n, int(a.item()) + 5)
        _close(step(x, a), double_backward_hessian(lambda v, a=a: f(v, a), x))


def test_a_wrong_pattern_is_reported_on_the_first_call():
    f, n = PROBLEMS["stencil-5"]
    x = _point(n, 0)
    tridiagonal = hesse.hessian_sparsity(rosenbrock)(_point(n, 0))
    with pytest.raises(ValueError, match=r"hesse.sparse_hessian\(f\)\(x\): the pattern misses"):
        hesse.sparse_hessian(f, pattern=tridiagonal)(x)


def test_a_stale_pattern_of_another_size_is_refused():
    f, n = PROBLEMS["rosenbrock"]
    step = hesse.sparse_hessian(f, pattern=hesse.hessian_sparsity(f)(_point(n, 0)))
    step(_point(n, 0))
    with pytest.raises(ValueError, match=r"expected pattern of shape \(42, 42\)"):
        step(_point(n + 2, 0))


def test_compile_option_errors():
    f = PROBLEMS["rosenbrock"][0]
    x = _point(40, 0)
    with pytest.raises(ValueError, match=r"compile=True compiles .* got no pattern="):
        hesse.sparse_hessian(f, compile=True)(x)
    with pytest.raises(TypeError, match=r"expected compile to be True or False, got"):
        hesse.sparse_hessian(f, pattern=torch.eye(40), compile="yes")(x)


def test_compile_failure_falls_back_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(prepared_module, "compiled_entries", broken)
    f, n = PROBLEMS["arwhead"]
    step = hesse.sparse_hessian(f, pattern=hesse.hessian_sparsity(f)(_point(n, 0)), compile=True)
    with pytest.warns(CompileFallbackWarning, match=r"compile=True: torch.compile failed"):
        step(_point(n, 0))
    x = _point(n, 3)
    _close(step(x), double_backward_hessian(f, x))


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile (Inductor) needs a C++ compiler on the CPU",
)
def test_compiled_reuse_equals_dense():
    f, n = PROBLEMS["rosenbrock"]
    step = hesse.sparse_hessian(f, pattern=hesse.hessian_sparsity(f)(_point(n, 0)), compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        step(_point(n, 0))
    prep = next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, dict))
    assert next(iter(prep.values()))._compiled is not None  # the compiled path serves
    for seed in (1, 2):
        x = _point(n, seed)
        _close(step(x), double_backward_hessian(f, x))


_FLOOR = sparse_module._coloring_floor


def _one_shot(f, x, monkeypatch, node_seconds, edge_seconds, floor=False):
    # the colouring floor before detection off unless asked: each decision forced alone
    monkeypatch.setattr(sparse_module, "_coloring_floor", _FLOOR if floor else lambda n: 0.0)
    monkeypatch.setattr(sparse_module, "DETECT_NODE_SECONDS", node_seconds)
    monkeypatch.setattr(sparse_module, "COLOR_EDGE_SECONDS", edge_seconds)
    monkeypatch.setattr(sparse_module, "JIT_EDGE_SECONDS", edge_seconds)
    sparse_module._CACHE.clear()
    sparse_module._PATTERNS.clear()
    return hesse.sparse_hessian(f)(x)


@pytest.mark.parametrize("name", ["rosenbrock", "bdqrtic"])
def test_cost_model_dense_paths_give_the_same_hessian(name, monkeypatch):
    # NOTE [one-shot cost model], forced each way: sparse, dense after detection (the
    # same stored entries), dense before detection (all n^2 entries stored)
    f = PROBLEMS[name][0]
    n = 300
    x = _point(n, 1)
    sparse = _one_shot(f, x, monkeypatch, 0, 0.0)
    after = _one_shot(f, x, monkeypatch, 0, 1e9)
    before = _one_shot(f, x, monkeypatch, 1e9, 0.0)
    assert torch.equal(sparse.crow_indices(), after.crow_indices())
    assert torch.equal(sparse.col_indices(), after.col_indices())
    assert before.values().numel() == n * n
    ref = double_backward_hessian(f, x)
    for H in (sparse, after, before):
        _close(H, ref)


def test_cost_model_skips_colouring_and_detection_when_dense_is_cheaper(monkeypatch):
    def never(*args):
        raise AssertionError("not reached")

    f = PROBLEMS["rosenbrock"][0]
    x = _point(300, 2)
    monkeypatch.setattr(sparse_module, "_plan", never)
    _close(_one_shot(f, x, monkeypatch, 0, 1e9), double_backward_hessian(f, x))
    monkeypatch.setattr(sparse_module, "_detect", never)
    _close(_one_shot(f, x, monkeypatch, 1e9, 0.0), double_backward_hessian(f, x))
    # a colouring priced above the dense products decides before detection: a connected
    # pattern costs at least a path's colouring (NOTE [one-shot cost model])
    before = _one_shot(f, x, monkeypatch, 0.0, 1e9, floor=True)
    assert before.values().numel() == 300 * 300
    _close(before, double_backward_hessian(f, x))
