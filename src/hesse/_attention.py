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

import re

import torch

from hesse._validation import fail

# The backend switches ``torch.nn.attention.sdpa_kernel`` sets, read and set directly:
# ``math_attention`` wraps every forward pass of a product, and the generator-based
# ``sdpa_kernel`` costs tens of microseconds a call (a share of a small Hessian).
_SWITCHES = tuple(
    (getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"))
    for name in ("cudnn", "flash", "mem_efficient", "overrideable")
    if hasattr(torch._C, f"_get_{name}_sdp_enabled")
)


class _MathAttention:
    """The fused backends off and the math backend on; the caller's switches restored on exit."""

    __slots__ = ("_saved",)

    def __enter__(self) -> None:
        self._saved = [get() for get, _ in _SWITCHES], torch._C._get_math_sdp_enabled()
        for _, switch in _SWITCHES:
            switch(False)
        torch._C._set_sdp_use_math(True)

    def __exit__(self, *exc: object) -> None:
        fused, math = self._saved
        for (_, switch), on in zip(_SWITCHES, fused):
            switch(on)
        torch._C._set_sdp_use_math(math)


def math_attention() -> _MathAttention:
    """Run ``scaled_dot_product_attention`` on its math backend inside the block."""
    return _MathAttention()


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
