"""Recovery plans: where every Hessian nonzero is read from the compressed products.

A plan is computed once per pattern and colouring (cached by the caller) and applied
to the ``(K, n)`` products ``B`` (row ``c``: ``H s_c``) with a few gathers; nothing in
it loops over entries in Python.

# NOTE [substitution]
With an acyclic colouring (NOTE [acyclic colouring]), ``B[c, i]`` is the sum of
``H_ij`` over the neighbours ``j`` of ``i`` of colour ``c``; they all lie in one
two-coloured tree. Rooting every tree and visiting it depth first, the entry on the
edge from ``u`` to its parent is

.. math:: H_{u, p(u)} = b_u - \\sum_{k \\text{ child of } u} H_{k, u}
          = \\sigma_u \\sum_{t \\in \\text{subtree}(u)} \\sigma_t b_t,
          \\qquad b_t = B[c(p(t)), t], \\ \\sigma_t = (-1)^{\\text{depth}(t)},

a signed sum over a contiguous range of the preorder. One cumulative sum over all
trees therefore solves every tree at once (the triangular solve of substitution
recovery as one scan). Its rounding error grows with the entries summed, which a
direct (star) recovery avoids: ``recover`` returns an error estimate per entry, and
``coloring="auto"`` switches to direct recovery where it is too large.
The diagonal is ``H_ii = B[c(i), i]``.

References:
    Coleman, T. F. & Cai, J.-Y. (1986). The cyclic coloring problem and estimation of
    sparse Hessian matrices. SIAM J. Algebraic Discrete Methods 7(2).
    Gebremedhin, A. H., Tarafdar, A., Manne, F. & Pothen, A. (2007). New acyclic and
    star coloring algorithms with application to computing Hessians. SIAM J. Sci.
    Comput. 29(3).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from hesse.sparsity._coloring import (
    Bicoloring,
    Coloring,
    adjacency,
    int64_graph,
    star_recovery,
    symmetric,
)


@dataclass
class Plan:
    """How to read the entries of a pattern ``P`` (CSR order) from ``B`` (``(K, n)``)."""

    n: int
    rows: np.ndarray  # coordinates of the stored entries (symmetrised pattern, CSR order)
    cols: np.ndarray
    coloring: Coloring
    direct: torch.Tensor | None = None  # star: flat index into B per entry
    # substitution (NOTE [substitution])
    visit_src: torch.Tensor | None = None  # flat index into B of b_t per visit
    visit_sign: torch.Tensor | None = None
    visit_end: torch.Tensor | None = None
    visit_vertex: torch.Tensor | None = None
    visit_parent: torch.Tensor | None = None
    gather: torch.Tensor | None = None  # per entry: index into cat([diagonal, edge values])
    full: bool = False  # all n^2 entries: B (n Hessian rows) is read whole, transposed

    def recover(self, B: torch.Tensor, estimate: bool = False) -> tuple[torch.Tensor, float]:
        """The entries (CSR order) and, with ``estimate``, the largest estimated relative
        rounding error of substitution (NOTE [substitution]; ``0.0`` otherwise)."""
        if self.full:  # entry (i, j) is B[j, i]: one transposed copy, no gather
            return B.t().reshape(-1), 0.0
        flat = B.reshape(-1)
        index = self.direct if self.direct is not None else self.gather
        if index is not None and index.device != B.device:
            self.to(B.device)  # a plan follows the products to their device, once
        if self.direct is not None:
            return flat[self.direct], 0.0
        assert self.visit_src is not None and self.gather is not None
        if len(self.visit_src) == 0:
            return flat[self.diag_index()][self.gather], 0.0
        wide = (
            torch.float64 if B.dtype in (torch.float16, torch.bfloat16, torch.float32) else B.dtype
        )
        m, n = len(self.visit_src), self.n
        b = flat.index_select(0, self.visit_src).to(wide).mul_(self.visit_sign)
        C = b.new_empty(m + 1)  # C[k]: the signed sum of the visits before k
        C[0] = 0
        torch.cumsum(b, 0, out=C[1:])
        # one buffer holds the diagonal and the edge values; one gather orders them
        both = flat.new_empty(n + m)
        torch.index_select(flat, 0, self.diag_index(), out=both[:n])
        edge = C.index_select(0, self.visit_end).sub_(C[:-1]).mul_(self.visit_sign)
        both[n:] = edge
        values = both.index_select(0, self.gather)
        if not estimate:
            return values, 0.0
        A = torch.nn.functional.pad(torch.cumsum(b.abs(), 0), (1, 0))
        mass = A[self.visit_end] - A[:-1]  # what each substituted entry summed
        # error relative to the entry's own scale |H_uv| + sqrt(|H_uu H_vv|), which
        # diagonal rescaling of the variables leaves unchanged
        d = both[:n].to(wide).abs()
        scale = edge.abs() + (d[self.visit_vertex] * d[self.visit_parent]).sqrt()
        ratio = mass * torch.finfo(B.dtype).eps / scale.clamp_min(torch.finfo(wide).tiny)
        return values, float(ratio.max())

    def seeds(self, like: torch.Tensor) -> torch.Tensor:
        """The ``(K, n)`` seed matrix in ``like``'s dtype and device, made once."""
        key = (like.dtype, like.device)
        cache = self.__dict__.setdefault("_seeds", {})
        if key not in cache:
            S = torch.from_numpy(self.coloring.seeds().toarray())
            cache[key] = S.to(dtype=like.dtype, device=like.device)
        return cache[key]

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """The sparse CSR tensor ``(n, n)`` of the pattern holding ``values``."""
        cache = self.__dict__.setdefault("_index", {})
        if values.device not in cache and self.full:
            n, device = self.n, values.device
            crow = torch.arange(0, n * n + 1, n, device=device)
            cache[device] = (crow, torch.arange(n, device=device).repeat(n))
        elif values.device not in cache:
            cache[values.device] = tuple(
                t.to(values.device) for t in csr_index(self.rows, self.cols, self.n)
            )
        return csr_tensor(*cache[values.device], values, (self.n, self.n))

    def diag_index(self) -> torch.Tensor:
        if not hasattr(self, "_diag"):
            c = torch.from_numpy(self.coloring.colors)
            device = self.gather.device if self.gather is not None else None
            self._diag = (c * self.n + torch.arange(self.n)).to(device)
        return self._diag

    def to(self, device: torch.device) -> Plan:
        for name in (
            "direct",
            "visit_src",
            "visit_sign",
            "visit_end",
            "visit_vertex",
            "visit_parent",
            "gather",
        ):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        if hasattr(self, "_diag"):
            self._diag = self._diag.to(device)
        return self


