"""The Hessian of a function at a point, as a matrix-free symmetric operator.

The gradient graph is built once (reverse mode with ``create_graph``) by the
shared engine :class:`hesse._hvp.FlatHVP` in its reverse-over-reverse strategy;
every later product is one batched double-backward through that retained graph
(NOTE [batched backward] in ``hesse/_hvp.py``), chunked by :func:`hesse._chunking.map_chunks`. A product
therefore costs about one extra backward pass, never a new forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hesse._hvp import FlatHVP, tensor_rows
from hesse._validation import check_chunk_size, fail
from hesse.operators._base import SYMMETRIC, LinearOperator


class FunctionHessianOperator(LinearOperator):
    """The Hessian of ``f`` at ``args`` with respect to ``args[argnums]`` (symmetric).

    Built by :func:`hessian_operator`. Products take and return flat vectors of
    the differentiated arguments (laid out by ``layout``), or parameter-shaped
    dicts when ``f`` is differentiated with respect to a dict.

    Attributes:
        engine: the :class:`hesse._hvp.FlatHVP` holding the function, the point
            and the retained gradient graph (``engine.g`` is the flat scalar
            function and ``engine.x`` the flat point; ``diagonal(...,
            method="directional")`` differentiates those directly).
    """

    def __init__(self, engine: FlatHVP, *, chunk_size: int) -> None:
        self.engine = engine
        self.layout = engine.flat
        n = engine.n
        self.shape = (n, n)
        self.dtype = engine.x.dtype
        self.device = engine.x.device
        self.tags = frozenset({SYMMETRIC})
        self.chunk_size = chunk_size

    def _name(self) -> str:
        return "hesse.hessian_operator(f)(*args)"

    @property
    def gradient(self) -> torch.Tensor:
        """The flat gradient of ``f`` at the point (a by-product of building the graph)."""
        return self.engine.gradient

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        k = X.shape[1]
        if k == 1:  # a single product skips the batched (vmap) machinery
            return self.engine.product(X[:, 0]).unsqueeze(1)
        return self.engine.apply(k, tensor_rows(X.T), chunk_size=min(k, self.chunk_size)).T


def hessian_operator(
    f: Callable[..., torch.Tensor],
    argnums: int | tuple[int, ...] = 0,
    *,
    chunk_size: int = 256,
) -> Callable[..., FunctionHessianOperator]:
    """The Hessian of a scalar function at a point, as a matrix-free operator.

    ``hessian_operator(f, argnums)(*args)`` returns a symmetric
    :class:`~hesse.operators._base.LinearOperator` ``H`` with
    ``H @ v = (d^2 f / dx^2) v`` at ``x = args[argnums]``. The gradient graph of
    ``f`` is built once, at construction, and retained; each product then runs one
    double-backward pass through it, batched over columns
    in chunks of ``chunk_size``.

    .. math:: H v = \\nabla_x \\langle \\nabla_x f(x), v \\rangle

    Args:
        f: a function returning a real scalar tensor.
        argnums: which positional arguments to differentiate (an int, or a tuple
            of ints; a dict argument gives a dict layout, so ``H @ params_dict``
            works).
        chunk_size: columns per batched double-backward.

    Returns:
        A function of ``*args`` returning the operator.

    Raises:
        TypeError, ValueError, NotImplementedError: for bad ``argnums``, non-tensor
            or non-float arguments, or a non-scalar ``f`` (messages name the fix).

    Cost: construction is one forward and one backward pass with
    ``create_graph=True`` (the graph stays in memory: a few times the activations
    of ``f``); each product is about one extra backward pass (1-2 gradients);
    ``k`` columns cost ``ceil(k / chunk_size)`` batched passes.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> H = hessian_operator(lambda x: 0.5 * x @ A @ x)(torch.ones(2, dtype=torch.float64))
        >>> H @ torch.tensor([1.0, 0.0], dtype=torch.float64)
        tensor([2., 1.], dtype=torch.float64)
    """
    check_chunk_size("hesse.hessian_operator(f)", chunk_size)
    if not callable(f):
        fail(
            "hesse.hessian_operator(f)",
            f"expected f to be callable, got {type(f).__name__}.",
            TypeError,
        )

    def build(*args: Any) -> FunctionHessianOperator:
        call = "hesse.hessian_operator(f)(*args)"
        engine = FlatHVP(f, args, argnums, call=call, mode="reverse-over-reverse")
        engine.gradient  # noqa: B018 - builds (and validates) the gradient graph now
        return FunctionHessianOperator(engine, chunk_size=chunk_size)

    return build
