"""Output curvature of losses: per-sample Hessians, their factors, and Fisher samples.

# NOTE [loss conventions]
A batch loss ``L_b = loss_fn(output, target)`` is handled in its *sum form*
``M_b * L_b`` for ``reduction="mean"`` (and ``L_b`` itself for ``"sum"``), where
``M_b`` is the number of terms the mean divides by (``count``, defined once in
NOTE [loss normalisation] in ``_normalization.py``). The sum form is a sum of per-sample losses
``l_n(f_n)`` of the flattened per-sample outputs ``f_n`` (``D`` entries), so its
output Hessian is block diagonal with ``D x D`` blocks ``H_n``. Every curvature
returned here is of the sum form; the model operators divide by the total count
over the dataset at the end, so that a short last batch is weighted exactly
(see NOTE [aggregation] in ``_model.py``).

For the exponential-family losses below, ``H_n`` does not depend on the target
(except BCE on probabilities) and equals the Fisher information of the model's
predictive distribution, so sampled output gradients ``s`` with
``E[s s^T] = H_n`` give the Monte-Carlo Fisher.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hesse._validation import describe, fail
from hesse.operators._normalization import Normalization, class_weights

KNOWN_LOSSES = "nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.BCELoss"


class OutputCurvature(abc.ABC):
    """The sum-form output curvature of one loss (see NOTE [loss conventions]).

    ``output`` is the model output of one batch (``(N, ...)``); per-sample
    quantities are on the flattened output ``(N, D)``.
    """

    def __init__(self, loss_fn: Callable, normalization: Normalization) -> None:
        self.loss_fn = loss_fn
        self.normalization = normalization
        self.reduction = normalization.reduction

    def count(self, target: Any, batch_size: int) -> float:
        """``M_b``: the number of terms a mean-reduced batch loss divides by (NOTE [loss
        normalisation] in ``_normalization.py``)."""
        return self.normalization.count(target, batch_size)

    def check(self, call: str, output: torch.Tensor, target: torch.Tensor) -> None:  # noqa: B027
        """Validate one batch's output and target (first batch only); accepts all by default."""

    def sum_form(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(output, target)
        return loss * self.count(target, output.shape[0]) if self.reduction == "mean" else loss

    @abc.abstractmethod
    def hessian_vector(
        self, output: torch.Tensor, target: torch.Tensor, V: torch.Tensor
    ) -> torch.Tensor:
        """``H_n V_n`` for ``V`` of shape ``(N, D)``."""

    @abc.abstractmethod
    def factor(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``S`` of shape ``(N, D, K)`` with ``H_n = S_n S_n^T``."""

    def sample(
        self, output: torch.Tensor, target: torch.Tensor, generator: torch.Generator, m: int
    ) -> torch.Tensor:
        """``(N, D, m)`` sampled output gradients scaled by ``1/sqrt(m)``: ``E[S S^T] = H_n``.

        The default draws Gaussian vectors ``S_n z`` (``z ~ N(0, I)``); losses with a
        predictive distribution override it with sampled labels.
        """
        S = self.factor(output, target)
        z = torch.randn(
            S.shape[0], S.shape[2], m, generator=generator, dtype=S.dtype, device=S.device
        )
        return S @ z / math.sqrt(m)

    def gradient(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample output gradients ``(N, D)`` of the sum form (for the empirical Fisher)."""
        out = output.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.sum_form(out, target), out)
        return g.reshape(output.shape[0], -1)


def _flat(output: torch.Tensor) -> torch.Tensor:
    return output.detach().reshape(output.shape[0], -1)


class MSECurvature(OutputCurvature):
    """``l_n = sum_d (f_nd - y_nd)^2``: ``H_n = 2 I``; Fisher samples ``sqrt(2) z``."""

    def sum_form(self, output, target):
        # Written out rather than loss_fn(...) * count: the same function, and torch
        # 2.13's mse_loss(reduction="mean") fails under jvp(grad(...)).
        return (output - target).square().sum()

    def hessian_vector(self, output, target, V):
        return 2 * V

    def factor(self, output, target):
        f = _flat(output)
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
        return math.sqrt(2) * eye.expand(f.shape[0], -1, -1)

    def sample(self, output, target, generator, m):
        f = _flat(output)
        z = torch.randn(*f.shape, m, generator=generator, dtype=f.dtype, device=f.device)
        return z * math.sqrt(2.0 / m)


class CrossEntropyCurvature(OutputCurvature):
    """Cross-entropy on logits with classes in dimension 1 (``(N, C)`` or ``(N, C, d1, ...)``).

    At every position ``q`` the sum-form term is ``-sum_c w_c y'_c log softmax(f)_c``
    with ``y'`` the (label-smoothed) target distribution, so its Hessian is
    ``c_q (diag(p_q) - p_q p_q^T)`` with ``c_q = sum_c w_c y'_c`` (for a class
    index ``y``: ``(1 - eps) w_y + eps * mean(w)``; 0 where ``y == ignore_index``):
    weights and label smoothing scale the softmax Hessian, they do not change its
    form. Positions do not interact, so ``H_n`` is block diagonal over them.
    """

    def check(self, call, output, target):
        if not target.is_floating_point() and target.dtype != torch.long:
            fail(
                call,
                f"CrossEntropyLoss needs class-index targets of dtype torch.long, got "
                f"{describe(target)}.",
            )

    def sum_form(self, output, target):
        fn = self.loss_fn
        return nn.functional.cross_entropy(
            output,
            target,
            weight=fn.weight,
            ignore_index=fn.ignore_index,
            label_smoothing=fn.label_smoothing,
            reduction="sum",
        )

    def _p(self, output):
        """Probabilities ``(N, C, P)`` (``P`` positions per sample)."""
        f = output.detach()
        return torch.softmax(f.reshape(f.shape[0], f.shape[1], -1), dim=1)

    def _scale(self, p, target):
        """``c`` of shape ``(N, 1, P)``: the weight of each position's softmax Hessian."""
        fn, (N, C, P) = self.loss_fn, p.shape
        eps = fn.label_smoothing
        w = fn.weight
        if target.is_floating_point():
            y = target.detach().reshape(N, C, P).to(p.dtype)
            y = (1 - eps) * y + eps / C
            return (y if w is None else y * w.to(p.dtype).reshape(1, C, 1)).sum(1, keepdim=True)
        t = target.reshape(N, P)
        c = class_weights(fn, t).to(p.dtype) * (1 - eps)
        if eps:
            mean_w = 1.0 if w is None else w.to(p.dtype).mean()
            c = c + (t != fn.ignore_index).to(p.dtype) * eps * mean_w
        return c.unsqueeze(1)

    def hessian_vector(self, output, target, V):
        p = self._p(output)
        Vr = V.reshape(p.shape)
        hv = p * Vr - p * (p * Vr).sum(1, keepdim=True)
        return (self._scale(p, target) * hv).reshape(V.shape)

    def factor(self, output, target):
        p = self._p(output)
        sq = p.sqrt()
        c = self._scale(p, target).sqrt()  # (N, 1, P)
        N, C, P = p.shape
        # (N, P, C, C) per-position factors diag(sqrt p) - p sqrt(p)^T, times sqrt(c).
        pt, sqt = p.transpose(1, 2), sq.transpose(1, 2)
        blocks = (torch.diag_embed(sqt) - pt.unsqueeze(3) * sqt.unsqueeze(2)) * c.transpose(
            1, 2
        ).unsqueeze(3)
        if P == 1:
            return blocks[:, 0]
        S = p.new_zeros(N, C, P, C, P)
        torch.diagonal(S, dim1=2, dim2=4).copy_(blocks.permute(0, 2, 3, 1))
        return S.reshape(N, C * P, C * P)

    def sample(self, output, target, generator, m):
        p = self._p(output)
        N, C, P = p.shape
        rows = p.transpose(1, 2).reshape(N * P, C)
        labels = torch.multinomial(rows, m, replacement=True, generator=generator)
        onehot = torch.zeros(N * P, C, m, dtype=p.dtype, device=p.device)
        onehot.scatter_(1, labels.unsqueeze(1), 1.0)
        onehot = onehot.reshape(N, P, C, m).permute(0, 2, 1, 3)  # (N, C, P, m)
        s = (p.unsqueeze(3) - onehot) * self._scale(p, target).sqrt().unsqueeze(3)
        return s.reshape(N, C * P, m) / math.sqrt(m)


def _elementwise_weight(weight: torch.Tensor | None, output: torch.Tensor) -> torch.Tensor | float:
    """A BCE ``weight`` broadcast to the flattened output ``(N, D)``, or 1."""
    if weight is None:
        return 1.0
    return torch.broadcast_to(weight.detach().to(output.dtype), output.shape).reshape(
        output.shape[0], -1
    )


class BCEWithLogitsCurvature(OutputCurvature):
    """``H_n = diag(w sigma(f)(1 - sigma(f)) (pw y + 1 - y))`` (``w`` weight, ``pw`` pos_weight).

    Without ``pos_weight`` the Hessian does not depend on the target and Fisher
    samples are ``sqrt(w) (sigma(f) - y)``, ``y ~ Bernoulli(sigma(f))``; with it,
    the Gaussian samples of :meth:`OutputCurvature.sample`.
    """

    def sum_form(self, output, target):
        fn = self.loss_fn
        return nn.functional.binary_cross_entropy_with_logits(
            output, target, weight=fn.weight, pos_weight=fn.pos_weight, reduction="sum"
        )

    def _p(self, output):
        return torch.sigmoid(_flat(output))

    def _h(self, output, target):
        p = self._p(output)
        h = p * (1 - p) * _elementwise_weight(self.loss_fn.weight, output)
        pw = self.loss_fn.pos_weight
        if pw is not None:
            y = target.detach().reshape(p.shape).to(p.dtype)
            pwb = torch.broadcast_to(pw.detach().to(p.dtype), output.shape).reshape(p.shape)
            h = h * (pwb * y + 1 - y)
        return h

    def hessian_vector(self, output, target, V):
        return self._h(output, target) * V

    def factor(self, output, target):
        return torch.diag_embed(self._h(output, target).sqrt())

    def sample(self, output, target, generator, m):
        if self.loss_fn.pos_weight is not None:
            return super().sample(output, target, generator, m)
        p = self._p(output).unsqueeze(2).expand(-1, -1, m)
        y = torch.bernoulli(p, generator=generator)
        w = _elementwise_weight(self.loss_fn.weight, output)
        w = w.sqrt().unsqueeze(2) if isinstance(w, torch.Tensor) else w
        return (p - y) * w / math.sqrt(m)


class BCECurvature(OutputCurvature):
    """BCE on probabilities: ``H_n = diag(w (y / p^2 + (1 - y) / (1 - p)^2))`` (target-dependent).

    Fisher samples ``sqrt(w) (p - y) / (p (1 - p))`` with ``y ~ Bernoulli(p)`` have
    covariance ``diag(w / (p (1 - p)))``, the expectation of ``H_n`` over the
    model's labels.
    """

    def sum_form(self, output, target):
        return nn.functional.binary_cross_entropy(
            output, target, weight=self.loss_fn.weight, reduction="sum"
        )

    def _h(self, output, target):
        p = _flat(output)
        y = target.reshape(p.shape).to(p.dtype)
        return (y / p**2 + (1 - y) / (1 - p) ** 2) * _elementwise_weight(
            self.loss_fn.weight, output
        )

    def hessian_vector(self, output, target, V):
        return self._h(output, target) * V

    def factor(self, output, target):
        return torch.diag_embed(self._h(output, target).sqrt())

    def sample(self, output, target, generator, m):
        p = _flat(output).unsqueeze(2).expand(-1, -1, m)
        y = torch.bernoulli(p, generator=generator)
        w = _elementwise_weight(self.loss_fn.weight, output)
        w = w.sqrt().unsqueeze(2) if isinstance(w, torch.Tensor) else w
        return (p - y) / (p * (1 - p)) * w / math.sqrt(m)


class CustomCurvature(OutputCurvature):
    """A user loss with its own per-sample output Hessian blocks.

    ``output_hessian(output, target)`` returns ``(N, D, D)``: the blocks of the
    Hessian of ``loss_fn(output, target)`` (as returned, reduction included) with
    respect to each sample's flattened output.
    """

    def __init__(
        self, loss_fn: Callable, normalization: Normalization, output_hessian: Callable
    ) -> None:
        super().__init__(loss_fn, normalization)
        self.output_hessian = output_hessian

    def _blocks(self, output, target):
        f = _flat(output)
        H = self.output_hessian(output.detach(), target)
        N, D = f.shape
        if not isinstance(H, torch.Tensor) or tuple(H.shape) != (N, D, D):
            fail(
                "output_hessian(output, target)",
                f"expected a tensor of shape ({N}, {D}, {D}) (one block per sample), got {describe(H)}.",
            )
        scale = self.count(target, N) if self.reduction == "mean" else 1
        return H * scale

    def check(self, call, output, target):
        self._blocks(output, target)

    def hessian_vector(self, output, target, V):
        return (self._blocks(output, target) @ V.unsqueeze(-1)).squeeze(-1)

    def factor(self, output, target):
        H = self._blocks(output, target)
        H = 0.5 * (H + H.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(H)
        scale = evals.abs().amax().clamp_min(torch.finfo(H.dtype).tiny)
        if bool((evals < -1e-6 * scale).any()):
            fail(
                "output_hessian(output, target)",
                "the output Hessian has negative eigenvalues, so it has no factor S S^T; the "
                "GGN needs a loss that is convex in the model output.",
            )
        return evecs * evals.clamp_min(0).sqrt().unsqueeze(1)


def output_curvature(
    call: str,
    loss_fn: Callable,
    output_hessian: Callable | None = None,
    *,
    required: bool = True,
    loss_count: Callable | None = None,
) -> OutputCurvature:
    """The :class:`OutputCurvature` of ``loss_fn`` (a :class:`PlainLoss` if unknown and
    not ``required``), normalised by ``loss_count`` if given (NOTE [loss normalisation])."""
    normalization = Normalization(call, loss_fn, loss_count)
    if output_hessian is not None:
        if not callable(output_hessian):
            fail(
                call,
                f"expected output_hessian to be callable, got {describe(output_hessian)}.",
                TypeError,
            )
        return CustomCurvature(loss_fn, normalization, output_hessian)
    kinds = (
        (nn.MSELoss, MSECurvature),
        (nn.CrossEntropyLoss, CrossEntropyCurvature),
        (nn.BCEWithLogitsLoss, BCEWithLogitsCurvature),
        (nn.BCELoss, BCECurvature),
    )
    for cls, curvature in kinds:
        if type(loss_fn) is cls:
            return curvature(loss_fn, normalization)
    if not required:
        return PlainLoss(loss_fn, normalization)
    fail(
        call,
        f"no output Hessian is known for loss_fn of type {type(loss_fn).__name__}. Use one of "
        f"{KNOWN_LOSSES}, or pass output_hessian=fn returning the (N, D, D) per-sample blocks "
        "of the Hessian of loss_fn(output, target) with respect to the output.",
        NotImplementedError,
    )


class PlainLoss(OutputCurvature):
    """A loss without known output curvature (enough for the Hessian operator)."""

    def hessian_vector(self, output, target, V):  # pragma: no cover - never called
        raise AssertionError("PlainLoss has no output Hessian")

    def factor(self, output, target):  # pragma: no cover - never called
        raise AssertionError("PlainLoss has no output Hessian")
