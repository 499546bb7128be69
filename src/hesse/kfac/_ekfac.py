"""EKFAC: KFAC's Kronecker eigenbasis with eigenvalues re-fitted to per-example gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hesse._validation import fail
from hesse.kfac._inverse import KroneckerInverse
from hesse.kfac._kron import grid_apply, grid_function, sample_squares, sample_squares_onehot
from hesse.kfac._kronecker import KroneckerOperator
from hesse.kfac._layers import LayerSpec, apply_blocks
from hesse.operators._model import Batch
from hesse.solvers._solve import check_damping


class EKFACOperator(KroneckerOperator):
    """Eigenvalue-corrected KFAC (EKFAC) of a model's loss over a dataset.

    KFAC's blocks ``G ⊗ A`` have the eigenbasis ``Q_G ⊗ Q_A``; EKFAC keeps that
    basis and replaces the eigenvalues ``g_i a_j`` by the second moments of the
    per-sample gradients in it:

    .. math:: K = \\operatorname{blockdiag}_\\ell\\,(Q_G \\otimes Q_A)
        \\operatorname{diag}(\\Lambda) (Q_G \\otimes Q_A)^\\top, \\qquad
        \\Lambda = \\frac{1}{M} \\sum_{n,k} (Q_G^\\top D_{nk} Q_A)^{\\circ 2}, \\quad
        D_{nk} = \\sum_r g_{nrk} a_{nr}^\\top

    with ``D_nk`` sample ``n``'s gradient of the block's parameter matrix for the
    loss factor's column ``k`` (``g``, ``a``, ``M`` as in
    :class:`hesse.KFACOperator`; a sample is an entry of the layer input's leading
    dimension, e.g. a sequence). ``Λ`` is the diagonal, in the Kronecker
    eigenbasis, of the curvature that KFAC approximates (the sum of the samples'
    gradient outer products), so EKFAC is at least as close to it as KFAC in
    Frobenius norm. ``kfac_approx`` only chooses the eigenbasis. Where every
    ``D_nk`` has rank one and there is one sample (no shared positions), ``Λ`` is
    the Kronecker product of the factors' eigenvalues and EKFAC equals KFAC.

    Args:
        model, loss_fn, data, fisher_type, kfac_approx, params, mc_samples,
            generator, separate_bias, output_hessian, progress,
            check_deterministic: as in :class:`hesse.KFACOperator`
            (``fisher_type="forward-only"`` is refused: it has no gradients to
            correct with).

    Attributes:
        factors: as in :class:`hesse.KFACOperator`.
        corrections: block name -> its ``(p, q)`` corrected eigenvalues ``Λ``.

    Raises:
        As :class:`hesse.KFACOperator`.

    Cost: two passes over the data (the factors, then the corrections with the
    same sampled labels), each one forward and one batched backward pass per
    batch; eigendecompositions of the factors between them; the corrections cost
    ``O(K N R (p^2 + q^2))`` per block and batch, plus ``O(K N R p q)`` with shared
    positions (``R > 1``: the rotated per-sample gradients are formed in chunks). A product costs
    ``O(p q (p + q))`` per block, the inverse the same.

    References:
        George, Laurent, Bouthillier, Ballas & Vincent (2018), Fast approximate
        natural gradient descent in a Kronecker-factored eigenbasis, NeurIPS.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))]
        >>> E = EKFACOperator(model, torch.nn.CrossEntropyLoss(), data)
        >>> E.corrections["2"].shape
        torch.Size([2, 5])
    """

    _title = "EKFACOperator"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable[Batch],
        *,
        fisher_type: str = "type-2",
        kfac_approx: str = "expand",
        params: Any = None,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        separate_bias: bool = False,
        output_hessian: Callable | None = None,
        loss_count: Callable | None = None,
        progress: bool = False,
        check_deterministic: bool = False,
    ) -> None:
        if fisher_type == "forward-only":
            fail(
                f"hesse.{self._title}(model, loss_fn, data)",
                "fisher_type='forward-only' has no gradients to correct the eigenvalues with. "
                "Use hesse.KFACOperator(..., fisher_type='forward-only'), or another fisher_type.",
            )
        self.corrections: dict[str, torch.Tensor] = {}
        super().__init__(
            model,
            loss_fn,
            data,
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
            params=params,
            mc_samples=mc_samples,
            generator=generator,
            separate_bias=separate_bias,
            output_hessian=output_hessian,
            loss_count=loss_count,
            progress=progress,
            check_deterministic=check_deterministic,
        )

    def _build(self) -> None:
        super()._build()
        self.corrections = self._compute_corrections()

    def _compute_corrections(self) -> dict[str, torch.Tensor]:
        blocks = self.blocks
        eigens = {b.name: self._eigen(b) for b in blocks}

        def per_batch(index: int, inputs: Any, targets: Any) -> torch.Tensor:
            captured = self._capture(index, inputs, targets)
            parts = []
            for b in blocks:
                inp, grads = captured[b.module_name]
                a, g = b.rows(inp), b.grad_rows(grads)
                eg, ea = eigens[b.name]
                if b.diagonal_input:
                    sq = sample_squares_onehot(g, a, b.embedding_mask(a), eg, b.q)
                else:
                    sq = sample_squares(g, a, eg, ea)
                parts.append(sq.reshape(-1))
            return torch.cat(parts)

        total = self._accumulate(per_batch)
        out, start = {}, 0
        for b in blocks:
            out[b.name] = total[start : start + b.p * b.q].reshape(b.p, b.q)
            start += b.p * b.q
        return out

    def _grid(self, block: LayerSpec) -> torch.Tensor:
        return self.corrections[block.name]

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return apply_blocks(
            X, self.blocks, lambda b, P: grid_apply(P, *self._eigen(b), self._grid(b))
        )

    def inverse(self, damping: float) -> KroneckerInverse:
        """``(K + damping I)^{-1}``, exactly, as an operator.

        Raises:
            ValueError: a negative damping, or a singular block at this damping.

        Cost: ``O(p q (p + q))`` per block and product (the eigenbases exist).
        """
        call = f"{self._title}.inverse(damping)"
        damping = check_damping(call, damping)
        fns = {}
        for b in self.blocks:
            values = self._grid(b)
            self._check_regular(call, repr(b.name), values, damping)
            fns[b.name] = grid_function(*self._eigen(b), 1 / (values + damping))
        return KroneckerInverse(f"{self._title}.inverse({damping})", self, self.blocks, fns)
