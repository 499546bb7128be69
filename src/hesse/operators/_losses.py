"""Output curvature of losses: per-sample Hessians, their factors, and Fisher samples.

# NOTE [loss conventions]
A batch loss ``L_b = loss_fn(output, target)`` is handled in its *sum form*
``M_b * L_b`` for ``reduction="mean"`` (and ``L_b`` itself for ``"sum"``), where
``M_b`` is the number of terms the mean divides by (``count``: the number of
output entries for MSE and BCE, the number of samples for cross-entropy, the
batch size for a plain callable). The sum form is a sum of per-sample losses
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

KNOWN_LOSSES = "nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.BCELoss"


def reduction_of(call: str, loss_fn: Callable) -> str:
    """``"mean"`` or ``"sum"``; a plain callable without the attribute is a mean."""
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        fail(
            call,
            f"expected loss_fn to reduce to a scalar with reduction='mean' or 'sum', got "
            f"reduction={reduction!r}. Use reduction='mean' (or 'sum').",
        )
    return reduction


class OutputCurvature(abc.ABC):
    """The sum-form output curvature of one loss (see NOTE [loss conventions]).

    ``output`` is the model output of one batch (``(N, ...)``); per-sample
    quantities are on the flattened output ``(N, D)``.
    """

    def __init__(self, loss_fn: Callable, reduction: str) -> None:
        self.loss_fn = loss_fn
        self.reduction = reduction

    def count(self, target: Any, batch_size: int) -> int:
        """``M_b``: the number of terms a mean-reduced batch loss divides by."""
        return batch_size

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

    def count(self, target: Any, batch_size: int) -> int:
        return int(target.numel())

    def check(self, call: str, output: torch.Tensor, target: torch.Tensor) -> None:
        if not isinstance(target, torch.Tensor) or target.shape != output.shape:
            fail(
                call,
                f"MSELoss needs targets shaped like the output {tuple(output.shape)}, got {describe(target)}.",
            )

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
    """``l_n = -log softmax(f_n)_y``: ``H_n = diag(p) - p p^T``, ``S = diag(sqrt p) - p sqrt(p)^T``."""

    def check(self, call: str, output: torch.Tensor, target: torch.Tensor) -> None:
        fn = self.loss_fn
        if fn.weight is not None or fn.label_smoothing != 0:
            fail(
                call,
                "CrossEntropyLoss with class weights or label smoothing has no closed-form output "
                "Hessian here. Use weight=None, label_smoothing=0, or pass output_hessian=.",
                NotImplementedError,
            )
        if output.dim() != 2:
            fail(
                call,
                f"CrossEntropyLoss needs (N, C) model outputs, got shape {tuple(output.shape)}. "
                "Reshape spatial outputs to (N * H * W, C) inside the model.",
                NotImplementedError,
            )
        if (
            not isinstance(target, torch.Tensor)
            or target.dtype != torch.long
            or target.shape != output.shape[:1]
        ):
            fail(
                call,
                f"CrossEntropyLoss needs class-index targets of shape ({output.shape[0]},) and "
                f"dtype torch.long, got {describe(target)}.",
            )
        if bool((target == fn.ignore_index).any()):
            fail(
                call,
                f"targets contain ignore_index={fn.ignore_index}, which changes the mean's "
                "weighting; drop those samples from the data.",
                NotImplementedError,
            )

    def sum_form(self, output, target):
        return nn.functional.cross_entropy(output, target, reduction="sum")

    def _p(self, output):
        return torch.softmax(_flat(output), dim=1)

    def hessian_vector(self, output, target, V):
        p = self._p(output)
        return p * V - p * (p * V).sum(-1, keepdim=True)

    def factor(self, output, target):
        p = self._p(output)
        sq = p.sqrt()
        return torch.diag_embed(sq) - p.unsqueeze(2) * sq.unsqueeze(1)

    def sample(self, output, target, generator, m):
        p = self._p(output)
        labels = torch.multinomial(p, m, replacement=True, generator=generator)  # (N, m)
        onehot = torch.zeros(*p.shape, m, dtype=p.dtype, device=p.device)
        onehot.scatter_(1, labels.unsqueeze(1), 1.0)
        return (p.unsqueeze(2) - onehot) / math.sqrt(m)


class BCEWithLogitsCurvature(OutputCurvature):
    """``H_n = diag(sigma(f)(1 - sigma(f)))``; Fisher samples ``sigma(f) - y``, ``y ~ Bernoulli``."""

    def count(self, target, batch_size):
        return int(target.numel())

    def check(self, call, output, target):
        fn = self.loss_fn
        if fn.weight is not None or fn.pos_weight is not None:
            fail(
                call,
                "BCEWithLogitsLoss with weight or pos_weight is not supported; pass output_hessian=.",
                NotImplementedError,
            )
        if not isinstance(target, torch.Tensor) or target.shape != output.shape:
            fail(
                call,
                f"BCEWithLogitsLoss needs targets shaped like the output {tuple(output.shape)}, got {describe(target)}.",
            )

    def sum_form(self, output, target):
        return nn.functional.binary_cross_entropy_with_logits(output, target, reduction="sum")

    def _p(self, output):
        return torch.sigmoid(_flat(output))

    def hessian_vector(self, output, target, V):
        p = self._p(output)
        return p * (1 - p) * V

    def factor(self, output, target):
        p = self._p(output)
        return torch.diag_embed((p * (1 - p)).sqrt())

    def sample(self, output, target, generator, m):
        p = self._p(output).unsqueeze(2).expand(-1, -1, m)
        y = torch.bernoulli(p, generator=generator)
        return (p - y) / math.sqrt(m)


class BCECurvature(OutputCurvature):
    """BCE on probabilities: ``H_n = diag(y / p^2 + (1 - y) / (1 - p)^2)`` (depends on the target).

    Fisher samples ``(p - y) / (p (1 - p))`` with ``y ~ Bernoulli(p)`` have covariance
    ``diag(1 / (p (1 - p)))``, the expectation of ``H_n`` over the model's labels.
    """

    def count(self, target, batch_size):
        return int(target.numel())

    def check(self, call, output, target):
        if self.loss_fn.weight is not None:
            fail(
                call,
                "BCELoss with weight is not supported; pass output_hessian=.",
                NotImplementedError,
            )
        if not isinstance(target, torch.Tensor) or target.shape != output.shape:
            fail(
                call,
                f"BCELoss needs targets shaped like the output {tuple(output.shape)}, got {describe(target)}.",
            )

    def sum_form(self, output, target):
        return nn.functional.binary_cross_entropy(output, target, reduction="sum")

    def _h(self, output, target):
        p = _flat(output)
        y = target.reshape(p.shape).to(p.dtype)
        return y / p**2 + (1 - y) / (1 - p) ** 2

    def hessian_vector(self, output, target, V):
        return self._h(output, target) * V

    def factor(self, output, target):
        return torch.diag_embed(self._h(output, target).sqrt())

    def sample(self, output, target, generator, m):
        p = _flat(output).unsqueeze(2).expand(-1, -1, m)
        y = torch.bernoulli(p, generator=generator)
        return (p - y) / (p * (1 - p)) / math.sqrt(m)


class CustomCurvature(OutputCurvature):
    """A user loss with its own per-sample output Hessian blocks.

    ``output_hessian(output, target)`` returns ``(N, D, D)``: the blocks of the
    Hessian of ``loss_fn(output, target)`` (as returned, reduction included) with
    respect to each sample's flattened output.
    """

    def __init__(self, loss_fn: Callable, reduction: str, output_hessian: Callable) -> None:
        super().__init__(loss_fn, reduction)
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
    call: str, loss_fn: Callable, output_hessian: Callable | None = None, *, required: bool = True
) -> OutputCurvature | None:
    """The :class:`OutputCurvature` of ``loss_fn`` (``None`` if unknown and not ``required``)."""
    reduction = reduction_of(call, loss_fn)
    if output_hessian is not None:
        if not callable(output_hessian):
            fail(
                call,
                f"expected output_hessian to be callable, got {describe(output_hessian)}.",
                TypeError,
            )
        return CustomCurvature(loss_fn, reduction, output_hessian)
    kinds = (
        (nn.MSELoss, MSECurvature),
        (nn.CrossEntropyLoss, CrossEntropyCurvature),
        (nn.BCEWithLogitsLoss, BCEWithLogitsCurvature),
        (nn.BCELoss, BCECurvature),
    )
    for cls, curvature in kinds:
        if type(loss_fn) is cls:
            return curvature(loss_fn, reduction)
    if not required:
        return None
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
