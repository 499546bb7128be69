"""The operator core: products, composition, conversions and their errors."""

import numpy as np
import pytest
import torch

import hesse
from hesse.operators._base import PSD, SYMMETRIC, DenseOperator, LinearOperator


class Diag(LinearOperator):
    """A minimal operator with a parameter layout (a dict of two tensors)."""

    def __init__(self, d: dict[str, torch.Tensor]) -> None:
        from hesse._flat import Flat

        self.layout = Flat.of(d)
        self.d = self.layout.flatten(d)
        n = self.d.numel()
        self.shape, self.dtype, self.device = (n, n), self.d.dtype, self.d.device
        self.tags = frozenset({SYMMETRIC, PSD})

    def _matmat(self, X):
        return self.d.unsqueeze(1) * X


@pytest.fixture
def A(gen):
    return torch.randn(5, 4, generator=gen, dtype=torch.float64)


def test_products_vector_matrix(A, gen):
    op = hesse.as_operator(A)
    v = torch.randn(4, generator=gen, dtype=torch.float64)
    V = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op @ v, A @ v)
    torch.testing.assert_close(op @ V, A @ V)
    assert op.shape == (5, 4) and SYMMETRIC not in op.tags


def test_transpose_sum_scale(A, gen):
    op = hesse.as_operator(A)
    B = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    u = torch.randn(5, generator=gen, dtype=torch.float64)
    v = torch.randn(4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op.T @ u, A.T @ u)
    torch.testing.assert_close(op.T.T @ v, A @ v)
    torch.testing.assert_close((op + hesse.as_operator(B)) @ v, (A + B) @ v)
    torch.testing.assert_close((2.5 * op) @ v, 2.5 * A @ v)
    torch.testing.assert_close((op * -1) @ v, -A @ v)
    torch.testing.assert_close((op - hesse.as_operator(B)) @ v, (A - B) @ v)
    torch.testing.assert_close((-op).T @ u, -A.T @ u)


def test_symmetric_detection_and_tags():
    S = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    op = hesse.as_operator(S)
    assert op.is_symmetric and op.T is op
    d = Diag({"a": torch.ones(2, dtype=torch.float64)})
    assert PSD in (2.0 * d).tags and PSD not in (-2.0 * d).tags
    assert "psd" in repr(d)


def test_dict_products(gen):
    d = {
        "w": torch.rand(2, 3, generator=gen, dtype=torch.float64),
        "b": torch.rand(3, generator=gen, dtype=torch.float64),
    }
    op = Diag(d)
    v = {
        "w": torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(3, generator=gen, dtype=torch.float64),
    }
    out = op @ v
    assert set(out) == {"w", "b"}
    torch.testing.assert_close(out["w"], d["w"] * v["w"])
    torch.testing.assert_close(out["b"], d["b"] * v["b"])
    # key order of the argument does not matter
    out2 = op @ {"b": v["b"], "w": v["w"]}
    torch.testing.assert_close(out2["w"], out["w"])


def test_to_dense_and_scipy(A, gen):
    op = hesse.as_operator(A)
    sum_op = op + op  # not a DenseOperator: goes through the chunked product path
    sum_op.chunk_size = 3
    torch.testing.assert_close(sum_op.to_dense(), 2 * A)
    sp = op.to_scipy()
    x = np.random.default_rng(0).standard_normal(4)
    np.testing.assert_allclose(sp.matvec(x), A.numpy() @ x)
    np.testing.assert_allclose(sp.rmatvec(np.ones(5)), A.numpy().T @ np.ones(5))
    np.testing.assert_allclose(sp.matmat(np.eye(4)), A.numpy())
    assert sp.dtype == np.float64


def test_scipy_eigsh_on_symmetric_operator(gen):
    from scipy.sparse.linalg import eigsh

    M = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    S = M @ M.T
    vals = eigsh(hesse.as_operator(S).to_scipy(), k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), torch.linalg.eigvalsh(S)[-2:].numpy(), rtol=1e-10)


def test_errors(A):
    op = hesse.as_operator(A)
    with pytest.raises(
        ValueError, match=r"expected a tensor of shape \(4,\) or \(4, k\), got shape \(5,\)"
    ):
        op @ torch.ones(5, dtype=torch.float64)
    with pytest.raises(TypeError, match="expected dtype torch.float64, got torch.float32"):
        op @ torch.ones(4)
    with pytest.raises(TypeError, match="got an object of type list"):
        op @ [1.0, 2.0]
    with pytest.raises(TypeError, match="no parameter structure"):
        op @ {"w": torch.ones(4, dtype=torch.float64)}
    with pytest.raises(ValueError, match="shapes differ"):
        op + hesse.as_operator(torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="no transpose product"):
        Diag2 = type("NoT", (LinearOperator,), {"_matmat": lambda self, X: X})
        o = Diag2()
        o.shape, o.dtype, o.device = (2, 2), torch.float64, torch.device("cpu")
        o.T @ torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected a 2-D matrix"):
        hesse.as_operator(torch.ones(3))
    with pytest.raises(TypeError, match="real floating-point"):
        hesse.as_operator(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="hesse operator or a 2-D tensor"):
        hesse.as_operator("A")
    d = Diag({"w": torch.ones(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"expected a dict with keys \['w'\]"):
        d @ {"v": torch.ones(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"expected 'w' of shape \(2,\)"):
        d @ {"w": torch.ones(3, dtype=torch.float64)}
    assert isinstance(DenseOperator(A), LinearOperator)
