"""One batch's layer inputs and backpropagated output-gradient columns, by module hooks.

# NOTE [kfac backward]
The model runs once through the operator's own forward (``functional_call`` at
the selected parameters, NOTE [train/eval mode]) with forward hooks on the
supported modules that keep each one's input and output. The loss's output
factor ``S`` (``(N, D, K)``, NOTE [loss conventions]: the loss Hessian's square
root for type-2, sampled-label gradients for MC, the per-sample gradients for
the empirical Fisher) is then pulled back to every module output in *one*
backward pass batched over its ``K`` columns (``is_grads_batched``): only the
module outputs are differentiated, no weight gradient is formed. The columns of
all loss terms go back together (column ``k`` of every sample at once), which is
exact when loss terms do not share layer rows (an MLP, a CNN with one output per
sample) and is KFAC's usual approximation otherwise (a sequence model's tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hesse._validation import fail


def capture(
    call: str,
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    modules: dict[str, nn.Module],
    output_factor: Callable[[torch.Tensor], torch.Tensor] | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{module name: (input, grads)}`` for one batch.

    Args:
        call: the operator's call form (for errors).
        forward: ``forward(x)`` runs the model at the flat parameters ``x``.
        x: the flat parameter vector.
        modules: the modules to record, by name.
        output_factor: ``output -> S`` (``(N, D, K)``), or ``None`` for no backward
            pass (forward-only KFAC).

    Returns:
        Per module its input and ``(K, *output.shape)`` output gradients (``None``
        without a backward pass).
    """
    seen: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if name in seen:
                fail(
                    call,
                    f"module {name!r} runs twice in one forward pass; KFAC needs one call per "
                    "layer. Leave its parameters out with params=[...].",
                    NotImplementedError,
                )
            seen[name] = (args[0].detach(), output, output._version)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        backward = output_factor is not None
        with torch.set_grad_enabled(backward):
            x = x.detach().requires_grad_(backward)
            out = forward(x)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in modules if name not in seen]
    if missing:
        fail(
            call,
            f"module(s) {missing} did not run in the forward pass, so they have no factors. "
            "Leave their parameters out with params=[...].",
        )
    for name, (_, output, version) in seen.items():
        if output._version != version:
            fail(
                call,
                f"the output of module {name!r} is modified in place later in the forward pass "
                "(e.g. ReLU(inplace=True)), so its gradient cannot be recorded. Use the "
                "out-of-place operation (inplace=False).",
                NotImplementedError,
            )
    if output_factor is None:
        return {name: (inp, None) for name, (inp, _, _) in seen.items()}
    S = output_factor(out.detach())
    K = S.shape[2]
    cot = S.permute(2, 0, 1).reshape(K, *out.shape)
    names = list(seen)
    targets = [seen[name][1] for name in names]
    if K == 1:
        grads = torch.autograd.grad(out, targets, cot[0], allow_unused=True)
        grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
    else:
        grads = torch.autograd.grad(out, targets, cot, allow_unused=True, is_grads_batched=True)
    result = {}
    for name, t, g in zip(names, targets, grads):
        if g is None:  # the module does not influence the loss
            g = t.new_zeros(K, *t.shape)
        result[name] = (seen[name][0], g.detach())
    return result
