"""Where a spectral algorithm's time goes: operator products versus its own linear algebra.

# NOTE [time split]
On large operators the Krylov linear algebra (Gram-Schmidt against an ``n x m``
basis, Ritz rotations) can cost as much as the products it organises, so
:func:`~hesse.eigsh` and :func:`~hesse.spectral_density` report both:
``product_seconds`` is the wall time spent inside the operator's products and
``total_seconds`` the whole call, so ``total - product`` is the algorithm's own
overhead. :class:`TimedOperator` measures any operator the same way (for
:func:`~hesse.trace`, or a benchmark). On CUDA the device is synchronised around
each product, so asynchronous kernels are charged to the product that launched
them.
"""

from __future__ import annotations

import time

import torch

from hesse.operators._base import LinearOperator


class TimedOperator(LinearOperator):
    """``op`` itself, with the wall time of its products accumulated in ``seconds``.

    Attributes:
        seconds: time spent in ``_matmat`` / ``_rmatmat`` so far.
        calls: number of product calls.
    """

    def __init__(self, op: LinearOperator) -> None:
        self.op = op
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.tags, self.layout, self.chunk_size = op.tags, op.layout, op.chunk_size
        self.seconds = 0.0
        self.calls = 0

    def _name(self) -> str:
        return self.op._name()

    def _timed(self, fn, X: torch.Tensor) -> torch.Tensor:
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn(X)
        if sync:
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self._timed(self.op._matmat, X)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self._timed(self.op._rmatmat, X)
