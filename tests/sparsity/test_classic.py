"""Classic test problems: detected patterns contain every nonzero, sparse equals dense."""

import pytest
import torch
from torch.func import hessian

import hesse

from .classic import PROBLEMS


@pytest.mark.parametrize("name,f,n", PROBLEMS, ids=[p[0] for p in PROBLEMS])
def test_classic_problem(name, f, n):
    gen = torch.Generator().manual_seed(n)
    pattern = hesse.hessian_sparsity(f)(torch.zeros(n, dtype=torch.float64)).to_dense()
    sh = hesse.sparse_hessian(f)
    for _ in range(2):
        # points in [0.5, 1.5]: every problem is smooth there (tan, divisions)
        x = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
        H = hessian(f)(x)
        scale = H.abs().max().item()
        assert not ((H.abs() > 1e-12 * scale) & ~pattern).any(), "a nonzero was missed"
        Hs = sh(x).to_dense()
        assert (Hs - H).abs().max().item() <= 1e-10 * max(scale, 1.0)


def test_the_suite_is_large_enough():
    assert len(PROBLEMS) >= 40