def star_plan(P: sp.csr_matrix, coloring: Coloring) -> Plan:
    """Direct recovery from a star colouring: one entry of ``B`` per nonzero."""
    rows, cols, src_color, src_row = star_recovery(P, coloring)
    coloring, src_color = _neutral(coloring, src_color)
    direct = torch.from_numpy(src_color * P.shape[0] + src_row)
    return Plan(P.shape[0], rows, cols, coloring, direct=direct)


def dense_plan(P: sp.csr_matrix | int) -> Plan:
    """Every variable its own colour: ``B`` holds ``n`` Hessian rows, each entry of the
    (symmetrised) pattern read directly (NOTE [dense fallback]); no colouring runs.
    ``P`` an int ``n``: all ``n^2`` entries."""
    if isinstance(P, int):
        n = P
        rows = np.repeat(np.arange(n, dtype=np.int64), n)
        cols = np.tile(np.arange(n, dtype=np.int64), n)
    else:
        n = P.shape[0]
        S = symmetric(P)
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(S.indptr))
        cols = S.indices.astype(np.int64)
    coloring = Coloring(np.arange(n, dtype=np.int64), n, "dense")
    if isinstance(P, int):
        return Plan(n, rows, cols, coloring, full=True)
    return Plan(n, rows, cols, coloring, direct=torch.from_numpy(cols * n + rows))


def _neutral(coloring: Coloring, src_color: np.ndarray) -> tuple[Coloring, np.ndarray]:
    """Drop the colours no entry is read from.

    # NOTE [neutral colours]
    After direct recovery is planned, a colour class from whose product no entry is
    read (its members' diagonals are structural zeros and every edge at them is read
    from the other end's colour) gets the *neutral* colour ``num_colors``, which is in
    no seed (:func:`hesse.sparsity._sparse._seed_rows`), and the other colours are
    renumbered. Whole classes only: every kept seed is unchanged, so every read stays
    exact. A zero-diagonal star (``x_0 * sum(x_1:)``) needs 1 product instead of 2.
    Montoison, Dalle & Gebremedhin (2025), Revisiting sparse matrix coloring and
    bicoloring, arXiv:2505.07308 (postprocessing with a neutral colour)."""
    used = np.zeros(max(coloring.num_colors, 1), dtype=bool)
    used[src_color] = True
    if used[: coloring.num_colors].all():
        return coloring, src_color
    k = int(used.sum())
    new = np.full(len(used), k, dtype=np.int64)  # dropped classes: neutral colour k
    new[used] = np.arange(k)
    return Coloring(new[coloring.colors], k, coloring.kind), new[src_color]


