"""laplace-torch curvature backends built on hesse's operators.

# NOTE [laplace conventions]
laplace-torch asks its backend, batch by batch, for the curvature of the *summed*
batch loss scaled by ``factor`` (``lossfunc`` is ``MSELoss(reduction="sum")`` with
``factor = 1/2`` for regression, so that ``factor * lossfunc`` is the Gaussian
negative log-likelihood with unit noise, and ``CrossEntropyLoss(reduction="sum")``
with ``factor = 1`` for classification), and adds the batches up:

* ``full(x, y) -> (loss, H)``: ``loss = factor * lossfunc(f(x), y)`` and the
  ``P x P`` curvature of that loss with respect to the Laplace parameters;
* ``diag(x, y) -> (loss, d)``: its diagonal;
* ``kron(x, y, N) -> (loss, Kron)``: per layer the factors ``[G, A]`` of
  ``G ⊗ A`` (output-side ``G`` summed over the batch, input-side ``A`` averaged
  over the *whole dataset*, i.e. divided by ``N``, so that adding the batches'
  factors gives ``sum_b G_b ⊗ (1/N) sum_n a_n a_n^T``), and ``[G]`` for a bias.

The parameters are every trainable parameter of the model, those of
``model.last_layer`` for last-layer Laplace (the curvature is then that of the
last layer applied to the features, computed once per batch), or the entries
``subnetwork_indices`` of the flattened parameter vector for subnetwork Laplace.
Here each call builds a hesse operator on the one batch ``[(x, y)]`` with the
same summed loss (the layer plan of the exact diagonal and the Gram, a property of
the module, is carried over from the previous batch), so hesse's normalisation rule (NOTE [aggregation]) gives
exactly the sum; ``full`` is the operator's dense matrix (for GGN/Fisher the Gram
product of per-sample VJPs, NOTE [factor Gram] in ``operators/_squares.py``, restricted
to the selected indices for a subnetwork; for the Hessian ``P`` products, or one per
selected index), ``diag`` hesse's exact diagonal (:func:`hesse.diagonal`,
``method="exact"``: per-sample VJPs for GGN/Fisher, curvature backpropagation for
the Hessian) and ``kron`` hesse's KFAC factors.

Jacobians and per-sample gradients (used by the predictive and by the empirical
Fisher's ``gradients``) are laplace-torch's own ``torch.func`` implementations,
inherited from its interface classes.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
from torch import nn

import hesse
from hesse._validation import check_generator, fail
from hesse.operators._base import LinearOperator


class _HesseCurvature:
    """``full``/``diag``/``kron`` from a hesse operator on one batch (NOTE [laplace conventions])."""

    _title = "HesseCurvature"
    _generator: torch.Generator | None = None

    # -- the batch ------------------------------------------------------------------
    def _call(self, method: str) -> str:
        return f"hesse.integrations.laplace.{self._title}.{method}(x, y)"

    def _problem(self, call: str, x: Any, y: torch.Tensor) -> tuple[nn.Module, list, list[str]]:
        """The module, the one-batch data and the parameter names the curvature is of.

        Also records the batch loss ``factor * lossfunc`` (from the same forward pass
        for last-layer Laplace) in ``self._batch_loss``.
        """
        if isinstance(x, MutableMapping):
            fail(
                call,
                "dict-like (Hugging Face) inputs are not supported by the hesse backends. "
                "Use laplace's CurvlinopsGGN / AsdlGGN backends for such models.",
                NotImplementedError,
            )
        with torch.no_grad():
            if self.last_layer:
                out, features = self.model.forward_with_features(x)
                module = self.model.last_layer
                data = [(features.detach(), y)]
            else:
                out = self.model(x)
                module, data = self.model, [(x, y)]
            self._batch_loss = self.factor * self.lossfunc(out, y)
        names = [k for k, p in module.named_parameters() if p.requires_grad]
        return module, data, names

    def _operator(self, call: str, module: nn.Module, data: list, names: list[str]):
        raise NotImplementedError

    def _hesse_operator(self, call: str, module: nn.Module, data: list, names: list[str]):
        """``_operator``, with the layer plan of the previous batch's operator carried over.

        The exact diagonal and the dense GGN / Fisher decide per operator, on its
        first batch, which layers take the closed-form rules and whether output rows
        are independent samples (NOTE [linear fast path], NOTE [coupled rows]): a
        property of the module and its modes, not of the batch, so one decision
        serves every batch laplace passes.
        """
        op = self._operator(call, module, data, names)
        key = (id(module), tuple(names), tuple(m.training for m in module.modules()))
        plan = getattr(self, "_plans", {}).get(key)
        if plan is not None and hasattr(op, "_linear_plan"):
            op._linear_plan, op._rows_per_sample = plan
        return op

    def _keep_plan(self, op: LinearOperator, module: nn.Module, names: list[str]) -> None:
        if getattr(op, "_linear_plan", None) is None or op._rows_per_sample is None:
            return
        key = (id(module), tuple(names), tuple(m.training for m in module.modules()))
        self._plans = {key: (op._linear_plan, op._rows_per_sample)}

    # -- the curvature interface ----------------------------------------------------
    def full(self, x: Any, y: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, H)``: the dense ``P x P`` curvature of ``factor * lossfunc`` on the batch.

        Cost: GGN / Fisher: ``N * K`` batched per-sample VJPs and one Gram product
        (NOTE [factor Gram]); Hessian: ``P`` operator products (one per selected
        index for a subnetwork), vectorised in chunks.
        """
        call = self._call("full")
        module, data, names = self._problem(call, x, y)
        op = self._hesse_operator(call, module, data, names)
        if self.subnetwork_indices is None:
            H = op.to_dense()
        elif hasattr(op, "_dense_block"):  # GGN / Fisher: NOTE [factor Gram]
            H = op._dense_block(self.subnetwork_indices.to(op.device))
        else:
            idx = self.subnetwork_indices.to(op.device)
            E = torch.zeros(op.shape[1], len(idx), dtype=op.dtype, device=op.device)
            E[idx, torch.arange(len(idx), device=op.device)] = 1
            H = (op @ E)[idx]
        self._keep_plan(op, module, names)
        return self._batch_loss, self.factor * H.detach()

    def diag(self, x: Any, y: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, d)``: the exact diagonal of the curvature (see NOTE [laplace conventions]).

        Cost: one data pass of :func:`hesse.diagonal` with ``method="exact"``.
        """
        call = self._call("diag")
        module, data, names = self._problem(call, x, y)
        op = self._hesse_operator(call, module, data, names)
        d = hesse.diagonal(op, method="exact")
        self._keep_plan(op, module, names)
        if self.subnetwork_indices is not None:
            d = d[self.subnetwork_indices.to(d.device)]
        return self._batch_loss, self.factor * d.detach()

    _fisher_type = "type-2"

    def kron(self, x: Any, y: torch.Tensor, N: int, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """``(loss, Kron)``: hesse's KFAC factors in laplace's layout (NOTE [laplace conventions]).

        Cost: one :class:`hesse.KFACOperator` factor pass over the batch.
        """
        from laplace.utils import Kron

        call = self._call("kron")
        module, data, names = self._problem(call, x, y)
        if self.subnetwork_indices is not None:
            fail(
                call,
                "Kronecker factors of a subnetwork are not defined. Use hessian_structure='full' "
                "(laplace's SubnetLaplace does).",
                NotImplementedError,
            )
        K = hesse.KFACOperator(
            module,
            self.lossfunc,
            data,
            params=names,
            fisher_type=self._fisher_type,
            separate_bias=True,
            **self._kfac_options(),
        )
        # laplace's Kron holds one entry per parameter, in the model's parameter order.
        blocks = sorted(K.blocks, key=lambda b: (b.weight or b.bias).offset)
        factors = K.factors
        kfacs = []
        for block in blocks:
            if isinstance(block.module, nn.Embedding):
                fail(
                    call,
                    f"the embedding {block.module_name!r} has a diagonal input factor, which "
                    "laplace's Kron layout does not take. Use hessian_structure='diag'.",
                    NotImplementedError,
                )
            A, G = factors[block.name]
            # The input factor averages over the batch; laplace sums batches, so 1/N overall.
            kfacs.append([G, A * (len(y) / N)] if block.weight is not None else [G])
        return self._batch_loss, Kron(kfacs) * self.factor

    def _kfac_options(self) -> dict:
        return {}


class HesseGGN(_HesseCurvature, GGNInterface):
    """The generalised Gauss-Newton matrix (``stochastic=True``: the Monte-Carlo Fisher).

    A laplace-torch backend: ``Laplace(model, likelihood, hessian_structure=...,
    backend=HesseGGN)``, with ``subset_of_weights`` ``"all"``, ``"last_layer"`` or
    ``"subnetwork"`` and ``hessian_structure`` ``"full"``, ``"diag"`` or ``"kron"``.
    The GGN ``sum_n J_n^T (factor * d^2 l_n / df^2) J_n`` comes from
    :class:`hesse.GGNOperator` (closed-form output Hessians, so exact), its diagonal
    exactly (per-sample VJPs), and ``kron`` from hesse's KFAC ("type-2" factors; MC
    ones with ``stochastic=True``). See NOTE [laplace conventions].

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y:
            as laplace-torch passes them.
        stochastic: the Monte-Carlo Fisher (:class:`hesse.FisherOperator` with
            ``kind="mc"``) instead of the GGN.
        num_samples: labels sampled per data point when ``stochastic``.
        generator: the ``torch.Generator`` the MC labels come from (pass it through
            ``backend_kwargs``); default a fresh one seeded with 0.

    Raises:
        NotImplementedError: dict-like inputs.
        TypeError: a generator that is not a ``torch.Generator``.
    """

    _title = "HesseGGN"

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        check_generator("hesse.integrations.laplace.HesseGGN(model, likelihood)", generator)
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            stochastic,
            num_samples,
        )
        self._generator = generator if generator is not None else torch.Generator().manual_seed(0)

    @property
    def _fisher_type(self) -> str:  # type: ignore[override]
        return "mc" if self.stochastic else "type-2"

    def _kfac_options(self) -> dict:
        if not self.stochastic:
            return {}
        return {"mc_samples": self.num_samples, "generator": self._generator}

    def _operator(self, call, module, data, names) -> LinearOperator:
        if self.stochastic:
            return hesse.FisherOperator(
                module,
                self.lossfunc,
                data,
                params=names,
                kind="mc",
                mc_samples=self.num_samples,
                generator=self._generator,
            )
        return hesse.GGNOperator(module, self.lossfunc, data, params=names)


class HesseEF(_HesseCurvature, EFInterface):
    """The empirical Fisher ``factor * sum_n g_n g_n^T`` (``g_n`` the gradient of ``lossfunc``).

    A laplace-torch backend like :class:`HesseGGN` (``full``, ``diag``; ``kron``
    from hesse's empirical KFAC), built on :class:`hesse.FisherOperator` with
    ``kind="empirical"``. laplace-torch's convention is kept: the per-sample
    gradients are those of ``lossfunc`` (for regression ``2 (f - y)``), and the
    sum of their squares is multiplied by ``factor`` once.
    """

    _title = "HesseEF"
    _fisher_type = "empirical"

    def _operator(self, call, module, data, names) -> LinearOperator:
        return hesse.FisherOperator(module, self.lossfunc, data, params=names, kind="empirical")


class HesseHessian(_HesseCurvature, CurvatureInterface):
    """The exact Hessian of ``factor * lossfunc`` (``full`` and ``diag``).

    No laplace-torch backend gives the exact Hessian diagonal; this one computes
    it by curvature backpropagation (:func:`hesse.diagonal` on a
    :class:`hesse.HessianOperator`), and ``full`` as the dense Hessian (``P``
    batched double-backward products). Away from a minimum the Hessian can be
    indefinite, and so can the posterior precision: check it, or raise the prior
    precision. ``kron`` is not defined for the Hessian.

    Raises:
        NotImplementedError: ``hessian_structure="kron"`` (use :class:`HesseGGN`),
            dict-like inputs.
    """

    _title = "HesseHessian"

    def _operator(self, call, module, data, names) -> LinearOperator:
        return hesse.HessianOperator(module, self.lossfunc, data, params=names)

    def kron(self, x: Any, y: torch.Tensor, N: int, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        fail(
            self._call("kron"),
            "the exact Hessian has no Kronecker factorisation. Use hessian_structure='full' "
            "or 'diag' with HesseHessian, or backend=HesseGGN for 'kron'.",
            NotImplementedError,
        )
