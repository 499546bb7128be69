"""The public reference Hessians and assertions in hesse.testing."""

import pytest
import torch

from hesse.testing import (
    assert_hessian_close,
    assert_symmetric,
    autograd_hessian,
    finite_difference_hessian,
)
from tests.problems import rosenbrock, rosenbrock_hessian


def test_finite_differences_match_closed_form() -> None:
    x = torch.linspace(-1, 1, 8, dtype=torch.float64)
    torch.testing.assert_close(
        finite_difference_hessian(rosenbrock, x), rosenbrock_hessian(x), rtol=1e-7, atol=1e-6
    )


def test_autograd_reference_on_tuple_argnums() -> None:
    f = lambda a, b: (a**2).sum() * (b**3).sum()  # noqa: E731
    a, b = torch.rand(2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    H = autograd_hessian(f, a, b, argnums=(0, 1))
    H_fd = finite_difference_hessian(f, a, b, argnums=(0, 1))
    assert H.shape == (5, 5)
    torch.testing.assert_close(H, H_fd, rtol=1e-7, atol=1e-7)


def test_assertions_fail_when_they_should() -> None:
    H = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    with pytest.raises(AssertionError):
        assert_symmetric(H)
    assert_symmetric(H + H.T)
    with pytest.raises(AssertionError, match="structures differ"):
        assert_hessian_close((H,), H)
    with pytest.raises(AssertionError):
        assert_hessian_close(H, H + 1e-3)


def test_reference_validates_input() -> None:
    with pytest.raises(
        TypeError,
        match=r"hesse\.testing\.finite_difference_hessian\(f, \*args\): expected a floating-point tensor",
    ):
        finite_difference_hessian(lambda x: x.sum(), torch.ones(2, dtype=torch.int32))
