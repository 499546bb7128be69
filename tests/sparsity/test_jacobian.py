"""Sparse Jacobians by column, row and bidirectional colouring against dense references.

References: ``torch.func.jacrev`` (dense Jacobians), dense numpy products for the
compressed-product algebra, and a validity checker of star bicolourings written from
the definition (NOTE [bicolouring]), independent of the colouring code.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.func import jacrev

import hesse
from hesse.sparsity import _coloring as C
from hesse.sparsity import _sparse as S
from hesse.sparsity._recovery import jacobian_plan

COLORINGS = ("column", "row", "bidirectional", "auto")


# -- patterns ------------------------------------------------------------------------------


def banded(m: int, n: int, w: int) -> sp.csr_matrix:
    return sp.diags([np.ones(n)] * (2 * w + 1), range(-w, w + 1), (m, n), "csr", bool)


def arrowhead(n: int) -> sp.csr_matrix:
    """Dense first row, dense first column, diagonal."""
    A = sp.lil_matrix((n, n), dtype=bool)
    A[0, :] = True
    A[:, 0] = True
    A.setdiag(True)
    return A.tocsr()


def banded_arrow(n: int, w: int, k: int) -> sp.csr_matrix:
    """A band of half-width ``w`` with its first ``k`` rows and columns dense."""
    A = banded(n, n, w).tolil()
    A[:k, :] = True
    A[:, :k] = True
    return A.tocsr()


def blocks(nb: int, r: int, c: int) -> sp.csr_matrix:
    return sp.block_diag([np.ones((r, c), dtype=bool)] * nb, format="csr")


def random_pattern(m: int, n: int, density: float, seed: int) -> sp.csr_matrix:
    return sp.csr_matrix(sp.random(m, n, density, random_state=seed, format="csr") != 0)


PATTERNS = {
    "banded": banded(30, 30, 2),
    "arrowhead": arrowhead(40),
    "blocks": blocks(6, 4, 3),
    "banded arrow": banded_arrow(30, 1, 2),
    "wide (m<n)": random_pattern(15, 40, 0.12, 1),
    "tall (m>n)": random_pattern(40, 15, 0.12, 2),
    "wide band (m<n)": banded(20, 35, 3),
    **{f"random-{s}": random_pattern(35, 30, 0.08, s) for s in range(3, 7)},
}


def masked_function(P: sp.csr_matrix, seed: int):
    """``f(x) = (W * P) @ sin(x) + ((V * P) @ x)^2``: ``J = (W * P) diag(cos x) + 2 diag((V*P)x)
    (V * P)``, nonzero exactly on ``P`` at generic points."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.from_numpy(P.toarray()).to(torch.float64)
    W = (torch.rand(P.shape, generator=g, dtype=torch.float64) + 0.5) * mask
    V = (torch.rand(P.shape, generator=g, dtype=torch.float64) + 0.5) * mask
    return lambda x: W @ torch.sin(x) + (V @ x) ** 2


def _pattern_tensor(P: sp.csr_matrix) -> torch.Tensor:
    return torch.from_numpy(P.toarray())


