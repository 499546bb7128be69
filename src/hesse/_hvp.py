"""Hessian-vector products of a function at a point, on one flat vector.

# NOTE [strategies]
``forward-over-reverse`` (``jvp`` of ``grad``, vmapped over tangents) is the
default: one pass carries the primal and a batch of tangents. Operators without
forward-mode AD, and functions that ``vmap`` cannot batch in the forward pass
(in-place updates of captured tensors, BatchNorm in train mode), fall back to
``reverse-over-reverse``: the gradient graph is built once with plain autograd and
every chunk of products is one batched double-backward through it
(``is_grads_batched``), so the forward pass is never batched at all. If even the
batched backward fails, :func:`hesse._chunking.map_chunks` loops. Whatever path
runs, the products are the same (tests check it).

:class:`FlatHVP` is the one HVP engine: ``hesse.hessian``, ``hesse.hvp``,
sparse Hessians, diagonals and function operators all use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import grad, jvp, vmap

from hesse._chunking import (
    allocated_bytes,
    chunk_size_for,
    default_memory_budget,
    map_chunks,
)
from hesse._flat import Flat
from hesse._validation import (
    check_chunk_size,
    check_choice,
    check_differentiable_leaves,
    check_memory_budget,
    check_scalar_output,
    normalize_argnums,
)

MODES = ("auto", "forward-over-reverse", "reverse-over-reverse")

RowSource = Callable[[int, int], torch.Tensor]


class FlatHVP:
    """Hessian-vector products of ``f`` at ``args`` with respect to ``args[argnums]``.

    The differentiated arguments are flattened into one vector ``x`` of length
    ``n`` (see :class:`hesse._flat.Flat`); products take and return ``(k, n)``.
    """

    def __init__(
        self,
        f: Callable[..., torch.Tensor],
        args: Sequence[Any],
        argnums: int | Sequence[int],
        *,
        call: str,
        mode: str = "auto",
    ) -> None:
        self.call = call
        check_choice(call, "mode", mode, MODES)
        self.argnums = normalize_argnums(call, argnums, len(args))
        self.single_arg = isinstance(argnums, int)
        primals = args[self.argnums[0]] if self.single_arg else tuple(args[i] for i in self.argnums)
        check_differentiable_leaves(call, primals)
        self.primals = primals
        self.flat = Flat.of(primals)
        self.x = self.flat.flatten(primals).detach()
        self.f = f
        self.args = tuple(args)
        self.mode = mode
        self._graph: tuple[torch.Tensor, torch.Tensor] | None = None
        self._gradient: torch.Tensor | None = None
        self._row_bytes: int | None = None

    # -- the flat scalar function -------------------------------------------------
    def g(self, x: torch.Tensor) -> torch.Tensor:
        tree = self.flat.unflatten(x)
        args = list(self.args)
        if self.single_arg:
            args[self.argnums[0]] = tree
        else:
            for i, leaf in zip(self.argnums, tree):
                args[i] = leaf
        out = check_scalar_output(self.call, self.f(*args))
        return out.reshape(())

    @property
    def n(self) -> int:
        return self.flat.n

    # -- forward-over-reverse -----------------------------------------------------
    def _fwdrev_single(self, v: torch.Tensor) -> torch.Tensor:
        gr, hv = jvp(grad(self.g), (self.x,), (v,))
        if self._gradient is None:
            self._gradient = gr.detach()
        return hv

    def _fwdrev_batched(self, vs: torch.Tensor) -> torch.Tensor:
        return vmap(self._fwdrev_single_pure)(vs)

    def _fwdrev_single_pure(self, v: torch.Tensor) -> torch.Tensor:
        return jvp(grad(self.g), (self.x,), (v,))[1]

    # -- reverse-over-reverse -----------------------------------------------------
    def _revrev_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._graph is None:
            x = self.x.detach().requires_grad_(True)
            with torch.enable_grad():
                y = self.g(x)
                gr = None
                if y.requires_grad:
                    (gr,) = torch.autograd.grad(y, x, create_graph=True, allow_unused=True)
            if gr is None:  # f does not depend on x
                gr = torch.zeros_like(x)
            self._graph = (x, gr)
            self._gradient = gr.detach()
        return self._graph

    def _revrev(self, vs: torch.Tensor, batched: bool) -> torch.Tensor:
        x, gr = self._revrev_graph()
        if not gr.requires_grad:  # f is at most linear in x: the Hessian is zero
            return torch.zeros_like(vs)
        (hv,) = torch.autograd.grad(
            gr, x, vs, retain_graph=True, allow_unused=True, is_grads_batched=batched
        )
        return torch.zeros_like(vs) if hv is None else hv

    def _revrev_batched(self, vs: torch.Tensor) -> torch.Tensor:
        return self._revrev(vs, batched=True)

    def _revrev_single(self, v: torch.Tensor) -> torch.Tensor:
        return self._revrev(v, batched=False)

    # -- strategy resolution ------------------------------------------------------
    def _paths(self) -> tuple[Callable, Callable]:
        if self.mode == "reverse-over-reverse":
            return self._revrev_batched, self._revrev_single
        return self._fwdrev_batched, self._fwdrev_single

    def _per_row_bytes(self) -> int:
        """Estimated bytes one product adds to a chunk.

        # NOTE [memory estimate]
        One gradient evaluation is run under an allocation counter (its result is
        kept: reverse-over-reverse reuses its graph, ``hvp`` returns the gradient).
        A product carries a tangent through the forward and the backward pass, so it
        allocates about as much as one gradient again per vector, plus the shared
        primal; ``4 x`` the gradient's total allocation bounds that from above.
        Total allocation already exceeds the peak, so the estimate is conservative.
        """
        if self._row_bytes is None:
            _, used = allocated_bytes(lambda: self.gradient)
            self._row_bytes = 4 * used + 4 * self.n * self.x.element_size()
        return self._row_bytes

    def _first_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        """Products with the first chunk; in ``auto`` mode this settles the strategy."""
        batched, single = self._paths()
        if self.mode != "auto":
            return map_chunks(
                batched,
                single,
                chunk.shape[0],
                tensor_rows(chunk),
                chunk_size=chunk.shape[0],
                call=self.call,
            )
        try:
            out = self._fwdrev_batched(chunk)
            self.mode = "forward-over-reverse"
            return out
        except Exception:  # noqa: BLE001 - NOTE [strategies]: any failure moves on
            self.mode = "reverse-over-reverse"
        return map_chunks(
            self._revrev_batched,
            self._revrev_single,
            chunk.shape[0],
            tensor_rows(chunk),
            chunk_size=chunk.shape[0],
            call=self.call,
        )

    @property
    def gradient(self) -> torch.Tensor:
        """The flat gradient at ``x`` (computed by the first product if not yet)."""
        if self._gradient is None and self.mode != "reverse-over-reverse":
            try:
                self._gradient = grad(self.g)(self.x).detach()
            except Exception:  # noqa: BLE001 - NOTE [strategies]
                if self.mode != "auto":
                    raise
        if self._gradient is None:
            self._revrev_graph()
        assert self._gradient is not None
        return self._gradient

    def apply(
        self,
        k: int,
        rows: RowSource,
        *,
        chunk_size: int | None = None,
        memory_budget: int | float | None = None,
        fixed_bytes: int = 0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``H @ v`` for the ``k`` vectors ``rows(start, stop)``: a ``(k, n)`` tensor.

        Without ``chunk_size``, chunks are sized so that
        ``fixed_bytes + chunk * per_row`` fits ``memory_budget`` (default: half the
        free memory), see NOTE [memory estimate].
        """
        check_chunk_size(self.call, chunk_size)
        check_memory_budget(self.call, memory_budget)
        if chunk_size is None:
            budget = memory_budget or default_memory_budget(self.x.device)
            chunk_size = chunk_size_for(
                rows=k,
                per_row_bytes=self._per_row_bytes(),
                fixed_bytes=fixed_bytes,
                budget=int(budget),
            )
        first = min(k, chunk_size)
        head = self._first_chunk(rows(0, first))
        if out is None:
            out = head.new_empty((k, *head.shape[1:]))
        out[:first] = head
        if first < k:
            batched, single = self._paths()
            map_chunks(
                batched,
                single,
                k - first,
                lambda s, e: rows(first + s, first + e),
                chunk_size=chunk_size,
                call=self.call,
                out=out[first:],
            )
        return out


def basis_rows(n: int, like: torch.Tensor) -> RowSource:
    """Rows ``start:stop`` of the ``n x n`` identity, made on demand (never all at once)."""

    def rows(start: int, stop: int) -> torch.Tensor:
        eye = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        return eye

    return rows


def tensor_rows(mat: torch.Tensor) -> RowSource:
    return lambda start, stop: mat[start:stop]
