"""What KFAC and EKFAC share: blocks, the factor pass over the data, and eigenvalue grids.

# NOTE [kfac scaling]
KFAC approximates the same matrix as :class:`hesse.GGNOperator` (type-2) or
:class:`hesse.FisherOperator` (``"mc"``, ``"empirical"``): the curvature of the
dataset-mean loss ``(1/M) sum_b M_b L_b`` (NOTE [loss conventions]: ``M`` the
number of terms the loss averages, e.g. samples for cross-entropy, output
entries for MSE). Per block (NOTE [kfac layers], NOTE [kron layout]) it is
``G ⊗ A`` with

* ``kfac_approx="expand"`` (Eschenhagen et al. 2023): every shared position is
  an example of its own: ``A = (1/(N R)) sum_{n,r} a_nr a_nr^T`` (the mean over
  all input rows) and ``G = (1/M) sum_{n,r,k} g_nrk g_nrk^T``;
* ``"reduce"``: positions are reduced first, ``A = (1/N) sum_n ā_n ā_n^T`` with
  ``ā_n`` the mean of sample ``n``'s rows, and ``G = (1/M) sum_{n,k} ĝ_nk ĝ_nk^T``
  with ``ĝ_nk`` the sum of its gradient rows.

``g`` are the gradients of the sum-form loss's output factor columns at the
layer output (NOTE [kfac backward]); ``1/M`` is the model operators'
normalisation, so all the loss scaling sits in ``G`` and ``A`` is a plain mean of
input outer products. For one sample and one ``nn.Linear`` layer the product is
exactly the GGN (tested). With ``reduction="sum"`` the ``1/M`` is dropped.

Factors are accumulated through the model operators' one aggregation seam
(NOTE [aggregation]): every batch contributes one packed vector of sums (``A``
sums, their row counts, ``G`` sums), so the data iteration, the weighting of a
short last batch and the data-parallel reduction are the model operators'.
``A`` is its sum over its row count (a ratio, unaffected by the final division
by ``M``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from hesse._probes import keyed_generator, stream_seed
from hesse._validation import check_choice, check_generator, describe, fail
from hesse.kfac._capture import capture
from hesse.kfac._kron import Eigen, diagonal_of
from hesse.kfac._layers import LayerSpec, Piece, apply_blocks, find_blocks
from hesse.operators._base import PSD, SYMMETRIC
from hesse.operators._losses import PlainLoss, output_curvature
from hesse.operators._model import Batch, _ModelOperator
from hesse.solvers._solve import check_damping

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
KFAC_APPROX = ("expand", "reduce")


class Factors(NamedTuple):
    """The Kronecker factors of one block: ``A`` (inputs, ``q x q`` or a diagonal
    ``(q,)``) and ``G`` (output gradients, ``p x p``)."""

    A: torch.Tensor
    G: torch.Tensor


class KroneckerOperator(_ModelOperator):
    """Blocks ``G ⊗ A`` per supported layer from one pass over the data (see subclasses)."""

    _title = "KFACOperator"
    #: compute the factors in ``__init__`` (the data-parallel variant defers it).
    _build_in_init = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable[Batch],
        *,
        fisher_type: str,
        kfac_approx: str,
        params: Any,
        mc_samples: int,
        generator: torch.Generator | None,
        separate_bias: bool,
        output_hessian: Callable | None,
        progress: bool,
        check_deterministic: bool,
        loss_count: Callable | None = None,
    ) -> None:
        call = f"hesse.{self._title}(model, loss_fn, data)"
        check_choice(call, "fisher_type", fisher_type, FISHER_TYPES)
        check_choice(call, "kfac_approx", kfac_approx, KFAC_APPROX)
        check_generator(call, generator)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            fail(call, f"mc_samples should be a positive int, got {mc_samples!r}.")
        if mc_samples != 1 and fisher_type != "mc":
            fail(
                call,
                f"mc_samples={mc_samples} only applies to fisher_type='mc', got "
                f"fisher_type={fisher_type!r}. Leave mc_samples at 1.",
            )
        if not isinstance(separate_bias, bool):
            fail(
                call,
                f"expected separate_bias to be a bool, got {describe(separate_bias)}.",
                TypeError,
            )
        curvature = output_curvature(
            call, loss_fn, output_hessian, required=False, loss_count=loss_count
        )
        if isinstance(curvature, PlainLoss) and fisher_type in ("type-2", "mc"):
            fail(
                call,
                f"fisher_type={fisher_type!r} needs the output Hessian of the loss, and none is "
                f"known for {type(loss_fn).__name__}. Use fisher_type='empirical' (any loss) or "
                "'forward-only', or pass output_hessian=fn returning the (N, D, D) per-sample "
                "blocks of the loss Hessian with respect to the output.",
                NotImplementedError,
            )
        self.fisher_type, self.kfac_approx, self.mc_samples = fisher_type, kfac_approx, mc_samples
        self._seed = stream_seed(generator)
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            progress=progress,
            check_deterministic=check_deterministic,
            curvature=curvature,
        )
        self._call = call
        pieces = {
            name: Piece(name, off, numel, tuple(shape))
            for name, off, numel, shape in zip(
                self.param_names, self.layout.offsets, self.layout.numels, self.layout.shapes
            )
        }
        self.blocks: list[LayerSpec] = find_blocks(
            call, model, pieces, separate_bias=separate_bias, kfac_approx=kfac_approx
        )
        self._modules = {b.module_name: b.module for b in self.blocks}
        self.tags = frozenset({SYMMETRIC, PSD})
        self._factors: dict[str, Factors] = {}
        self._eigens: dict[str, tuple[Eigen, Eigen]] = {}
        if self._build_in_init:
            self._build()

    def _name(self) -> str:
        return self._call

    # -- the factor pass -----------------------------------------------------------------
    def _build(self) -> None:
        """Compute the factors (and, for EKFAC, the corrections) over the data."""
        self._factors = self._compute_factors()

    def _output_factor(self, index: int, targets: Any) -> Callable | None:
        """``output -> S`` (``(N, D, K)``) of this Fisher type, or ``None`` (forward-only)."""
        curv = self.curvature
        if self.fisher_type == "type-2":
            return lambda out: curv.factor(out, targets)
        if self.fisher_type == "mc":
            gen = keyed_generator(self._seed, index, self.device)
            return lambda out: curv.sample(out, targets, gen, self.mc_samples)
        if self.fisher_type == "empirical":
            return lambda out: curv.gradient(out, targets).unsqueeze(2)
        return None

    def _capture(self, index: int, inputs: Any, targets: Any) -> dict:
        return capture(
            self._call,
            lambda x: self._forward(x, inputs),
            self._x,
            self._modules,
            self._output_factor(index, targets),
        )

    def _rows(self, block: LayerSpec, inp: torch.Tensor, grads: torch.Tensor | None):
        """``(A_sum, rows, g)`` of one batch: the sum of the ``rows`` input outer products
        after expand/reduce (for an embedding, expand only, the ``(q,)`` token counts:
        padding tokens are zero input rows, as for a linear layer on one-hot inputs),
        and the ``(K, N, R, p)`` gradient rows (``None`` without a backward pass)."""
        a = block.rows(inp, augment=False)
        g = None if grads is None else block.grad_rows(grads)
        if block.diagonal_input:
            idx = a.reshape(-1)
            keep = block.embedding_mask(idx)
            weights = None if keep is None else keep.to(self.dtype)
            counts = torch.bincount(idx, weights=weights, minlength=block.q).to(self.dtype)
            return counts, idx.numel(), g
        if self.kfac_approx == "reduce":
            a = a.mean(1, keepdim=True)
            g = None if g is None else g.sum(2, keepdim=True)
        rows = a.shape[0] * a.shape[1]
        return _augmented_gram(a, rows, block), rows, g

    def _compute_factors(self) -> dict[str, Factors]:
        blocks = self.blocks
        with_g = self.fisher_type != "forward-only"

        def per_batch(index: int, inputs: Any, targets: Any) -> torch.Tensor:
            captured = self._capture(index, inputs, targets)
            parts = []
            for b in blocks:
                A, rows, g = self._rows(b, *captured[b.module_name])
                parts += [A.reshape(-1), A.new_full((1,), float(rows))]
                if with_g:
                    parts.append(gram(g).reshape(-1))
            return torch.cat(parts)

        total = self._accumulate(per_batch)
        factors, start = {}, 0
        for b in blocks:
            qa = b.q if b.diagonal_input else b.q * b.q
            A = total[start : start + qa]
            rows = total[start + qa]
            start += qa + 1
            A = (A / rows).reshape(b.q) if b.diagonal_input else (A / rows).reshape(b.q, b.q)
            if with_g:
                G = total[start : start + b.p * b.p].reshape(b.p, b.p)
                start += b.p * b.p
            else:
                G = torch.eye(b.p, dtype=self.dtype, device=self.device)
            factors[b.name] = Factors(A, G)
        return factors

    # -- structure -------------------------------------------------------------------------
    @property
    def factors(self) -> dict[str, Factors]:
        """Block name (a module's name, or ``module.weight`` / ``module.bias`` with
        ``separate_bias``) -> its :class:`Factors` ``(A, G)`` (NOTE [kfac scaling])."""
        return dict(self._factors)

    def _eigen(self, block: LayerSpec) -> tuple[Eigen, Eigen]:
        """Eigenbases of the block's ``(G, A)``, computed once."""
        if block.name not in self._eigens:
            A, G = self._factors[block.name]
            self._eigens[block.name] = (Eigen.of(G), Eigen.of(A))
        return self._eigens[block.name]

    @abc.abstractmethod
    def _grid(self, block: LayerSpec) -> torch.Tensor:
        """The block's ``(p, q)`` eigenvalues in its Kronecker eigenbasis."""

    def _check_regular(self, call: str, name: str, values: torch.Tensor, damping: float) -> None:
        """Raise if ``values + damping`` is singular: no damping and ``values`` (the block's
        or a factor's eigenvalues, ``>= 0``) numerically rank-deficient.

        With ``damping > 0`` every damped eigenvalue is at least ``damping``: the inverse
        is what was asked for, however ill-conditioned.
        """
        if damping > 0:
            return
        # Numerical rank as in numpy.linalg.matrix_rank, per factor dimension: the grid's
        # eigenvalues are products of the factors' (each accurate to ~dim * eps * max).
        top = values.abs().max()
        tol = max(values.shape) * torch.finfo(values.dtype).eps * top
        if bool(top == 0) or bool(values.min() <= tol):
            fail(
                call,
                f"block {name} is singular (smallest eigenvalue {float(values.min()):.3g}, "
                f"largest {float(top):.3g}) at damping=0. Pass damping > 0.",
            )

    # -- queries -----------------------------------------------------------------------------
    def logdet(self, damping: float = 0.0) -> torch.Tensor:
        """``log det(K + damping I)``, exactly, from the blocks' eigenvalues.

        Cost: one eigendecomposition per factor (cached), ``O(sum p q)`` after that.

        Raises:
            ValueError: for a negative damping, or a singular block at this damping.
        """
        call = f"{self._title}.logdet(damping)"
        damping = check_damping(call, damping)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for b in self.blocks:
            values = self._grid(b)
            self._check_regular(call, repr(b.name), values, damping)
            total = total + (values + damping).log().sum()
        return total

    def trace(self) -> torch.Tensor:
        """``tr(K)``, exactly (the sum of the blocks' eigenvalues)."""
        return sum(
            (self._grid(b).sum() for b in self.blocks),
            torch.zeros((), dtype=self.dtype, device=self.device),
        )

    def diagonal(self) -> torch.Tensor:
        """``diag(K)`` as a flat ``(n,)`` vector in the parameters' order.

        Cost: ``O(p^2 q + p q^2)`` per block (the eigenbases are cached).
        """
        ones = torch.ones(self.shape[0], 1, dtype=self.dtype, device=self.device)
        return apply_blocks(ones, self.blocks, lambda b, P: self._block_diagonal(b)[None])[:, 0]

    def _block_diagonal(self, block: LayerSpec) -> torch.Tensor:
        eg, ea = self._eigen(block)
        return diagonal_of(eg, ea, self._grid(block))


