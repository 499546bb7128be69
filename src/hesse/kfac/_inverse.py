"""The inverse of a Kronecker-factored operator, as an operator (block by block)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hesse.kfac._layers import LayerSpec, apply_blocks
from hesse.operators._base import PSD, SYMMETRIC, LinearOperator


class KroneckerInverse(LinearOperator):
    """A block-diagonal operator given by one function per block on its ``(k, p, q)`` stack.

    Built by ``KFACOperator.inverse`` and ``EKFACOperator.inverse``; symmetric and
    positive definite, with the parameter layout of the operator it inverts.
    """

    def __init__(
        self,
        title: str,
        like: LinearOperator,
        blocks: list[LayerSpec],
        fns: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    ) -> None:
        self.title = title
        self.blocks, self.fns = blocks, fns
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.layout = like.layout
        self.tags = frozenset({SYMMETRIC, PSD})

    def _name(self) -> str:
        return self.title

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return apply_blocks(X, self.blocks, lambda b, P: self.fns[b.name](P))
