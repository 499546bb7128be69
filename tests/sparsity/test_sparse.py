"""Sparse Hessians, Jacobians and diagonals against dense torch.func references (float64)."""

import warnings

import numpy as np
import pytest
import torch
from torch.func import hessian, jacrev

import hesse
from hesse.sparsity._coloring import diagonal_coloring, star_coloring
from hesse.sparsity._sparse import (
    DIAGONAL_COLORINGS,
    DIAGONAL_METHODS,
    SparsityFallbackWarning,
    _from_torch,
)

from ..problems import PROBLEMS
from . import problems as SP


def _flat_dense_hessian(f, args, argnums):
    """torch.func.hessian of f with respect to args[argnums], flattened to (n, n)."""
    from hesse._flat import Flat

    single = isinstance(argnums, int)
    nums = (argnums,) if single else argnums
    primals = args[nums[0]] if single else tuple(args[i] for i in nums)
    flat = Flat.of(primals)

    def g(v):
        tree = flat.unflatten(v)
        a = list(args)
        if single:
            a[nums[0]] = tree
        else:
            for i, leaf in zip(nums, tree):
                a[i] = leaf
        return f(*a)

    return hessian(g)(flat.flatten(primals)), flat


def _close(a, b, rtol=1e-12):
    scale = max(b.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= rtol * scale


@pytest.mark.parametrize("problem", PROBLEMS, ids=[p.name for p in PROBLEMS])
def test_registry_sparse_equals_dense(problem):
    args = problem.make_args(torch.float64)
    H, flat = _flat_dense_hessian(problem.f, args, problem.argnums)
    Hs = hesse.sparse_hessian(problem.f, problem.argnums)(*args)
    assert Hs.layout == torch.sparse_csr and Hs.dtype == torch.float64
    _close(Hs.to_dense(), H)
    ref = problem.reference(args)
    assert torch.allclose(Hs.to_dense(), ref, rtol=1e-5, atol=1e-6)
    diag = hesse.hessian_diagonal(problem.f, problem.argnums)(*args)
    _close(flat.flatten(diag), H.diagonal())


KNOWN = [
    # name, f, shape, star colours, diagonal colours
    ("sum_sin", SP.sum_sin, (40,), 1, 1),
    ("rosenbrock", SP.rosenbrock, (50,), 3, 2),
    ("broyden_tridiagonal", SP.broyden_tridiagonal, (40,), 5, 3),
    ("bratu_5_point", SP.bratu_energy, (64,), 5, 2),
    ("arrowhead", SP.arrowhead, (30,), 2, 2),
    ("per_sample_mlp", SP.per_sample_mlp, (5, SP.D_IN), SP.D_IN, SP.D_IN),
]


@pytest.mark.parametrize("name,f,shape,star,diag", KNOWN, ids=[k[0] for k in KNOWN])
def test_known_problems(name, f, shape, star, diag, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    H = hessian(f)(x).reshape(x.numel(), x.numel())
    pattern = hesse.hessian_sparsity(f)(x)
    P = _from_torch("test", pattern, tuple(H.shape))
    assert star_coloring(P).num_colors == star
    assert diagonal_coloring(P).num_colors == diag
    _close(hesse.sparse_hessian(f)(x).to_dense(), H)
    _close(hesse.sparse_hessian(f, pattern=pattern, chunk_size=1)(x).to_dense(), H)
    d = hesse.hessian_diagonal(f)(x)
    assert d.shape == x.shape
    _close(d.reshape(-1), H.diagonal())
    _close(
        hesse.hessian_diagonal(f, method="coloring", pattern=pattern)(x).reshape(-1), H.diagonal()
    )
    _close(hesse.hessian_diagonal(f, method="dense", chunk_size=7)(x).reshape(-1), H.diagonal())


def test_per_sample_blocks_are_the_per_sample_hessians(gen):
    X = torch.randn(5, SP.D_IN, generator=gen, dtype=torch.float64)
    Hs = hesse.sparse_hessian(SP.per_sample_mlp)(X).to_dense().reshape(5, SP.D_IN, 5, SP.D_IN)

    def sample_loss(x, label):
        logits = torch.tanh(x @ SP.W1 + SP.B1) @ SP.W2
        return torch.nn.functional.cross_entropy(logits[None], label[None], reduction="sum")

    for b in range(5):
        ref = hessian(sample_loss)(X[b], SP.LABELS[b])
        _close(Hs[b, :, b, :], ref)
        for c in range(5):
            if c != b:
                assert Hs[b, :, c, :].abs().max() == 0


def test_reused_pattern_across_points(gen):
    x = torch.randn(20, generator=gen, dtype=torch.float64)
    pattern = hesse.hessian_sparsity(SP.rosenbrock)(x)
    step = hesse.sparse_hessian(SP.rosenbrock, pattern=pattern)
    for _ in range(3):
        x = torch.randn(20, generator=gen, dtype=torch.float64)
        _close(step(x).to_dense(), hessian(SP.rosenbrock)(x))


def test_tuple_argnums_and_dense_pattern(gen):
    def f(x, y):
        return (x * y[:3]).sum() ** 2 + y.sin().sum()

    x = torch.randn(3, generator=gen, dtype=torch.float64)
    y = torch.randn(4, generator=gen, dtype=torch.float64)
    H, _ = _flat_dense_hessian(f, (x, y), (0, 1))
    _close(hesse.sparse_hessian(f, argnums=(0, 1))(x, y).to_dense(), H)
    dense_pattern = torch.ones(7, 7, dtype=torch.bool)
    _close(hesse.sparse_hessian(f, argnums=(0, 1), pattern=dense_pattern)(x, y).to_dense(), H)
    dx, dy = hesse.hessian_diagonal(f, argnums=(0, 1))(x, y)
    _close(torch.cat([dx, dy]), H.diagonal())


def test_float32(gen):
    x = torch.randn(30, generator=gen, dtype=torch.float32)
    Hs = hesse.sparse_hessian(SP.rosenbrock)(x)
    assert Hs.dtype == torch.float32
    H = hessian(SP.rosenbrock)(x)
    assert torch.allclose(Hs.to_dense(), H, rtol=1e-5, atol=1e-3)


def test_linear_function_has_an_empty_hessian(gen):
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    Hs = hesse.sparse_hessian(lambda x: x.sum() * 3)(x)
    assert Hs.to_dense().abs().sum() == 0
    assert torch.equal(
        hesse.hessian_diagonal(lambda x: x.sum() * 3)(x), torch.zeros(4, dtype=torch.float64)
    )


# -- Jacobians ---------------------------------------------------------------------------

JACOBIANS = [
    ("stencil", lambda x: x[2:] - 2 * x[1:-1] ** 3 + x[:-2], (9,)),
    ("two_outputs", lambda x: torch.stack([x.sum(), (x**2).sum()]), (6,)),  # rows: VJPs
    ("matrix", lambda x: torch.tanh(x.reshape(3, 2)) @ torch.ones(2, 4, dtype=x.dtype), (6,)),
]


@pytest.mark.parametrize("name,f,shape", JACOBIANS, ids=[j[0] for j in JACOBIANS])
def test_sparse_jacobian_equals_jacrev(name, f, shape, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    J = jacrev(lambda v: f(v).reshape(-1))(x)
    Js = hesse.sparse_jacobian(f)(x)
    assert Js.layout == torch.sparse_csr
    _close(Js.to_dense(), J)
    pattern = hesse.jacobian_sparsity(f)(x)
    _close(hesse.sparse_jacobian(f, pattern=pattern, chunk_size=1)(x).to_dense(), J)


# -- diagonal methods ----------------------------------------------------------------------


def test_diagonal_registry_names():
    assert {"auto", "coloring", "dense"} <= set(DIAGONAL_METHODS)


def test_auto_falls_back_to_dense_for_value_dependent_functions(gen):
    def f(x):
        return (x**3).sum() if x.sum() > 0 else (x**4).sum()

    x = torch.randn(5, generator=gen, dtype=torch.float64)
    with pytest.warns(SparsityFallbackWarning, match="dense HVPs"):
        d = hesse.hessian_diagonal(f)(x)
    _close(d, hessian(f)(x).diagonal())


def test_auto_uses_dense_when_colouring_saves_nothing(gen):
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    f = lambda x: x.sum() ** 4  # noqa: E731 - dense Hessian: n colours
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _close(hesse.hessian_diagonal(f)(x), hessian(f)(x).diagonal())


# -- errors ----------------------------------------------------------------------------------


def test_value_dependent_control_flow_errors_offer_pattern(gen):
    def f(x):
        return x.sum() if x.sum() > 0 else (x**2).sum()

    x = torch.randn(3, generator=gen, dtype=torch.float64)
    with pytest.raises(
        NotImplementedError,
        match=r"hesse.sparse_hessian\(f\)\(x\): f has value-dependent control flow.*pattern=",
    ):
        hesse.sparse_hessian(f)(x)
    with pytest.raises(
        NotImplementedError, match=r"hesse.hessian_diagonal\(f\)\(x\): f has value-dependent"
    ):
        hesse.hessian_diagonal(f, method="coloring")(x)
    with pytest.raises(
        NotImplementedError, match=r"hesse.sparse_jacobian\(f\)\(x\): f has value-dependent"
    ):
        hesse.sparse_jacobian(lambda x: x if x.sum() > 0 else -x)(x)
    # the workaround: pass the pattern
    pattern = torch.eye(3, dtype=torch.bool)
    _close(hesse.sparse_hessian(f, pattern=pattern)(x).to_dense(), hessian(f)(x))


def test_pattern_validation(gen):
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    f = SP.rosenbrock
    with pytest.raises(
        ValueError,
        match=r"hesse.sparse_hessian\(f\)\(x\): expected pattern of shape \(4, 4\).*got \(3, 3\)",
    ):
        hesse.sparse_hessian(f, pattern=torch.eye(3, dtype=torch.bool))(x)
    with pytest.raises(
        TypeError,
        match=r"hesse.sparse_hessian\(f\)\(x\): expected pattern to be a tensor.*got an object of type ndarray",
    ):
        hesse.sparse_hessian(f, pattern=np.eye(4))(x)
    with pytest.raises(
        ValueError, match=r"hesse.hessian_diagonal\(f\)\(x\): expected pattern of shape \(4, 4\)"
    ):
        hesse.hessian_diagonal(f, pattern=torch.eye(5))(x)
    with pytest.raises(
        ValueError, match=r"hesse.sparse_jacobian\(f\)\(x\): expected pattern of shape \(3, 4\)"
    ):
        hesse.sparse_jacobian(lambda x: x[1:] * x[:-1], pattern=torch.ones(4, 4))(x)


def test_argument_errors(gen):
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"hesse.hessian_diagonal\(f\)\(x\): method should be one of 'auto', 'coloring', 'dense'.*got 'exact'",
    ):
        hesse.hessian_diagonal(SP.rosenbrock, method="exact")(x)
    with pytest.raises(
        ValueError, match=r"hesse.sparse_hessian\(f\)\(x\): chunk_size should be a positive int"
    ):
        hesse.sparse_hessian(SP.rosenbrock, chunk_size=0)(x)
    with pytest.raises(
        ValueError,
        match=r"hesse.sparse_hessian\(f\)\(x\): expected f to return a scalar tensor, got shape \(3,\)",
    ):
        hesse.sparse_hessian(lambda x: x[1:] * x[:-1])(x)
    with pytest.raises(
        TypeError, match=r"hesse.sparse_jacobian\(f\)\(x\): expected f to return a tensor"
    ):
        hesse.sparse_jacobian(lambda x: [x])(x)
    with pytest.raises(
        TypeError,
        match=r"hesse.sparse_jacobian\(f\)\(x\): expected f to return a floating-point tensor",
    ):
        hesse.sparse_jacobian(lambda x: x > 0)(x)
    with pytest.raises(
        TypeError, match=r"hesse.hessian_sparsity\(f\)\(x\): expected a floating-point tensor"
    ):
        hesse.hessian_sparsity(SP.rosenbrock)(torch.arange(4))
    with pytest.raises(
        ValueError, match=r"hesse.jacobian_sparsity\(f\)\(x\): argnums=2 is out of range"
    ):
        hesse.jacobian_sparsity(SP.rosenbrock, argnums=2)(x)


def test_too_dense_patterns_are_a_memory_error(gen, monkeypatch):
    import hesse.sparsity._maps as maps

    monkeypatch.setattr(maps, "MAX_ENTRIES", 50)
    x = torch.randn(10, generator=gen, dtype=torch.float64)
    f = lambda x: x.sum() ** 4  # noqa: E731 - a dense Hessian: 100 entries
    with pytest.raises(
        MemoryError,
        match=r"hesse.sparse_hessian\(f\)\(x\): the Hessian pattern would hold.*dense path",
    ):
        hesse.sparse_hessian(f)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dense function is auto's dense case, not a fallback
        d = hesse.hessian_diagonal(f)(x)
    _close(d, hessian(f)(x).diagonal())


def test_auto_diagonal_stops_detection_early_on_dense_functions(gen, monkeypatch):
    import hesse.sparsity._sparse as sparse_mod

    seen = []
    original = sparse_mod._Detected.hessian

    def spy(self, max_products=None):
        seen.append(max_products)
        return original(self, max_products)

    monkeypatch.setattr(sparse_mod._Detected, "hessian", spy)
    W = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    f = lambda x: torch.tanh(x @ W).sum()  # noqa: E731 - 6 hidden units, each couples all 12 inputs
    x = torch.randn(12, generator=gen, dtype=torch.float64)
    monkeypatch.setattr(sparse_mod, "AUTO_DENSITY", 1)  # 6 * 12^2 products > 1 * 12^2
    _close(hesse.hessian_diagonal(f)(x), hessian(f)(x).diagonal())
    assert seen == [12 * 12]
    with pytest.raises(MemoryError, match="limit 144"):
        sparse_mod._detect(lambda x: f(x), x, "t").hessian(144)


def test_a_sparse_result_is_a_valid_pattern(gen):
    # a stored entry that happens to be 0 at one point must stay in the pattern
    f = lambda x: (x[0] * x[1]) ** 2 + x.sin().sum()  # noqa: E731 - H_01 = 4 x0 x1
    x = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    Hs = hesse.sparse_hessian(f)(x)
    assert Hs.to_dense()[0, 1] == 0
    y = torch.randn(3, generator=gen, dtype=torch.float64)
    _close(hesse.sparse_hessian(f, pattern=Hs)(y).to_dense(), hessian(f)(y))


def test_diagonal_coloring_option(gen):
    x = torch.randn(9, generator=gen, dtype=torch.float64)
    H = hessian(SP.rosenbrock)(x)
    for method in ("auto", "coloring"):
        for coloring in DIAGONAL_COLORINGS:
            d = hesse.hessian_diagonal(SP.rosenbrock, method=method, coloring=coloring)(x)
            _close(d, H.diagonal())
    _close(hesse.hessian_diagonal(SP.rosenbrock, method="dense")(x), H.diagonal())


def test_diagonal_coloring_errors(gen):
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    for kind in ("star", "acyclic"):
        with pytest.raises(
            ValueError,
            match=rf"hesse.hessian_diagonal\(f\)\(x\): coloring='{kind}' is a colouring for "
            r"the full Hessian \(hesse.sparse_hessian\).*use coloring='auto' or 'distance1'",
        ):
            hesse.hessian_diagonal(SP.rosenbrock, coloring=kind)(x)
    with pytest.raises(
        ValueError,
        match=r"hesse.hessian_diagonal\(f\)\(x\): coloring should be one of 'auto', "
        r"'distance1', got 'greedy'",
    ):
        hesse.hessian_diagonal(SP.rosenbrock, coloring="greedy")(x)
    with pytest.raises(
        ValueError,
        match=r"hesse.hessian_diagonal\(f\)\(x\): coloring='distance1' needs a colouring "
        r"method, got method='dense'.*method='coloring'",
    ):
        hesse.hessian_diagonal(SP.rosenbrock, method="dense", coloring="distance1")(x)


def test_fully_coupled_pattern_takes_the_dense_path(gen, monkeypatch):
    # NOTE [dense fallback]: no colouring runs, the result is the same CSR tensor
    import hesse.sparsity._sparse as sparse_module

    def no_colouring(kind, P):
        raise AssertionError(f"{kind} colouring ran for a complete graph")

    monkeypatch.setattr(sparse_module, "_coloured", no_colouring)
    f = lambda x: x.sum() ** 4 + (x**3).sum()  # noqa: E731 - every pair coupled
    x = torch.randn(7, generator=gen, dtype=torch.float64)
    H = hesse.sparse_hessian(f)(x)
    assert H.layout == torch.sparse_csr and H._nnz() == 49
    _close(H.to_dense(), hessian(f)(x))
    # stored entries are the detected pattern's, zeros at this point included
    g = lambda x: x.sum() ** 2 - (x**2).sum()  # noqa: E731 - zero diagonal, all pairs
    H = hesse.sparse_hessian(g)(x)
    assert H._nnz() == hesse.hessian_sparsity(g)(x)._nnz()
    _close(H.to_dense(), hessian(g)(x))


@pytest.mark.parametrize(
    "name, f, neutral",
    [
        ("hub", lambda x: x[0] * x[1:].sum(), True),
        ("arrow", lambda x: torch.sin(x[0]) * x[1:].sum() + (x[1:] * x[:-1]).sum(), True),
        ("path", lambda x: (x[1:] * x[:-1]).sum(), False),
        ("rosenbrock", SP.rosenbrock, False),
    ],
)
def test_neutral_colours_drop_unread_classes_exactly(gen, name, f, neutral):
    # NOTE [neutral colours]: fewer products where a class is never read, same values
    from hesse.sparsity._sparse import _plan, symmetric

    x = torch.randn(20, generator=gen, dtype=torch.float64)
    P = symmetric(_from_torch("c", hesse.hessian_sparsity(f)(x), (20, 20)))
    greedy = star_coloring(P)
    plan = _plan("star", P)
    assert (plan.coloring.num_colors < greedy.num_colors) == neutral
    assert plan.coloring.seeds().shape == (plan.coloring.num_colors, 20)
    if name == "hub":  # H e_0 holds every nonzero: one product
        assert plan.coloring.num_colors == 1
    ref = hessian(f)(x)
    for coloring in ("star", "auto"):
        H = hesse.sparse_hessian(f, coloring=coloring)(x).to_dense()
        assert (H - ref).abs().max() <= 1e-10 * max(1.0, float(ref.abs().max()))
