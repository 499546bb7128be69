"""Attention that second-order AD can differentiate.

# NOTE [math attention]
``torch.nn.functional.scaled_dot_product_attention`` dispatches to fused kernels
(flash attention on CPU and CUDA, memory-efficient attention on CUDA) that have a
backward but no double backward and no forward-mode AD (PyTorch issue 116350):
Hessian-vector products, forward-over-reverse and GGN products fail on them, and a
traced graph holds one opaque node. Its math backend computes the same function
from matmul, softmax and masking, whose derivatives of every order exist, and
traces to those ops. hesse evaluates models and functions under :func:`math_attention`
(forward passes of products and diagonals, tracing for curvature propagation and
sparsity): a context manager scoped to hesse's own call, which restores the
caller's backend choice on exit and changes nothing outside it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from torch.nn.attention import SDPBackend, sdpa_kernel

from hesse._validation import fail


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` on its math backend inside the block."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


_NO_DERIVATIVE = (
    re.compile(r"derivative for (\S+?) is not implemented"),
    re.compile(r"Trying to use forward AD with (\S+?) that does not support it"),
)


def raise_if_no_derivative(call: str, err: BaseException) -> None:
    """Turn autograd's "no (second / forward) derivative" errors into hesse's, naming the op.

    Returns without raising for any other error (the caller re-raises it).
    """
    for pattern in _NO_DERIVATIVE:
        found = pattern.search(str(err))
        if found:
            fail(
                call,
                f"the model needs a derivative of {found.group(1)} that PyTorch does not "
                "implement (double backward or forward-mode AD), even with attention on its "
                "math backend. Replace it with differentiable ops (for attention: "
                "torch.nn.functional.scaled_dot_product_attention, or an eager "
                "implementation), or use a first-order method.",
                NotImplementedError,
            )
