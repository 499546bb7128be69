"""Shared fixtures: tests run in float64 unless they say otherwise, single-threaded torch."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
