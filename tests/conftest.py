"""Shared fixtures: tests run in float64 unless they say otherwise, single-threaded torch."""

import pytest
import torch

import hesse.testing

torch.set_num_threads(1)
# transformers, timm and laplace-torch import torchvision; PyPI's wheel is a CUDA build
# whose compiled ops do not load next to the CPU torch (see the function's docstring).
hesse.testing.torchvision_cpu_shim()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
