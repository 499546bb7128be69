"""Boolean index structures for sparsity propagation.

# NOTE [pattern representation]
A tensor that depends on the flat input ``x`` (length ``n``) carries its
*Jacobian pattern* ``J``: a ``scipy.sparse`` CSR boolean matrix of shape
``(numel, n)`` whose row ``i`` lists the inputs that element ``i`` depends on.
An operator is described locally by sparse boolean *maps* from a term space
(usually the output's elements) to each input's elements:

* :class:`Gather`: term ``t`` reads input element ``idx[t]`` (or nothing, ``-1``):
  views, slicing, broadcasting, indexing; applied by row gathering.
* :class:`Matrix`: term ``t`` reads the input elements in row ``t`` of a sparse
  boolean matrix ``L``: reductions, windows; applied by a sparse product.
* :class:`Compose`: a gather after a matrix, e.g. a softmax element reads its
  whole row without materialising ``numel x row_length`` entries.

The output pattern is ``J_out = sum_k map_k @ J_k`` (boolean semiring). Every map
also runs backwards (``t_mask``) to find which elements reach the output
(*liveness*), and forwards on masks (``mask``) to restrict second-order terms
to live terms. All operations are vectorised NumPy/SciPy, never a Python loop
over elements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count
from typing import Any

import numpy as np
import scipy.sparse as sp

_keys = count()

#: Largest number of stored entries (or pair products) a pattern may reach; beyond it
#: the pattern is effectively dense and :class:`PatternTooLarge` is raised instead.
MAX_ENTRIES = 2**28


class PatternTooLarge(MemoryError):
    """A propagated pattern would exceed :data:`MAX_ENTRIES` entries."""


def check_size(entries: int, what: str, limit: int | None = None) -> None:
    limit = MAX_ENTRIES if limit is None else min(limit, MAX_ENTRIES)
    if entries > limit:
        raise PatternTooLarge(
            f"the {what} would hold about {entries:.3g} entries (limit {limit:.3g}): "
            "the function is effectively dense"
        )


def empty(rows: int, n: int) -> sp.csr_matrix:
    return sp.csr_matrix((rows, n), dtype=bool)


def identity(n: int) -> sp.csr_matrix:
    idx = np.arange(n, dtype=np.int64)
    return sp.csr_matrix(
        (np.ones(n, dtype=bool), idx, np.arange(n + 1, dtype=np.int64)), shape=(n, n)
    )


def from_pairs(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A boolean CSR matrix with ``True`` at ``(rows[i], cols[i])`` (duplicates merged)."""
    m = sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=shape)
    m.sum_duplicates()
    return m


def gather_rows(J: sp.csr_matrix, idx: np.ndarray) -> sp.csr_matrix:
    """Rows ``J[idx]`` with ``idx == -1`` giving an empty row (vectorised)."""
    idx = np.asarray(idx, dtype=np.int64)
    indptr = J.indptr.astype(np.int64, copy=False)
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    starts = indptr[safe]
    lens = np.where(valid, indptr[safe + 1] - starts, 0)
    new_indptr = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_indptr[1:])
    total = int(new_indptr[-1])
    check_size(total, "Jacobian pattern of an intermediate tensor")
    if total:
        offs = np.arange(total, dtype=np.int64) + np.repeat(starts - new_indptr[:-1], lens)
        new_indices = J.indices[offs]
    else:
        new_indices = np.zeros(0, dtype=J.indices.dtype)
    return sp.csr_matrix(
        (np.ones(total, dtype=bool), new_indices, new_indptr), shape=(len(idx), J.shape[1])
    )


def union(mats: list[sp.csr_matrix]) -> sp.csr_matrix:
    out = mats[0]
    for m in mats[1:]:
        out = out + m
    return out.tocsr()


def select_rows(J: sp.csr_matrix, mask: np.ndarray) -> sp.csr_matrix:
    if mask.all():
        return J
    return gather_rows(J, np.flatnonzero(mask))


