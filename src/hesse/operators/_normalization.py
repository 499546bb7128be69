"""How many terms a batch loss averages over: the one normalisation rule.

# NOTE [loss normalisation]
A model operator is the curvature of the *dataset* loss. With
``reduction="mean"`` that is the mean over every term the loss function
averages, taken over the whole dataset:

.. math:: L = \\frac{\\sum_b M_b L_b}{\\sum_b M_b}

where ``L_b = loss_fn(output_b, targets_b)`` and ``M_b`` is the number of
terms (the *count*) that ``loss_fn`` divides by on batch ``b``. Products,
diagonals (exact, curvature propagation, Monte Carlo, GNB), per-layer blocks
and the ``hesse`` command all take ``M_b`` from :func:`Normalization.count`
and nothing else, so the sum form ``M_b L_b`` and the final division always use
the same number. On one batch the operator is then exactly the curvature of
``loss_fn`` on that batch, whatever the layout of the outputs.

``M_b`` is read from the loss and the targets, never guessed from the inputs:

- element-wise losses (``MSELoss``, ``L1Loss``, ``HuberLoss``, ``SmoothL1Loss``,
  ``BCELoss``, ``BCEWithLogitsLoss``, ``SoftMarginLoss``, ``PoissonNLLLoss``):
  the number of output entries (targets must be shaped like the output; class
  weights of the BCE losses scale terms, they do not change the count);
- ``CrossEntropyLoss`` / ``NLLLoss`` with class-index targets, in the ``(N, C)``,
  ``(N, C, d1, ...)`` and token-flattened ``(B*T, V)`` layouts: the number of
  targets that are not ``ignore_index``; with class ``weight``, the sum of the
  weights of those targets (what torch divides by; label smoothing does not
  change it); with class-probability targets, ``N * d1 * ...``;
- any other loss (a plain callable, or an ``nn`` loss not listed): the batch
  size, i.e. a mean over the samples, *provided* the model's output has the
  inputs' batch size. Otherwise (outputs flattened to tokens or pixels, say) the
  count cannot be known and construction fails, asking for ``loss_count=``.

``loss_count=fn`` states the count: ``fn(targets)`` returns ``M_b`` for one
batch (``lambda y: (y != -100).sum()`` for a token loss that skips padding).
``reduction="sum"`` needs no count: the operator is the curvature of the sum of
the batch losses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hesse._validation import describe, fail

#: losses that average over every entry of the output.
ELEMENTWISE = (
    nn.MSELoss,
    nn.L1Loss,
    nn.HuberLoss,
    nn.SmoothL1Loss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.SoftMarginLoss,
    nn.PoissonNLLLoss,
)
#: losses over class scores, averaging over the targets that are not ignored.
CLASSIFICATION = (nn.CrossEntropyLoss, nn.NLLLoss)

_STATE_IT = (
    "pass loss_count=fn, where fn(targets) returns the number of terms loss_fn averages "
    "over in a batch (e.g. loss_count=lambda y: y.numel()), or use a loss with "
    "reduction='sum'"
)


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


def class_weights(loss_fn: Any, targets: torch.Tensor) -> torch.Tensor:
    """Per-target weights of a classification loss: ``weight[y]``, 0 where ignored.

    Shaped like ``targets`` (class indices), in the weight's dtype (float64 if none).
    """
    keep = targets != loss_fn.ignore_index
    if loss_fn.weight is None:
        return keep.to(torch.float64)
    w = loss_fn.weight.detach()
    return torch.where(keep, w[targets.clamp(0, w.numel() - 1)], torch.zeros((), dtype=w.dtype))


class Normalization:
    """The count ``M_b`` of one loss function (see NOTE [loss normalisation])."""

    def __init__(self, call: str, loss_fn: Callable, loss_count: Callable | None = None) -> None:
        if loss_count is not None and not callable(loss_count):
            fail(
                call,
                f"expected loss_count to be callable (targets -> number of loss terms), got "
                f"{describe(loss_count)}.",
                TypeError,
            )
        self.loss_fn = loss_fn
        self.reduction = reduction_of(call, loss_fn)
        self.stated = loss_count
        kind = type(loss_fn)
        self.rule = (
            "stated"
            if loss_count is not None
            else "elements"
            if issubclass(kind, ELEMENTWISE)
            else "classes"
            if issubclass(kind, CLASSIFICATION)
            else "samples"
        )

    def check(self, call: str, output: torch.Tensor, targets: Any, batch_size: int) -> None:
        """Validate one batch (the first): the count must be well defined for it."""
        name = type(self.loss_fn).__name__
        if self.rule == "elements":
            if not isinstance(targets, torch.Tensor) or targets.shape != output.shape:
                fail(
                    call,
                    f"{name} needs targets shaped like the output {tuple(output.shape)}, got "
                    f"{describe(targets)}; broadcasting would make the number of averaged terms "
                    "ambiguous. Reshape the targets.",
                )
        elif self.rule == "classes":
            if not isinstance(targets, torch.Tensor):
                fail(call, f"{name} needs tensor targets, got {describe(targets)}.", TypeError)
            if targets.is_floating_point():
                if targets.shape != output.shape:
                    fail(
                        call,
                        f"{name} with class-probability targets needs them shaped like the "
                        f"output {tuple(output.shape)}, got {tuple(targets.shape)}.",
                    )
            elif output.dim() < 2 or targets.shape != output.shape[:1] + output.shape[2:]:
                want = (output.shape[0], *output.shape[2:]) if output.dim() >= 2 else "(N,)"
                fail(
                    call,
                    f"{name} needs class-index targets of shape {tuple(want)} for outputs of "
                    f"shape {tuple(output.shape)} (classes in dimension 1), got "
                    f"{describe(targets)}. Flatten token outputs to (B*T, V) with targets "
                    "(B*T,), or move the classes to dimension 1.",
                )
        elif (
            self.rule == "samples"
            and self.reduction == "mean"
            and output.shape[:1] != (batch_size,)
        ):
            fail(
                call,
                f"cannot tell how many terms loss_fn ({name}) averages over: the model output "
                f"has leading dimension {output.shape[0] if output.dim() else 'none'} but the "
                f"inputs have batch size {batch_size}, so its mean is not one over the samples "
                f"(flattened tokens or pixels?). To fix it, {_STATE_IT}.",
            )
        if self.reduction == "mean":
            count = self.count(targets, batch_size)
            if not count > 0:
                fail(
                    call,
                    f"loss_fn averages over {count} terms on the first batch (every target "
                    "ignored, or a zero loss_count), so its mean is undefined. Drop such "
                    "batches or fix loss_count.",
                )

    def count(self, targets: Any, batch_size: int) -> float:
        """``M_b``: the number of terms a mean-reduced batch loss divides by."""
        if self.rule == "stated":
            value = self.stated(targets)
            return float(value.item() if isinstance(value, torch.Tensor) else value)
        if self.rule == "elements":
            return float(targets.numel())
        if self.rule == "classes":
            if targets.is_floating_point():  # probabilities: every position counts
                return float(targets.numel() // targets.shape[1]) if targets.dim() > 1 else 1.0
            return float(class_weights(self.loss_fn, targets).sum())
        return float(batch_size)
