"""``hesse analyze``: model, data and loss checked against each other before the job.

One forward pass and one loss on the first batch, before any operator is built.
torch's own errors at that point (``mat1 and mat2 shapes cannot be multiplied``,
``Target 7 is out of bounds``) say what broke but not which of the three inputs
to change; the checks here compare the shapes and label ranges first and name
the fix. Anything they do not foresee still ends as one line with exit code 2,
the torch message quoted (NOTE [analyze errors] in :mod:`hesse.cli._analyze`).
The form of the data (pairs, re-iterable, not shuffled) is checked before, in
the library's one place for it (NOTE [data forms] in ``hesse.operators._data``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hesse.cli._load import AnalyzeError, first_line
from hesse.operators._data import _rows, model_arguments

#: losses whose targets must have the output's shape (torch broadcasts MSE/L1 with a warning).
SAME_SHAPE_LOSSES = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
)


def shape(x: Any) -> str:
    """``(128, 64) float64`` for a tensor, the type name otherwise."""
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__


def batch_rows(inputs: Any) -> int:
    """Samples in a batch: the rows of its first input tensor (1 for scalars)."""
    return _rows(inputs) or 1


def check_model_data_loss(model: nn.Module, loss_fn: Callable, data: Iterable) -> None:
    """Run the model and the loss on the first batch; raise :class:`AnalyzeError` naming the fix.

    Cost: one forward pass and one loss on one batch, without gradients.
    """
    try:  # the library checks each batch's form as it is read (NOTE [data forms])
        first = next(iter(data), None)
    except (TypeError, ValueError) as err:
        raise AnalyzeError(first_line(err)) from err
    if first is None:
        raise AnalyzeError("data yields no batches: the factory must return at least one.")
    inputs, targets = first
    args, kwargs = model_arguments(inputs)
    try:
        with torch.no_grad():
            output = model(*args, **kwargs)
    except Exception as err:
        raise AnalyzeError(_forward_failure(model, inputs, err)) from err
    if not isinstance(output, torch.Tensor):
        raise AnalyzeError(
            f"the model returns a {type(output).__name__}, but the loss needs a tensor. Wrap the "
            "model so that forward returns the tensor loss_fn takes (e.g. its logits)."
        )
    _check_targets(loss_fn, output, targets)
    try:
        with torch.no_grad():
            loss = loss_fn(output, targets)
    except Exception as err:
        raise AnalyzeError(
            f"loss_fn(output {shape(output)}, targets {shape(targets)}) failed on the first batch: "
            f"{type(err).__name__}: {first_line(err)}. Make the targets match what the loss "
            "expects for this output."
        ) from err
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise AnalyzeError(
            f"loss_fn must return a scalar, got {shape(loss)}. Reduce it (reduction='mean' or "
            "'sum', or .mean() in a plain function)."
        )
    if not bool(torch.isfinite(loss)):
        raise AnalyzeError(
            f"the loss on the first batch is {float(loss)}: curvature of a non-finite loss is "
            "meaningless. Check the data for NaN or inf and the model's initialisation."
        )


def _forward_failure(model: nn.Module, inputs: Any, err: Exception) -> str:
    """The message for a model that cannot take the first batch's inputs."""
    head = f"the model cannot take the first batch's inputs {shape(inputs)}"
    layer = _first_layer(model)
    if layer is not None and isinstance(inputs, torch.Tensor) and inputs.dim() >= 1:
        name, module, expected = layer
        got = None
        if isinstance(module, nn.Linear):
            got = inputs.shape[-1]
        elif inputs.dim() >= 2:
            got = inputs.shape[1]
        if got is not None and got != expected:
            what = "features" if isinstance(module, nn.Linear) else "channels"
            return (
                f"{head}: its first layer {name} ({type(module).__name__}) expects {expected} "
                f"input {what}, the inputs have {got}. Make data yield inputs with {expected} "
                f"{what} or change that layer."
            )
    return (
        f"{head}: {type(err).__name__}: {first_line(err)}. Make data yield inputs the model "
        "accepts (shape, dtype, device) or fix the model."
    )


def _first_layer(model: nn.Module) -> tuple[str, nn.Module, int] | None:
    """The first module with a declared input size: ``(name, module, size)``."""
    for name, module in model.named_modules():
        for attr in ("in_features", "in_channels"):
            size = getattr(module, attr, None)
            if isinstance(size, int):
                return (name or "(model)", module, size)
    return None


def _check_targets(loss_fn: Callable, output: torch.Tensor, targets: Any) -> None:
    """Shapes and label ranges that torch would reject cryptically, or accept wrongly."""
    if not isinstance(targets, torch.Tensor):
        return
    if output.dim() >= 1 and targets.dim() >= 1 and targets.shape[0] != output.shape[0]:
        raise AnalyzeError(
            f"the first batch has {targets.shape[0]} targets but the model returns "
            f"{output.shape[0]} outputs {shape(output)}. Pair each input with one target."
        )
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and not targets.is_floating_point():
        classes = output.shape[1] if output.dim() >= 2 else output.shape[0]
        labels = targets[targets != loss_fn.ignore_index]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            low, high = int(labels.min()), int(labels.max())
            raise AnalyzeError(
                f"{type(loss_fn).__name__} targets of the first batch range over [{low}, {high}], "
                f"but the model outputs {classes} classes {shape(output)}: class labels must lie "
                f"in [0, {classes - 1}]. Give the last layer {high + 1} outputs or remap the labels."
            )
    if isinstance(loss_fn, SAME_SHAPE_LOSSES) and targets.shape != output.shape:
        fix = ""
        if targets.numel() == output.numel():
            fix = f" (e.g. y.reshape{tuple(output.shape)})"
        raise AnalyzeError(
            f"{type(loss_fn).__name__} needs targets shaped like the output {shape(output)}, got "
            f"{shape(targets)}; torch would broadcast them and compute a different loss. "
            f"Reshape the targets to the output's shape{fix}."
        )
