"""The linear-operator core: a few primitives, structure as tags, composition.

# NOTE [operators]
An operator is an ``(m, n)`` matrix known only through products. Public methods
validate and normalise (``__matmul__`` accepts ``(n,)``, ``(n, k)`` and
parameter-shaped dicts); the private ``_matmat`` computes on an ``(n, k)`` tensor of
the operator's dtype and device and returns ``(m, k)``. Structure is recorded in
``tags`` (``"symmetric"``, ``"psd"``); algorithms query tags, never class names.
Concrete operators are final: compose them (``+``, scalar ``*``, ``.T``) rather
than subclass them.
"""

from __future__ import annotations

import abc
import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from hesse._chunking import map_chunks
from hesse._flat import Flat
from hesse._validation import describe, fail

SYMMETRIC = "symmetric"
PSD = "psd"

F = TypeVar("F", bound=Callable[..., Any])


def keeping_graphs(fn: F) -> F:
    """``fn(A, ...)`` run inside ``A._keep_graphs()`` when ``A`` is an operator.

    # NOTE [graph sessions]
    An algorithm that multiplies by one operator many times within one call
    (``to_dense``, ``eigsh``, ``trace``, ``spectral_density``, ``solve``,
    stochastic diagonals) runs as one *session*: a model operator may keep each
    batch's gradient graph from the session's first product to its end and answer
    the later products with one double backward each (see NOTE [graph cache] in
    ``_model.py``). No user code runs between the products of one call, so the
    kept graphs cannot go stale; they are released when the call returns.
    """

    @functools.wraps(fn)
    def wrapper(A: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(A, LinearOperator):
            return fn(A, *args, **kwargs)
        with A._keep_graphs():
            return fn(A, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class LinearOperator(abc.ABC):
    """An ``(m, n)`` linear map known through matrix products.

    Attributes:
        shape: ``(m, n)``.
        dtype, device: of the vectors it takes and returns.
        tags: structure, a frozenset of ``"symmetric"`` and ``"psd"``.
        layout: the parameter structure (a :class:`hesse._flat.Flat`) that
            parameter-shaped dicts are flattened with, or ``None``.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    tags: frozenset[str] = frozenset()
    layout: Flat | None = None
    #: columns per vectorised pass in :meth:`to_dense` and products with many columns.
    chunk_size: int = 256

    @abc.abstractmethod
    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` for an ``(n, k)`` tensor; returns ``(m, k)``."""

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        """``A.T @ X`` for an ``(m, k)`` tensor; returns ``(n, k)``."""
        if SYMMETRIC in self.tags:
            return self._matmat(X)
        fail(
            f"{self._name()}.T",
            "this operator has no transpose product. Use a symmetric operator or one "
            "that defines _rmatmat.",
            NotImplementedError,
        )

    def _name(self) -> str:
        return type(self).__name__

    def _operands(self) -> tuple[LinearOperator, ...]:
        """The operators this one is composed of (none for a leaf operator)."""
        return ()

    @contextlib.contextmanager
    def _keep_graphs(self) -> Iterator[None]:
        """A scope in which products may keep per-batch graphs (NOTE [graph sessions]).

        A leaf operator without graphs has nothing to keep; a composition passes the
        scope on to its operands.
        """
        with contextlib.ExitStack() as stack:
            for op in self._operands():
                stack.enter_context(op._keep_graphs())
            yield

    @property
    def is_symmetric(self) -> bool:
        return SYMMETRIC in self.tags

    # -- products ------------------------------------------------------------------
    def __matmul__(self, x: Any) -> Any:
        call = f"{self._name()} @ x"
        if isinstance(x, dict):
            return self._matmul_tree(call, x)
        if not isinstance(x, torch.Tensor):
            fail(
                call,
                f"expected a tensor of shape ({self.shape[1]},) or ({self.shape[1]}, k), or a "
                f"parameter-shaped dict, got {describe(x)}.",
                TypeError,
            )
        if x.dim() not in (1, 2) or x.shape[0] != self.shape[1]:
            fail(
                call,
                f"expected a tensor of shape ({self.shape[1]},) or ({self.shape[1]}, k), got "
                f"shape {tuple(x.shape)}. Flatten parameter vectors (or pass a dict keyed like "
                "the parameters).",
            )
        self._check_tensor(call, x)
        if x.dim() == 1:
            return self._matmat(x.unsqueeze(1)).squeeze(1)
        return self._matmat(x)

    def _check_tensor(self, call: str, x: torch.Tensor) -> None:
        if x.dtype != self.dtype:
            fail(
                call,
                f"expected dtype {self.dtype}, got {x.dtype}. Cast with .to({self.dtype}).",
                TypeError,
            )
        if x.device != self.device:
            fail(
                call,
                f"expected a tensor on {self.device}, got one on {x.device}. Move it with .to().",
            )

    def _matmul_tree(self, call: str, tree: dict) -> dict:
        layout = self.layout
        if layout is None:
            fail(call, "this operator has no parameter structure; pass a flat tensor.", TypeError)
        keys = list(layout.spec.context) if layout.spec.context is not None else None
        if keys is not None and sorted(map(str, tree.keys())) != sorted(map(str, keys)):
            fail(
                call,
                f"expected a dict with keys {keys}, got {list(tree.keys())}. Pass one tensor per "
                "selected parameter.",
            )
        ordered = {k: tree[k] for k in keys} if keys is not None else tree
        for (name, t), shape in zip(ordered.items(), layout.shapes):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
                fail(call, f"expected {name!r} of shape {tuple(shape)}, got {describe(t)}.")
            self._check_tensor(call, t)
        vec = layout.flatten(ordered)
        return layout.unflatten(self._matmat(vec.unsqueeze(1)).squeeze(1))

    # -- composition ---------------------------------------------------------------
    @property
    def T(self) -> LinearOperator:  # noqa: N802 - the usual name
        return self if self.is_symmetric else _Transposed(self)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        if other.shape != self.shape:
            fail(
                f"{self._name()} + {other._name()}",
                f"shapes differ: {self.shape} and {other.shape}.",
            )
        return _Sum(self, other)

    def __mul__(self, alpha: float) -> LinearOperator:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            return NotImplemented
        return _Scaled(self, float(alpha))

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return _Scaled(self, -1.0)

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        return self + (-other)

    # -- conversions ---------------------------------------------------------------
    @keeping_graphs
    def to_dense(self) -> torch.Tensor:
        """The ``(m, n)`` matrix, built from ``n`` products in chunks of ``chunk_size``."""
        m, n = self.shape

        def rows(start: int, stop: int) -> torch.Tensor:
            eye = torch.zeros(stop - start, n, dtype=self.dtype, device=self.device)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
            return eye

        cols = map_chunks(
            lambda R: self._matmat(R.T).T,
            None,
            n,
            rows,
            chunk_size=self.chunk_size,
            call=f"{self._name()}.to_dense()",
        )
        return cols.T.contiguous()

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` with the same products (NumPy in/out)."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        def as_torch(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)

        def matmat(X: np.ndarray) -> np.ndarray:
            X = as_torch(X)
            return self._matmat(X.reshape(X.shape[0], -1)).detach().cpu().numpy()

        def rmatmat(X: np.ndarray) -> np.ndarray:
            X = as_torch(X)
            return self._rmatmat(X.reshape(X.shape[0], -1)).detach().cpu().numpy()

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return ScipyOperator(
            shape=self.shape,
            matvec=lambda x: matmat(x.reshape(-1, 1)).ravel(),
            rmatvec=lambda x: rmatmat(x.reshape(-1, 1)).ravel(),
            matmat=matmat,
            rmatmat=rmatmat,
            dtype=np_dtype,
        )

    def __repr__(self) -> str:
        tags = ", ".join(sorted(self.tags)) or "no tags"
        return f"{self._name()}(shape={self.shape}, dtype={self.dtype}, {tags})"


class DenseOperator(LinearOperator):
    """A dense matrix as an operator."""

    def __init__(self, matrix: torch.Tensor, *, tags: frozenset[str] = frozenset()) -> None:
        self.matrix = matrix
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.tags = frozenset(tags)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.matrix @ X

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.matrix.T @ X

    def to_dense(self) -> torch.Tensor:
        return self.matrix


class _Transposed(LinearOperator):
    def __init__(self, op: LinearOperator) -> None:
        self.op = op
        self.shape = (op.shape[1], op.shape[0])
        self.dtype, self.device, self.tags = op.dtype, op.device, op.tags

    def _operands(self) -> tuple[LinearOperator, ...]:
        return (self.op,)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.op._rmatmat(X)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.op._matmat(X)


class _Sum(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        self.a, self.b = a, b
        self.shape, self.dtype, self.device = a.shape, a.dtype, a.device
        self.tags = a.tags & b.tags
        self.layout = a.layout

    def _operands(self) -> tuple[LinearOperator, ...]:
        return (self.a, self.b)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.a._matmat(X) + self.b._matmat(X)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.a._rmatmat(X) + self.b._rmatmat(X)


class _Scaled(LinearOperator):
    def __init__(self, op: LinearOperator, alpha: float) -> None:
        self.op, self.alpha = op, alpha
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.tags = op.tags if alpha >= 0 else op.tags - {PSD}
        self.layout = op.layout

    def _operands(self) -> tuple[LinearOperator, ...]:
        return (self.op,)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.op._matmat(X)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.op._rmatmat(X)


def as_operator(
    A: LinearOperator | torch.Tensor, *, call: str = "hesse.as_operator(A)"
) -> LinearOperator:
    """``A`` itself if it is an operator; a dense tensor wrapped as one (symmetry detected)."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        if A.dim() != 2:
            fail(call, f"expected a 2-D matrix or a hesse operator, got shape {tuple(A.shape)}.")
        if not A.is_floating_point():
            fail(call, f"expected a real floating-point matrix, got {describe(A)}.", TypeError)
        tags: frozenset[str] = frozenset()
        if A.shape[0] == A.shape[1] and torch.equal(A, A.T):
            tags = frozenset({SYMMETRIC})
        return DenseOperator(A, tags=tags)
    fail(call, f"expected a hesse operator or a 2-D tensor, got {describe(A)}.", TypeError)