class Map:
    """A boolean linear map from an input's elements to ``rows`` terms."""

    rows: int
    cols: int

    def apply(self, J: sp.csr_matrix) -> sp.csr_matrix:
        raise NotImplementedError

    def t_mask(self, m: np.ndarray) -> np.ndarray:
        """Input elements read by the terms in ``m`` (a boolean mask over terms)."""
        raise NotImplementedError

    def mask(self, m: np.ndarray) -> np.ndarray:
        """Terms that read any input element in ``m``."""
        raise NotImplementedError


class Identity(Map):
    def __init__(self, n: int) -> None:
        self.rows = self.cols = n

    def apply(self, J):
        return J

    def t_mask(self, m):
        return m

    def mask(self, m):
        return m


class Gather(Map):
    def __init__(self, idx: np.ndarray, cols: int) -> None:
        self.idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        self.rows = len(self.idx)
        self.cols = cols
        assert self.rows == 0 or self.idx.max() < cols, "gather index out of range"

    def apply(self, J):
        return gather_rows(J, self.idx)

    def t_mask(self, m):
        out = np.zeros(self.cols, dtype=bool)
        sel = self.idx[m & (self.idx >= 0)]
        out[sel] = True
        return out

    def mask(self, m):
        valid = self.idx >= 0
        out = np.zeros(self.rows, dtype=bool)
        out[valid] = m[self.idx[valid]]
        return out


class Matrix(Map):
    def __init__(self, L: sp.spmatrix) -> None:
        self.L = sp.csr_matrix(L, dtype=bool)
        self.rows, self.cols = self.L.shape

    def apply(self, J):
        return (self.L @ J).tocsr()

    def t_mask(self, m):
        return (self.L.T @ m.astype(np.int8)) > 0

    def mask(self, m):
        return (self.L @ m.astype(np.int8)) > 0


class Compose(Map):
    """``outer`` after ``inner``: term ``t`` reads what ``outer`` row ``t`` reads of ``inner``."""

    def __init__(self, outer: Map, inner: Map) -> None:
        assert outer.cols == inner.rows, "composed maps do not fit"
        self.outer, self.inner = outer, inner
        self.rows, self.cols = outer.rows, inner.cols

    def apply(self, J):
        return self.outer.apply(self.inner.apply(J))

    def t_mask(self, m):
        return self.inner.t_mask(self.outer.t_mask(m))

    def mask(self, m):
        return self.outer.mask(self.inner.mask(m))


def groups(gid: np.ndarray, ngroups: int) -> Matrix:
    """``(ngroups, len(gid))`` map: group ``g`` reads every element ``e`` with ``gid[e] == g``."""
    gid = np.asarray(gid, dtype=np.int64).reshape(-1)
    valid = gid >= 0
    cols = np.flatnonzero(valid)
    return Matrix(from_pairs(gid[valid], cols, (ngroups, len(gid))))


def everything(rows: int, cols: int) -> Map:
    """Every term reads every input element (the conservative dense map)."""
    one = Matrix(sp.csr_matrix(np.ones((1, cols), dtype=bool)))
    return Compose(Gather(np.zeros(rows, dtype=np.int64), 1), one)


@dataclass(eq=False)
class State:
    """What propagation knows about one tensor of the traced graph.

    ``J`` is the Jacobian pattern (``None``: no derivative with respect to x);
    ``value`` the real value when it does not depend on x; ``tainted`` whether the
    value depends on x at all (even through zero-derivative ops such as ``argmax``).
    """

    shape: tuple[int, ...]
    dtype: Any
    J: sp.csr_matrix | None = None
    value: Any = None
    tainted: bool = False
    key: int = field(default_factory=lambda: next(_keys))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def dependent(self) -> bool:
        return self.J is not None


@dataclass(eq=False)
class Pair:
    """Second-order term: term ``t`` couples what ``map_a`` row ``t`` reads of input ``a``
    with what ``map_b`` row ``t`` reads of input ``b``. ``owner`` maps output elements
    to terms (a term is live when an output element it belongs to is live); ``None``
    means the terms are the output elements."""

    a: int
    map_a: Map
    b: int
    map_b: Map
    owner: Map | None = None


@dataclass(eq=False)
class Local:
    """The local structure of one operator output: first-order maps and second-order terms."""

    inputs: list[State]
    linear: list[tuple[int, Map]]
    pairs: list[Pair] = field(default_factory=list)