def _close(A: torch.Tensor, B: torch.Tensor) -> None:
    torch.testing.assert_close(A, B, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("coloring", COLORINGS)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_recovered_jacobian_equals_jacrev(name, coloring, gen):
    P = PATTERNS[name]
    f = masked_function(P, seed=len(name))
    x = torch.randn(P.shape[1], generator=gen, dtype=torch.float64)
    J = hesse.sparse_jacobian(f, pattern=_pattern_tensor(P), coloring=coloring)(x)
    assert J.layout == torch.sparse_csr and J.shape == P.shape
    _close(J.to_dense(), jacrev(f)(x))


# -- functions with detected patterns ---------------------------------------------------------


def bratu_residual(u: torch.Tensor) -> torch.Tensor:
    """1-D Bratu problem ``-u'' = exp(u)`` by central differences, zero boundary values."""
    h = 1.0 / (u.numel() + 1)
    z = torch.zeros(1, dtype=u.dtype)
    w = torch.cat([z, u, z])
    return (2 * w[1:-1] - w[:-2] - w[2:]) / h**2 - torch.exp(u)


def brusselator_residual(w: torch.Tensor) -> torch.Tensor:
    """2-D Brusselator right-hand side on a periodic grid (Hairer & Wanner):
    ``F_u = 1 + u^2 v - 4.4 u + a lap(u)``, ``F_v = 3.4 u - u^2 v + a lap(v)``."""
    m = int(round((w.numel() // 2) ** 0.5))
    u, v = w[: m * m].reshape(m, m), w[m * m :].reshape(m, m)

    def lap(z):
        return z.roll(1, 0) + z.roll(-1, 0) + z.roll(1, 1) + z.roll(-1, 1) - 4 * z

    a = 10.0 * (m - 1) ** 2 / 1e4
    fu = 1 + u * u * v - 4.4 * u + a * lap(u)
    fv = 3.4 * u - u * u * v + a * lap(v)
    return torch.cat([fu.reshape(-1), fv.reshape(-1)])


def arrow_residual(x: torch.Tensor) -> torch.Tensor:
    """``f_0 = sum x^2``, ``f_i = x_0 x_i + x_i^3``: an arrowhead Jacobian."""
    return torch.cat([(x**2).sum()[None], x[0] * x[1:] + x[1:] ** 3])


FUNCTIONS = {
    "bratu": (bratu_residual, 25),
    "brusselator": (brusselator_residual, 2 * 5 * 5),
    "arrow": (arrow_residual, 30),
    "wide (m<n)": (lambda x: x[2:] * x[1:-1] - x[:-2], 20),
    "tall (m>n)": (lambda x: torch.cat([torch.sin(x), x[1:] * x[:-1], x.sum()[None]]), 12),
}


@pytest.mark.parametrize("coloring", COLORINGS)
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_detected_jacobian_equals_jacrev(name, coloring, gen):
    f, n = FUNCTIONS[name]
    x = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    J = hesse.sparse_jacobian(f, coloring=coloring, chunk_size=3)(x)
    _close(J.to_dense(), jacrev(f)(x))


# -- colour counts -----------------------------------------------------------------------------


def _products(kind: str, P: sp.csr_matrix) -> int:
    return S._jacobian_plan(kind, P).bicoloring.products


def test_bicolouring_of_an_arrowhead_takes_three_products():
    # Column 0 meets every row, so its JVP seed holds it alone; row 0 meets every column,
    # so its VJP seed holds it alone; the diagonal needs one more product (adding it to
    # either seed would sum it with column 0 or row 0). One-sided: row 0 (column 0) is
    # dense, so every column (row) needs its own colour: n products.
    P = arrowhead(40)
    assert _products("bidirectional", P) == 3
    assert _products("column", P) == 40 and _products("row", P) == 40
    assert S._jacobian_kind("auto", P) == "bidirectional"
    # at any size; auto decides without the one-sided colourings (their bound, the
    # longest row and column, exceeds 3)
    S._CACHE.clear()
    P = arrowhead(3000)
    assert S._jacobian_kind("auto", P) == "bidirectional"
    assert _products("bidirectional", P) == 3
    assert not any(key[0] in ("jacobian-column", "jacobian-row") for key in S._CACHE)


@pytest.mark.parametrize("w,k", [(1, 1), (1, 2), (2, 3), (3, 1)])
def test_bicolouring_of_a_band_with_dense_rows_and_columns(w, k):
    # one VJP per dense row, one JVP per dense column, and a column colouring of the
    # band without them (2w + 1 colours) is a valid bicolouring: 2k + 2w + 1 products;
    # one-sided colourings need n (a dense row meets every column)
    P = banded_arrow(200, w, k)
    assert _products("bidirectional", P) <= 2 * k + 2 * w + 1
    assert _products("column", P) == 200 and _products("row", P) == 200


def test_auto_takes_bicolouring_only_when_it_needs_fewer_products():
    for name, P in PATTERNS.items():
        S._CACHE.clear()
        P = sp.csr_matrix(P)
        kind = S._jacobian_kind("auto", P)
        col, row, bi = (_products(k, P) for k in ("column", "row", "bidirectional"))
        assert _products(kind, P) == min(col, row, bi), name
        if kind == "bidirectional":
            assert bi < min(col, row), name
        if kind == "row":
            assert row < col, name  # ties go to column (JVPs)
    # dense: min(m, n) products is optimal for any colouring; decided without colouring
    S._CACHE.clear()
    assert S._jacobian_kind("auto", sp.csr_matrix(np.ones((9, 7), dtype=bool))) == "column"
    assert S._jacobian_kind("auto", sp.csr_matrix(np.ones((7, 9), dtype=bool))) == "row"
    assert not S._CACHE
    # banded: column colouring is optimal (2w + 1 colours, a full row); auto keeps it
    assert S._jacobian_kind("auto", banded(30, 30, 2)) == "column"
    assert _products("column", banded(30, 30, 2)) == 5


def test_a_constant_function_takes_no_product(gen):
    empty = sp.csr_matrix((5, 4), dtype=bool)
    for kind in ("column", "row", "bidirectional"):
        assert _products(kind, empty) == 0
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    f = lambda v: torch.ones(5, dtype=v.dtype) + 0 * v.sum()  # noqa: E731
    J = hesse.sparse_jacobian(f, pattern=torch.zeros(5, 4, dtype=torch.bool))(x)
    assert J.shape == (5, 4) and J._nnz() == 0


# -- validity of a bicolouring, from the definition ----------------------------------------------


def _check_bicoloring(J: sp.csr_matrix, b: C.Bicoloring) -> None:
    """Every nonzero ``(i, j)`` is read from its chosen product, and that product holds it
    alone: from a JVP, ``j``'s colour is not neutral and no other column of row ``i`` has
    it; from a VJP, the same for ``i`` among the rows of column ``j``. Every non-neutral
    colour is read from (else it is a wasted product)."""
    dense = J.toarray()
    cc, kc = b.column.colors, b.column.num_colors
    rc, kr = b.row.colors, b.row.num_colors
    rows, cols = np.nonzero(dense)  # row-major: CSR order
    assert len(b.from_column) == len(rows)
    read_c, read_r = set(), set()
    for e, (i, j) in enumerate(zip(rows, cols)):
        if b.from_column[e]:
            assert cc[j] < kc, (i, j)
            others = [k for k in np.flatnonzero(dense[i]) if k != j and cc[k] == cc[j]]
            assert not others, (i, j, others)
            read_c.add(int(cc[j]))
        else:
            assert rc[i] < kr, (i, j)
            others = [k for k in np.flatnonzero(dense[:, j]) if k != i and rc[k] == rc[i]]
            assert not others, (i, j, others)
            read_r.add(int(rc[i]))
    assert read_c == set(range(kc)) and read_r == set(range(kr))


@pytest.mark.parametrize("seed", range(12))
def test_bicolouring_is_valid_and_recovers_every_entry_once(seed):
    rng = np.random.default_rng(seed)
    m, n = (int(v) for v in rng.integers(5, 45, 2))
    J = random_pattern(m, n, float(rng.uniform(0.03, 0.3)), seed)
    if seed % 3 == 0:  # a dense row and a dense column on top
        J = sp.csr_matrix(J.toarray() | arrowhead(max(m, n)).toarray()[:m, :n])
    b = C.bicoloring(J)
    _check_bicoloring(J, b)
    # the compressed products, computed densely, give back every entry exactly
    values = rng.standard_normal(J.nnz)
    Jv = sp.csr_matrix((values, J.indices, J.indptr), shape=J.shape).toarray()
    Sc = np.zeros((b.column.num_colors, n))
    seeded = b.column.colors < b.column.num_colors
    Sc[b.column.colors[seeded], np.flatnonzero(seeded)] = 1
    Sr = np.zeros((b.row.num_colors, m))
    seeded = b.row.colors < b.row.num_colors
    Sr[b.row.colors[seeded], np.flatnonzero(seeded)] = 1
    plan = jacobian_plan(J, b)
    got = plan.recover(torch.from_numpy(Sc @ Jv.T), torch.from_numpy(Sr @ Jv))
    assert torch.equal(got, torch.from_numpy(values))  # each entry read, not summed


def test_one_sided_colourings_are_valid_bicolourings():
    J = random_pattern(30, 25, 0.1, 0)
    for side in ("column", "row"):
        _check_bicoloring(J, C.one_sided(J, side))


# -- errors ---------------------------------------------------------------------------------------


def test_unknown_coloring_is_refused(gen):
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    for bad in ("star", "columns", 3):
        with pytest.raises(
            ValueError,
            match=r"hesse.sparse_jacobian\(f\)\(x\): coloring should be one of 'auto', "
            r"'column', 'row', 'bidirectional', got",
        ):
            hesse.sparse_jacobian(torch.sin, coloring=bad)(x)


@pytest.mark.parametrize("coloring", COLORINGS)
def test_pattern_missing_nonzeros_is_reported(coloring, gen):
    x = torch.randn(6, generator=gen, dtype=torch.float64)
    f = lambda v: v[1:] * v[:-1]  # noqa: E731 - bidiagonal Jacobian
    diagonal = torch.eye(5, 6, dtype=torch.bool)
    with pytest.raises(
        ValueError,
        match=r"hesse.sparse_jacobian\(f\)\(x\): the pattern misses nonzeros of the Jacobian: "
        r"a Jacobian-vector product differs .* hesse.jacobian_sparsity",
    ):
        hesse.sparse_jacobian(f, pattern=diagonal, coloring=coloring)(x)
    # a pattern with extra entries is fine: they come back as zeros
    full = torch.ones(5, 6, dtype=torch.bool)
    J = hesse.sparse_jacobian(f, pattern=full, coloring=coloring)(x)
    _close(J.to_dense(), jacrev(f)(x))
