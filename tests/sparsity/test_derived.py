"""NOTE [derived graphs]: a one-shot builds each graph of its pattern once."""

import numpy as np
import scipy.sparse as sp
import torch

import hesse
import hesse.sparsity._coloring as coloring_module
import hesse.sparsity._sparse as sparse_module
from tests.problems import double_backward_hessian


def _counting(monkeypatch) -> dict[str, int]:
    """Counts the graphs :func:`derived` makes, by name, in both modules that derive."""
    made: dict[str, int] = {}
    original = coloring_module.derived

    def derived(pattern, name, make):
        def counted():
            made[name] = made.get(name, 0) + 1
            return make()

        return original(pattern, name, counted)

    monkeypatch.setattr(coloring_module, "derived", derived)
    monkeypatch.setattr(sparse_module, "derived", derived)
    return made


def _f(x):  # pentadiagonal plus a dense last row and column (BDQRTIC-like)
    return ((x[2:] * x[:-2]) ** 2).sum() + (x[1:] ** 3 * x[:-1]).sum() + (x[:-1] ** 2 * x[-1]).sum()


def _g(x):
    return _f(x) + x.sum()


def test_a_one_shot_builds_each_graph_once(monkeypatch):
    made = _counting(monkeypatch)
    sparse_module._CACHE.clear()
    x = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    H = hesse.sparse_hessian(_f, coloring="acyclic")(x)
    # one adjacency, one set of reverse positions, one hash, whatever the steps that use them
    assert made["adjacency"] == 1 and made["twins"] == 1 and made["digest"] == 1, made
    assert made.get("symmetric", 0) <= 1, made
    ref = double_backward_hessian(_f, x)
    assert torch.allclose(H.to_dense(), ref, rtol=1e-10, atol=1e-10)


def test_a_remembered_pattern_keeps_only_its_hash():
    x = torch.rand(200, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    hesse.sparse_hessian(_g, coloring="acyclic")(x)
    [P] = sparse_module._PATTERNS[_g].values()
    assert set(P.__dict__.get("_hesse_derived", {})) == {"digest"}
    again = hesse.sparse_hessian(_g, coloring="acyclic")(x)  # the cached pattern, rebuilt graphs
    ref = double_backward_hessian(_g, x)
    assert torch.allclose(again.to_dense(), ref, rtol=1e-10, atol=1e-10)


def test_a_pattern_with_new_arrays_is_derived_again():
    P = sp.csr_matrix(np.eye(4, k=1, dtype=bool))
    assert coloring_module.adjacency(P).nnz == 6
    assert coloring_module.adjacency(P) is coloring_module.adjacency(P)
    Q = sp.csr_matrix(np.eye(4, k=2, dtype=bool))
    P.indptr, P.indices, P.data = Q.indptr.copy(), Q.indices.copy(), Q.data.copy()
    A = coloring_module.adjacency(P).toarray()
    assert (A == (Q + Q.T).toarray()).all()
