"""hesse.hessian and hesse.hvp against independent references, plus properties and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten

import hesse
from hesse._hvp import FlatHVP
from hesse.testing import assert_hessian_close, autograd_hessian
from tests.problems import PROBLEM_IDS, PROBLEMS, Problem, rosenbrock, rosenbrock_hessian


def nested_to_flat(H, primals) -> torch.Tensor:
    """Assemble torch.func.hessian's nested blocks into one (n, n) matrix."""
    leaves, _ = tree_flatten(primals)
    sizes = [leaf.numel() for leaf in leaves]
    blocks, _ = tree_flatten(H)
    rows, it = [], iter(blocks)
    for ni in sizes:
        rows.append(torch.cat([next(it).reshape(ni, nj) for nj in sizes], dim=1))
    return torch.cat(rows, dim=0)


def primals_of(problem: Problem, args):
    if isinstance(problem.argnums, int):
        return args[problem.argnums]
    return tuple(args[i] for i in problem.argnums)


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hessian_matches_reference(problem: Problem, dtype: torch.dtype) -> None:
    args = problem.make_args(dtype)
    H = hesse.hessian(problem.f, problem.argnums)(*args)
    flat = nested_to_flat(H, primals_of(problem, args))
    assert flat.dtype == dtype
    ref = problem.reference(args)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(flat.double(), ref, **tol)


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse"])
def test_hessian_matches_torch_func_structure(problem: Problem, mode: str) -> None:
    args = problem.make_args(torch.float64)
    ours = hesse.hessian(problem.f, problem.argnums, mode=mode)(*args)
    theirs = torch.func.hessian(problem.f, problem.argnums)(*args)
    assert_hessian_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_rosenbrock_closed_form_float64_tight() -> None:
    x = torch.linspace(-1.5, 2.0, 50, dtype=torch.float64)
    torch.testing.assert_close(
        hesse.hessian(rosenbrock)(x), rosenbrock_hessian(x), rtol=1e-13, atol=1e-12
    )


def test_quadratic_closed_form_any_shape() -> None:
    A = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 3, dtype=torch.float64)
    H = hesse.hessian(lambda x: x.reshape(-1) @ A @ x.reshape(-1))(x)
    assert H.shape == (2, 3, 2, 3)
    torch.testing.assert_close(H.reshape(6, 6), A + A.T)


