"""Reference Hessians and assertion helpers, for hesse's tests and for users' own.

The references here are deliberately independent of hesse's engine: central finite
differences of the gradient (in float64) and ``torch.autograd.functional.hessian``
(PyTorch's own reverse-over-reverse implementation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from hesse._flat import Flat, FlatArgs

__all__ = [
    "assert_hessian_close",
    "assert_symmetric",
    "autograd_hessian",
    "finite_difference_hessian",
    "torchvision_cpu_shim",
]


def _flat_problem(
    call: str, f: Callable[..., torch.Tensor], args: tuple[Any, ...], argnums: int | tuple[int, ...]
) -> tuple[Flat, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    inputs = FlatArgs.of(call, args, argnums)
    return inputs.flat, inputs.x(), lambda x: inputs.call(f, x).reshape(())


def finite_difference_hessian(
    f: Callable[..., torch.Tensor],
    *args: Any,
    argnums: int | tuple[int, ...] = 0,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The flat ``(n, n)`` Hessian by central differences of the autograd gradient, in float64.

    ``H[:, i] = (grad f(x + eps e_i) - grad f(x - eps e_i)) / (2 eps)``, symmetrised.
    Error O(eps^2) plus rounding O(machine eps / eps). Cost: 2n gradients.
    """
    flat, x, g = _flat_problem(
        "hesse.testing.finite_difference_hessian(f, *args)", f, args, argnums
    )
    x = x.double()

    def gradient(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().to(flat.dtype).requires_grad_(True)
        with torch.enable_grad():
            (gr,) = torch.autograd.grad(g(z), z, allow_unused=True)
        return torch.zeros_like(z, dtype=torch.float64) if gr is None else gr.double()

    n = x.numel()
    H = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        e = torch.zeros_like(x)
        e[i] = eps
        H[:, i] = (gradient(x + e) - gradient(x - e)) / (2 * eps)
    return (H + H.T) / 2


def autograd_hessian(
    f: Callable[..., torch.Tensor], *args: Any, argnums: int | tuple[int, ...] = 0
) -> torch.Tensor:
    """The flat ``(n, n)`` Hessian from ``torch.autograd.functional.hessian``."""
    _, x, g = _flat_problem("hesse.testing.autograd_hessian(f, *args)", f, args, argnums)
    return torch.autograd.functional.hessian(g, x)


def assert_symmetric(H: torch.Tensor, *, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Assert a square matrix equals its transpose within tolerance."""
    assert H.dim() == 2 and H.shape[0] == H.shape[1], (
        f"expected a square matrix, got {tuple(H.shape)}"
    )
    torch.testing.assert_close(H, H.T, rtol=rtol, atol=atol)


def assert_hessian_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Assert two Hessians agree leaf by leaf (same structure, shapes and values).

    Accepts flat matrices or the nested structure of ``torch.func.hessian``; the
    tolerances default to ``torch.testing.assert_close``'s for the dtype.
    """
    a_leaves, a_spec = tree_flatten(actual)
    e_leaves, e_spec = tree_flatten(expected)
    assert a_spec == e_spec, f"Hessian structures differ: {a_spec} vs {e_spec}"
    for a, e in zip(a_leaves, e_leaves):
        assert a.shape == e.shape, (
            f"Hessian block shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}"
        )
        torch.testing.assert_close(a, e.to(a.dtype), rtol=rtol, atol=atol)


_TORCHVISION_LIBRARY: Any = None


def torchvision_cpu_shim() -> None:
    """Let torchvision's pure-Python parts import next to a torch it was not built for.

    A torchvision wheel built for another torch (e.g. the CUDA build from PyPI
    next to a CPU torch) fails to load its compiled ops, and its import then
    fails registering fake kernels for ``torchvision::nms`` / ``qnms`` (``operator
    torchvision::nms does not exist``). Libraries that import torchvision
    indirectly (laplace-torch through torchmetrics) fail with it. Calling this
    before that import defines the two missing op schemas (no kernels: calling
    them still fails), so the models and transforms work. Does nothing when the
    ops exist. For test and benchmark set-up; never change the torch pin instead.
    """
    global _TORCHVISION_LIBRARY
    try:
        torch.ops.torchvision.nms.default  # noqa: B018 - the probe
        return
    except (AttributeError, RuntimeError):
        pass
    if _TORCHVISION_LIBRARY is None:
        _TORCHVISION_LIBRARY = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
        for op in ("nms", "qnms"):
            _TORCHVISION_LIBRARY.define(
                f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
            )