def gram(x: torch.Tensor) -> torch.Tensor:
    """``sum_i x_i^T x_i`` over all leading indices of ``x`` (``(..., R, d)``): ``(d, d)``.

    Rows that are a transposed view (a convolution's unfolded patches or output
    gradients) are multiplied in place, batched over the leading indices, instead
    of being copied into one ``(rows, d)`` matrix.
    """
    d = x.shape[-1]
    if x.is_contiguous():
        flat = x.reshape(-1, d)
        return flat.T @ flat
    x = x.reshape(-1, *x.shape[-2:])
    return torch.matmul(x.transpose(1, 2), x).sum(0)


def _augmented_gram(a: torch.Tensor, rows: int, block: LayerSpec) -> torch.Tensor:
    """The sum of ``[a, 1] [a, 1]^T`` over the ``rows`` of ``a`` (``(N, R, q0)``), the
    ``1`` present if the block holds the bias and ``a`` if it holds the weight."""
    if block.weight is None:
        return a.new_full((1, 1), float(rows))
    S = gram(a)
    if block.bias is None:
        return S
    s = a.sum((0, 1))
    top = torch.cat([S, s.unsqueeze(1)], dim=1)
    bottom = torch.cat([s, s.new_full((1,), float(rows))]).unsqueeze(0)
    return torch.cat([top, bottom], dim=0)