def test_argnums_selects_and_negative_index() -> None:
    f = lambda a, b: (a**3).sum() * (b**2).sum()  # noqa: E731
    a, b = torch.rand(3, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    assert_hessian_close(hesse.hessian(f, argnums=-1)(a, b), torch.func.hessian(f, argnums=1)(a, b))
    assert_hessian_close(
        hesse.hessian(f, argnums=(1, 0))(a, b), torch.func.hessian(f, argnums=(1, 0))(a, b)
    )


def test_non_tensor_arguments_outside_argnums_pass_through() -> None:
    f = lambda x, scale, name: scale * (x**4).sum() if name == "quartic" else x.sum()  # noqa: E731
    x = torch.rand(4, dtype=torch.float64)
    torch.testing.assert_close(hesse.hessian(f)(x, 2.0, "quartic"), torch.diag(24 * x**2))


@settings(max_examples=15, deadline=None)
@given(chunk_size=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_independent_of_chunk_size_and_mode(chunk_size: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(13, dtype=torch.float64, generator=g)
    W = torch.randn(13, 5, dtype=torch.float64, generator=g)
    f = lambda x: torch.tanh(x @ W).pow(2).sum() + (x**3).sum()  # noqa: E731
    ref = torch.func.hessian(f)(x)
    for mode in ["auto", "forward-over-reverse", "reverse-over-reverse"]:
        torch.testing.assert_close(hesse.hessian(f, chunk_size=chunk_size, mode=mode)(x), ref)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_hvp_symmetric_and_linear(seed: int, a: float, b: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x, u, v = (torch.randn(8, dtype=torch.float64, generator=g) for _ in range(3))
    f = lambda x: torch.logsumexp(x * x.roll(1), 0) + x.sin().prod()  # noqa: E731
    _, (hu,) = hesse.hvp(f, (x,), (u,))
    _, (hv,) = hesse.hvp(f, (x,), (v,))
    _, (hlin,) = hesse.hvp(f, (x,), (a * u + b * v,))
    torch.testing.assert_close(u @ hv, v @ hu, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hlin, a * hu + b * hv, rtol=1e-10, atol=1e-10)


def test_hvp_matches_dense_and_returns_gradient() -> None:
    x = torch.randn(2, 3, dtype=torch.float64)
    v = torch.randn(2, 3, dtype=torch.float64)
    f = lambda x: (x.exp() * x.roll(1, dims=1)).sum()  # noqa: E731
    (gr,), (hv,) = hesse.hvp(f, (x,), (v,))
    H = torch.func.hessian(f)(x).reshape(6, 6)
    torch.testing.assert_close(hv.reshape(-1), H @ v.reshape(-1))
    torch.testing.assert_close(gr, torch.func.grad(f)(x))


@pytest.mark.parametrize("mode", ["auto", "reverse-over-reverse"])
def test_hvp_batched_over_tuple_and_dict(mode: str) -> None:
    p = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    z = torch.randn(4, dtype=torch.float64)
    f = lambda p, z: torch.tanh(z[:3] @ p["w"] + p["b"]).pow(3).sum() * z.sum()  # noqa: E731
    k = 5
    vs = (
        {
            "w": torch.randn(k, 3, 2, dtype=torch.float64),
            "b": torch.randn(k, 2, dtype=torch.float64),
        },
        torch.randn(k, 4, dtype=torch.float64),
    )
    grads, hvs = hesse.hvp(f, (p, z), vs, batched=True, chunk_size=2, mode=mode)
    H = nested_to_flat(torch.func.hessian(f, argnums=(0, 1))(p, z), (p, z))
    V = torch.cat([vs[0]["w"].reshape(k, -1), vs[0]["b"].reshape(k, -1), vs[1]], dim=1)
    got = torch.cat([hvs[0]["w"].reshape(k, -1), hvs[0]["b"].reshape(k, -1), hvs[1]], dim=1)
    torch.testing.assert_close(got, V @ H)
    ref_grads = torch.func.grad(f, argnums=(0, 1))(p, z)
    assert_hessian_close(grads, ref_grads)


def test_float32_against_autograd_reference() -> None:
    x = torch.randn(20)
    f = lambda x: torch.log1p(x.exp()).pow(2).sum()  # noqa: E731
    torch.testing.assert_close(hesse.hessian(f)(x), autograd_hessian(f, x), rtol=1e-5, atol=1e-6)


# -- fall-back paths give the same answer ------------------------------------------------


def test_inplace_update_of_captured_tensor_falls_back() -> None:
    counter = torch.zeros(3, dtype=torch.float64)

    def f(x):
        counter.add_(x.detach()[:3])  # a side effect vmap cannot batch
        return (x.sin() * x).sum()

    x = torch.randn(5, dtype=torch.float64)
    ref = torch.func.hessian(lambda x: (x.sin() * x).sum())(x)
    torch.testing.assert_close(hesse.hessian(f)(x), ref)


def test_batchnorm_train_mode_falls_back() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh()
    ).double()
    model.train()
    X = torch.randn(6, 3, dtype=torch.float64)
    f = lambda x: model(x).pow(2).sum()  # noqa: E731
    ref = torch.autograd.functional.hessian(f, X)
    torch.testing.assert_close(hesse.hessian(f)(X), ref)


class _CubeNoForwardAD(torch.autograd.Function):
    """x^3 with a backward but no jvp: forward-mode AD is unavailable."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def test_op_without_forward_ad_falls_back_to_reverse_over_reverse() -> None:
    x = torch.randn(6, dtype=torch.float64)
    f = lambda x: _CubeNoForwardAD.apply(x).sum() * x.sum()  # noqa: E731
    with pytest.raises(Exception, match="(?i)forward|jvp"):
        hesse.hessian(f, mode="forward-over-reverse")(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hesse.LoopFallbackWarning)
        H = hesse.hessian(f)(x)
    s = x.sum()
    ref = torch.diag(6 * x * s) + 3 * x[:, None] ** 2 + 3 * x[None, :] ** 2
    torch.testing.assert_close(H, ref)


def test_loop_fallback_warns_once_and_agrees() -> None:
    calls = []

    def f(x):
        calls.append(1)
        if x.sum().item() > -1e9:  # .item() cannot be vmapped in forward mode
            return (x**3).sum()
        return x.sum()

    x = torch.randn(4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        H = hesse.hessian(f)(x)
    torch.testing.assert_close(H, torch.diag(6 * x))
    assert sum(issubclass(w.category, hesse.LoopFallbackWarning) for w in caught) <= 1


def test_memory_budget_bounds_chunks_and_agrees() -> None:
    x = torch.randn(300, dtype=torch.float64)
    f = lambda x: (x.sin() * x.roll(1)).sum()  # noqa: E731
    ref = torch.func.hessian(f)(x)
    torch.testing.assert_close(hesse.hessian(f, memory_budget=300 * 300 * 8 + 200_000)(x), ref)


# -- edge values ------------------------------------------------------------------------


def test_function_independent_of_input_gives_zero() -> None:
    x = torch.randn(3, dtype=torch.float64)
    for mode in ["auto", "reverse-over-reverse"]:
        torch.testing.assert_close(
            hesse.hessian(lambda x: torch.tensor(2.0, dtype=torch.float64), mode=mode)(x),
            torch.zeros(3, 3, dtype=torch.float64),
        )
        torch.testing.assert_close(
            hesse.hessian(lambda x: 3 * x.sum(), mode=mode)(x),
            torch.zeros(3, 3, dtype=torch.float64),
        )


def test_works_under_no_grad_and_inference_mode() -> None:
    f = lambda x: (x.sin() * x).sum()  # noqa: E731
    x = torch.randn(5, dtype=torch.float64)
    ref = torch.func.hessian(f)(x)
    with torch.no_grad():
        torch.testing.assert_close(hesse.hessian(f)(x), ref)
        engine = FlatHVP(f, (x,), 0, call="t")
        engine.apply(5, None)
        assert engine.mode == "reverse-over-reverse"  # the graph was built, not abandoned
    with torch.inference_mode():
        xi = x.clone()
    torch.testing.assert_close(hesse.hessian(f)(xi), ref)


def test_nan_and_inf_propagate() -> None:
    x = torch.tensor([1.0, math.nan, 2.0], dtype=torch.float64)
    H = hesse.hessian(lambda x: (x**3).sum())(x)
    assert torch.isnan(H[1, 1]) and H[0, 0] == 6.0
    y = torch.tensor([math.inf, 1.0], dtype=torch.float64)
    H = hesse.hessian(lambda x: (x**3).sum())(y)
    assert torch.isinf(H[0, 0]) and H[1, 1] == 6.0


# -- errors ----------------------------------------------------------------------------


def test_error_non_scalar_output() -> None:
    with pytest.raises(
        ValueError,
        match=r"hesse\.hessian\(f\)\(x\): expected f to return a scalar tensor, got shape \(3,\)\. Reduce it",
    ):
        hesse.hessian(lambda x: x**2)(torch.ones(3))


def test_error_non_tensor_output() -> None:
    with pytest.raises(
        TypeError,
        match=r"hesse\.hessian\(f\)\(x\): expected f to return a scalar tensor, got an object of type float",
    ):
        hesse.hessian(lambda x: 1.0)(torch.ones(3))


@pytest.mark.parametrize("bad", [torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool)])
def test_error_integer_or_bool_input(bad: torch.Tensor) -> None:
    with pytest.raises(
        TypeError,
        match=r"hesse\.hessian\(f\)\(x\): expected a floating-point tensor, got a torch\.(int64|bool) tensor.*\.double\(\)",
    ):
        hesse.hessian(lambda x: x.sum())(bad)


def test_error_complex_input() -> None:
    with pytest.raises(
        NotImplementedError,
        match=r"hesse\.hessian\(f\)\(x\): expected a real floating-point tensor.*view_as_real",
    ):
        hesse.hessian(lambda x: x.abs().sum())(torch.ones(3, dtype=torch.complex64))


def test_error_non_tensor_at_argnums() -> None:
    with pytest.raises(
        TypeError,
        match=r"hesse\.hessian\(f\)\(x, y\): expected the differentiated argument to be a tensor.*got an object of type float",
    ):
        hesse.hessian(lambda x, y: x.sum() * y, argnums=1)(torch.ones(2), 3.0)


@pytest.mark.parametrize("argnums", [2, -3, (0, 5)])
def test_error_argnums_out_of_range(argnums) -> None:
    with pytest.raises(
        ValueError,
        match=r"hesse\.hessian\(f\)\(x, y\): argnums=.* is out of range: f was called with 2 positional argument\(s\)",
    ):
        hesse.hessian(lambda x, y: (x * y).sum(), argnums=argnums)(torch.ones(2), torch.ones(2))


@pytest.mark.parametrize("argnums", ["0", 1.5, (), True])
def test_error_argnums_wrong_type(argnums) -> None:
    with pytest.raises(TypeError, match=r"hesse\.hessian\(f\)\(x\): expected argnums"):
        hesse.hessian(lambda x: x.sum(), argnums=argnums)(torch.ones(2))


def test_error_repeated_argnums() -> None:
    with pytest.raises(ValueError, match="repeats an argument"):
        hesse.hessian(lambda x, y: (x * y).sum(), argnums=(0, -2))(torch.ones(2), torch.ones(2))


def test_error_mixed_dtypes() -> None:
    with pytest.raises(TypeError, match="share one dtype"):
        hesse.hessian(lambda x, y: (x * y).sum(), argnums=(0, 1))(
            torch.ones(2), torch.ones(2, dtype=torch.float64)
        )


def test_error_bad_options() -> None:
    x = torch.ones(3)
    with pytest.raises(
        ValueError, match=r"hesse\.hessian\(f\)\(x\): chunk_size should be a positive int"
    ):
        hesse.hessian(lambda x: x.sum(), chunk_size=0)(x)
    with pytest.raises(
        ValueError,
        match=r"mode should be one of 'auto', 'forward-over-reverse', 'reverse-over-reverse', got 'fast'",
    ):
        hesse.hessian(lambda x: x.sum(), mode="fast")(x)
    with pytest.raises(ValueError, match="memory_budget should be positive"):
        hesse.hessian(lambda x: x.sum(), memory_budget=-1)(x)


def test_error_fails_fast_when_dense_hessian_cannot_fit() -> None:
    x = torch.ones(10_000)  # 400 MB of float32 Hessian, budget 1 MiB
    with pytest.raises(
        MemoryError,
        match=r"hesse\.hessian\(f\)\(x\): the dense Hessian has 10000 x 10000 entries \(381\.5 MiB in torch\.float32\), more than the memory budget of 1\.0 MiB\. Use a structured alternative: hesse\.sparse_hessian",
    ):
        hesse.hessian(lambda x: x.sin().sum(), memory_budget=2**20)(x)


def test_hvp_errors() -> None:
    f = lambda x: (x**2).sum()  # noqa: E731
    x = torch.ones(3)
    with pytest.raises(
        TypeError, match=r"hesse\.hvp\(f, primals, tangents\): expected primals to be a tuple"
    ):
        hesse.hvp(f, x, (x,))
    with pytest.raises(TypeError, match="expected tangents to be a tuple"):
        hesse.hvp(f, (x,), x)
    with pytest.raises(
        ValueError, match=r"expected a tangent of shape \(3,\), got \(2, 3\)\. Pass batched=True"
    ):
        hesse.hvp(f, (x,), (torch.ones(2, 3),))
    with pytest.raises(
        ValueError,
        match=r"with batched=True expected a tangent of shape \(k, \*\(3,\)\), got \(3,\)",
    ):
        hesse.hvp(f, (x,), (torch.ones(3),), batched=True)
    with pytest.raises(
        TypeError, match="expected tangents of dtype torch.float32, got torch.float64"
    ):
        hesse.hvp(f, (x,), (torch.ones(3, dtype=torch.float64),))
    with pytest.raises(ValueError, match="structure of primals"):
        hesse.hvp(f, (x,), (x, x))