def substitution_plan(P: sp.csr_matrix, coloring: Coloring) -> Plan:
    """Substitution recovery from an acyclic colouring (NOTE [substitution])."""
    from hesse.sparsity._kernels import forest_preorder, kernel, tree_pairs

    n = P.shape[0]
    S = symmetric(P)
    A = adjacency(P)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(S.indptr))
    cols = S.indices.astype(np.int64)
    colors = coloring.colors
    if A.nnz == 0:
        gather = torch.from_numpy(rows)  # only diagonal entries
        empty = torch.zeros(0, dtype=torch.int64)
        return Plan(
            n,
            rows,
            cols,
            coloring,
            visit_src=empty,
            visit_sign=torch.zeros(0, dtype=torch.float64),
            visit_end=empty,
            visit_vertex=empty,
            visit_parent=empty,
            gather=gather,
        )
    assert coloring.trees is not None, "substitution needs the trees of an acyclic colouring"
    indptr, indices = int64_graph(A)  # the colouring's: converted once per graph
    # int32 pairs where the positions fit: half the memory a latency-bound walk reads
    wide = A.nnz >= np.iinfo(np.int32).max
    pairs = np.empty((A.nnz, 2), dtype=np.int64 if wide else np.int32)
    pairs = kernel(tree_pairs, A.nnz)(indices, coloring.trees, pairs)
    src, sign, end, v, p, gather = kernel(forest_preorder, A.nnz)(
        indptr, pairs, colors, S.indptr, S.indices
    )
    assert 2 * len(v) == A.nnz, "substitution: the two-coloured subgraphs are not forests"
    return Plan(
        n,
        rows,
        cols,
        coloring,
        visit_src=torch.from_numpy(src),
        visit_sign=torch.from_numpy(sign),
        visit_end=torch.from_numpy(end),
        visit_vertex=torch.from_numpy(v),
        visit_parent=torch.from_numpy(p),
        gather=torch.from_numpy(gather),
    )


@dataclass
class JacobianPlan:
    """How to read the entries of a Jacobian pattern (CSR order) from the column products
    ``Bc`` (``(K_col, m)``, JVPs) and the row products ``Br`` (``(K_row, n)``, VJPs)
    (NOTE [bicolouring]): one gather from the two, flattened one after the other."""

    m: int
    n: int
    rows: np.ndarray
    cols: np.ndarray
    bicoloring: Bicoloring
    index: torch.Tensor  # per entry: flat index into cat([Bc.reshape(-1), Br.reshape(-1)])

    def recover(self, Bc: torch.Tensor, Br: torch.Tensor) -> torch.Tensor:
        if self.index.device != Bc.device:
            self.index = self.index.to(Bc.device)
        # index_select, not [index]: advanced indexing costs ~1000x more at these sizes on
        # a busy CPU (torch 2.13, a 6k-entry gather: 17 ms against 5 us)
        both = Br.reshape(-1) if not Bc.numel() else Bc.reshape(-1)
        if Bc.numel() and Br.numel():
            both = torch.cat([Bc.reshape(-1), Br.reshape(-1)])
        return both.index_select(0, self.index)

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """The sparse CSR tensor ``(m, n)`` of the pattern holding ``values``."""
        cache = self.__dict__.setdefault("_index", {})
        if values.device not in cache:
            crow, col = csr_index(self.rows, self.cols, self.m)
            cache[values.device] = (crow.to(values.device), col.to(values.device))
        return csr_tensor(*cache[values.device], values, (self.m, self.n))


def jacobian_plan(P: sp.csr_matrix, bicoloring: Bicoloring) -> JacobianPlan:
    """Direct recovery of ``J`` (pattern ``P``, CSR with sorted indices) from a bicolouring:
    entry ``J_ij`` is ``Bc[c(j), i]`` or ``Br[r(i), j]`` (NOTE [bicolouring])."""
    m, n = P.shape
    coo = P.tocoo()
    rows, cols = coo.row.astype(np.int64), coo.col.astype(np.int64)
    cc, rc = bicoloring.column, bicoloring.row
    at_col = cc.colors[cols] * m + rows
    at_row = cc.num_colors * m + rc.colors[rows] * n + cols
    read = bicoloring.from_column
    assert (cc.colors[cols[read]] < cc.num_colors).all(), "an entry read from a neutral column"
    assert (rc.colors[rows[~read]] < rc.num_colors).all(), "an entry read from a neutral row"
    index = torch.from_numpy(np.where(read, at_col, at_row))
    return JacobianPlan(m, n, rows, cols, bicoloring, index)


def csr_index(rows: np.ndarray, cols: np.ndarray, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(crow_indices, col_indices)`` of entries given in row-major (CSR) order."""
    crow = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=m), out=crow[1:])
    return torch.from_numpy(crow), torch.from_numpy(np.ascontiguousarray(cols, dtype=np.int64))


def csr_tensor(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """A ``torch.sparse_csr`` tensor, without the beta warning and the O(nnz) check."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
