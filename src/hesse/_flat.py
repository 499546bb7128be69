"""Flatten a pytree of tensors into one vector and back.

Every mechanism in hesse works on one flat vector ``x`` of length ``n`` (row-major,
leaves in pytree order). :class:`Flat` is the one place that maps between that
vector and the user's structure (a tensor, a tuple of tensors, a dict of
parameters), including the nested block structure ``torch.func.hessian`` returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from hesse._validation import check_differentiable_leaves, normalize_argnums

_LEAF = tree_flatten(torch.empty(0))[1]  # the spec of a single tensor


@dataclass(frozen=True)
class Flat:
    """The layout of a pytree of tensors as one flat vector."""

    spec: TreeSpec
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(tree: Any) -> Flat:
        if isinstance(tree, torch.Tensor):  # one tensor: no pytree work (per-call cost)
            return Flat(_LEAF, (tree.shape,), (tree.numel(),), tree.dtype, tree.device)
        leaves, spec = tree_flatten(tree)
        return Flat(
            spec=spec,
            shapes=tuple(leaf.shape for leaf in leaves),
            numels=tuple(leaf.numel() for leaf in leaves),
            dtype=leaves[0].dtype,
            device=leaves[0].device,
        )

    @property
    def n(self) -> int:
        return sum(self.numels)

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for m in self.numels:
            out.append(acc)
            acc += m
        return out

    def flatten(self, tree: Any) -> torch.Tensor:
        """Concatenate the leaves of ``tree`` (laid out like this one) into ``(n,)``."""
        if isinstance(tree, torch.Tensor):
            return tree.reshape(-1)
        leaves, _ = tree_flatten(tree)
        if len(leaves) == 1:
            return leaves[0].reshape(-1)
        return torch.cat([leaf.reshape(-1) for leaf in leaves])

    def flatten_batched(self, tree: Any) -> torch.Tensor:
        """Like :meth:`flatten` for leaves with one leading batch dimension: ``(k, n)``."""
        leaves, _ = tree_flatten(tree)
        k = leaves[0].shape[0]
        return torch.cat([leaf.reshape(k, -1) for leaf in leaves], dim=1)

    def unflatten(self, vec: torch.Tensor) -> Any:
        """Split ``(..., n)`` into the tree, each leaf shaped ``(..., *shape)``."""
        batch = vec.shape[:-1]
        if self.spec.is_leaf():  # one tensor: no pytree work
            if vec.dim() == 1 and self.shapes[0] == vec.shape:
                return vec  # no view: each view is one more node in every later backward
            return vec.reshape((*batch, *self.shapes[0]))  # a tuple: shape () is legal
        if len(self.shapes) == 1:  # no split: its backward would copy every product
            return tree_unflatten([vec.reshape((*batch, *self.shapes[0]))], self.spec)
        parts = torch.split(vec, list(self.numels), dim=-1)
        leaves = [p.reshape((*batch, *s)) for p, s in zip(parts, self.shapes)]
        return tree_unflatten(leaves, self.spec)

    def unflatten_blocks(self, mat: torch.Tensor) -> Any:
        """Split an ``(n, n)`` matrix into the nested structure of ``torch.func.hessian``.

        Block ``[i][j]`` has shape ``shape_i + shape_j``: the outer tree indexes the
        gradient's leaves, the inner tree the input's leaves.
        """
        if self.spec.is_leaf():  # one tensor: no pytree work
            return mat.reshape((*self.shapes[0], *self.shapes[0]))
        offs = self.offsets
        rows = []
        for oi, ni, si in zip(offs, self.numels, self.shapes):
            row = [
                mat[oi : oi + ni, oj : oj + nj].reshape((*si, *sj))
                for oj, nj, sj in zip(offs, self.numels, self.shapes)
            ]
            rows.append(tree_unflatten(row, self.spec))
        return tree_unflatten(rows, self.spec)


@dataclass(frozen=True)
class FlatArgs:
    """The arguments of a call with the differentiated ones (``argnums``) as one flat vector.

    The one place that selects ``args[argnums]`` (a single argument, or a tuple of
    them when ``argnums`` is a tuple), validates them, and calls ``f`` with a flat
    vector substituted back in.
    """

    args: tuple[Any, ...]
    nums: tuple[int, ...]
    single: bool
    flat: Flat

    @staticmethod
    def of(call: str, args: Sequence[Any], argnums: int | Sequence[int]) -> FlatArgs:
        nums = normalize_argnums(call, argnums, len(args))
        single = isinstance(argnums, int)
        primals = args[nums[0]] if single else tuple(args[i] for i in nums)
        check_differentiable_leaves(call, primals)
        return FlatArgs(tuple(args), nums, single, Flat.of(primals))

    @property
    def primals(self) -> Any:
        return self.args[self.nums[0]] if self.single else tuple(self.args[i] for i in self.nums)

    def x(self) -> torch.Tensor:
        """The differentiated arguments as one detached ``(n,)`` vector."""
        return self.flat.flatten(self.primals).detach()

    def call(self, f: Callable[..., Any], v: torch.Tensor) -> Any:
        """``f(*args)`` with the differentiated arguments replaced by the leaves of ``v``."""
        tree = self.flat.unflatten(v)
        args = list(self.args)
        if self.single:
            args[self.nums[0]] = tree
        else:
            for i, leaf in zip(self.nums, tree):
                args[i] = leaf
        return f(*args)


def numel(shape: torch.Size | tuple[int, ...]) -> int:
    return math.prod(shape)
