"""KFAC: Kronecker-factored approximate curvature of a model over a dataset."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hesse._validation import fail
from hesse.kfac._inverse import KroneckerInverse
from hesse.kfac._kron import grid_function, kron_apply
from hesse.kfac._kronecker import KroneckerOperator
from hesse.kfac._layers import LayerSpec, apply_blocks
from hesse.operators._model import Batch
from hesse.solvers._solve import check_damping


class KFACOperator(KroneckerOperator):
    """Kronecker-factored approximate curvature (KFAC) of a model's loss over a dataset.

    Per supported layer (``nn.Linear`` with any leading dimensions,
    ``nn.Conv1d/2d/3d``, ``nn.Embedding``) the curvature block of its parameters
    ``P`` (weight and bias as one matrix ``[W | b]``) is approximated by a Kronecker
    product, and blocks of different layers are zero:

    .. math:: K = \\operatorname{blockdiag}_\\ell\\, G_\\ell \\otimes A_\\ell, \\qquad
        A = \\frac{1}{NR} \\sum_{n,r} a_{nr} a_{nr}^\\top, \\quad
        G = \\frac{1}{M} \\sum_{n,r,k} g_{nrk} g_{nrk}^\\top

    on the row-major flattening of ``P``: ``a`` are the layer's input rows (with a
    ``1`` appended for the bias; unfolded patches for convolutions), ``g`` the
    gradients at its output of the columns of the loss's output factor, ``M`` the
    number of terms the dataset-mean loss averages (NOTE [kfac scaling]). So ``K``
    approximates :class:`hesse.GGNOperator` (``fisher_type="type-2"``: exact for
    one linear layer and one sample) or :class:`hesse.FisherOperator`, with the
    same loss scaling; ``kfac_approx`` chooses how shared positions (sequence
    positions, pixels) enter (Eschenhagen et al. 2023). The factors are computed
    once, at construction; the operator is symmetric PSD and supports ``@``
    (vectors, matrices, parameter dicts), ``to_dense()``, and:

    * :meth:`inverse` ``(damping)``: an operator, block by block;
    * :meth:`logdet` ``(damping)`` = ``log det(K + damping I)``, :meth:`trace`,
      :meth:`diagonal`, all exact for ``K``;
    * :attr:`factors`: block name -> ``(A, G)``.

    Args:
        model, loss_fn, data, params, loss_count, progress, check_deterministic: as in
            :class:`hesse.GGNOperator` (the same data handling and parameter subsets).
            Every selected parameter must belong to a supported layer.
        fisher_type: ``"type-2"`` (the GGN: ``g`` from the columns of the loss
            Hessian's square root, ``C`` columns per loss term), ``"mc"`` (sampled
            labels, ``mc_samples`` per loss term, from ``generator``), ``"empirical"``
            (the gradients at the true targets), or ``"forward-only"`` (``G = I``).
        kfac_approx: ``"expand"`` (every shared position an example) or ``"reduce"``
            (positions averaged (inputs) and summed (gradients) per sample first);
            equal for layers without shared positions.
        mc_samples: labels drawn per loss term for ``fisher_type="mc"``.
        generator: the ``torch.Generator`` the MC seed is drawn from (default: seeded
            with 0); labels are drawn per batch from a stream keyed by the batch's
            position (as in :class:`hesse.FisherOperator`).
        separate_bias: give each bias its own block ``G ⊗ [1]`` instead of an
            augmented input column.
        output_hessian: as in :class:`hesse.GGNOperator`, for a loss without a
            closed-form output Hessian.

    Raises:
        NotImplementedError: a selected parameter outside a supported layer (the
            message names the module and how to leave it out), tied weights, a
            layer option KFAC does not model (grouped convolutions, ``padding_mode``
            other than zeros, embeddings with ``max_norm``), a model without
            supported layers, or ``"type-2"``/``"mc"`` for a loss with no known output
            Hessian.
        TypeError, ValueError: as in :class:`hesse.GGNOperator`, and for bad options.

    Cost: one pass over the data: per batch one forward pass with hooks and one
    backward pass to the layer outputs batched over the factor's columns (``C``
    for type-2, ``mc_samples`` for MC, one otherwise; none for forward-only), plus
    ``O(N R (p^2 + q^2))`` for the factors. A product costs ``O(p q (p + q))`` per
    block; memory ``O(p^2 + q^2)`` per block.

    References:
        Martens & Grosse (2015), Optimizing neural networks with Kronecker-factored
        approximate curvature, ICML. Grosse & Martens (2016), A Kronecker-factored
        approximate Fisher matrix for convolution layers, ICML. Eschenhagen, Immer,
        Turner, Schneider & Hennig (2023), Kronecker-factored approximate curvature
        for modern neural network architectures, NeurIPS.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))]
        >>> K = KFACOperator(model, torch.nn.CrossEntropyLoss(), data)
        >>> sorted(K.factors), K.factors["0"].A.shape, K.factors["0"].G.shape
        (['0', '2'], torch.Size([4, 4]), torch.Size([4, 4]))
    """

    _title = "KFACOperator"

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

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        f = self._factors
        return apply_blocks(X, self.blocks, lambda b, P: kron_apply(P, f[b.name].G, f[b.name].A))

    def _grid(self, block: LayerSpec) -> torch.Tensor:
        eg, ea = self._eigen(block)
        return torch.outer(eg.values, ea.values)

    def trace(self) -> torch.Tensor:
        """``tr(K) = sum tr(G) tr(A)`` over blocks."""
        return sum(
            (_trace(f.G) * _trace(f.A) for f in self._factors.values()),
            torch.zeros((), dtype=self.dtype, device=self.device),
        )

    def _block_diagonal(self, block: LayerSpec) -> torch.Tensor:
        A, G = self._factors[block.name]
        return torch.outer(G.diagonal(), A if A.dim() == 1 else A.diagonal())

    def inverse(
        self,
        damping: float,
        *,
        heuristic_damping: bool = False,
        exact_damping: bool = False,
    ) -> KroneckerInverse:
        """The inverse of the damped operator, block by block, as an operator.

        .. math::
            \\text{default:}\\; (G + \\lambda I)^{-1} \\otimes (A + \\lambda I)^{-1}, \\qquad
            \\text{exact:}\\; (G \\otimes A + \\lambda I)^{-1}, \\qquad
            \\text{heuristic:}\\; (G + \\tfrac{\\sqrt\\lambda}{\\pi} I)^{-1} \\otimes
            (A + \\pi \\sqrt\\lambda I)^{-1}

        with ``π = sqrt((tr A / q) / (tr G / p))`` (Martens & Grosse 2015, Sec. 6.3).
        ``exact_damping`` inverts ``K + damping I`` exactly through the factors'
        eigenbases (so ``K.inverse(d, exact_damping=True) @ (K @ v + d v) == v``).

        Args:
            damping: ``λ >= 0``.
            heuristic_damping: π-damping of the factors.
            exact_damping: the exact inverse of ``K + λ I``.

        Returns:
            A symmetric positive-definite operator with the same parameter layout.

        Raises:
            ValueError: a negative damping, both options at once, or a block that is
                singular at this damping (``damping=0`` with rank-deficient factors).

        Cost: one eigendecomposition per factor (cached on the operator); a product
        costs ``O(p q (p + q))`` per block.

        References:
            Martens & Grosse (2015), ICML, Sec. 6.3 (factored Tikhonov damping).
            Grosse et al. (2023), Studying large language model generalization with
            influence functions (exact damping in the eigenbasis, Eq. 21).
        """
        call = f"{self._title}.inverse(damping)"
        damping = check_damping(call, damping)
        if heuristic_damping and exact_damping:
            fail(
                call,
                "heuristic_damping and exact_damping exclude each other. Choose one (or neither).",
            )
        fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        for b in self.blocks:
            eg, ea = self._eigen(b)
            if exact_damping:
                values = torch.outer(eg.values, ea.values)
                self._check_regular(call, repr(b.name), values, damping)
                fns[b.name] = grid_function(eg, ea, 1 / (values + damping))
                continue
            dg, da = damping, damping
            if heuristic_damping:
                pi = _pi(eg.values, ea.values)
                dg, da = math.sqrt(damping) / pi, math.sqrt(damping) * pi
            self._check_regular(call, f"{b.name!r} (G)", eg.values, dg)
            self._check_regular(call, f"{b.name!r} (A)", ea.values, da)
            fns[b.name] = grid_function(
                eg, ea, torch.outer(1 / (eg.values + dg), 1 / (ea.values + da))
            )
        return KroneckerInverse(f"{self._title}.inverse({damping})", self, self.blocks, fns)


def _trace(F: torch.Tensor) -> torch.Tensor:
    return F.sum() if F.dim() == 1 else F.diagonal().sum()


def _pi(g: torch.Tensor, a: torch.Tensor) -> float:
    """Martens & Grosse's π: the ratio of the factors' mean eigenvalues, square-rooted."""
    ga, aa = float(g.mean()), float(a.mean())
    if ga <= 0 or aa <= 0:
        return 1.0
    return math.sqrt(aa / ga)
