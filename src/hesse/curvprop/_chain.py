"""Module-level curvature backpropagation for chains of known layers (the fast path).

# NOTE [chain fast path]
When the model is an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise
activations (``Tanh``, ``Sigmoid``, ``ReLU``) and the loss is a plain
``nn.CrossEntropyLoss`` (mean or sum, no weights, no label smoothing), the
exact Hessian diagonal (NOTE [second-order adjoints] in ``_exact``) needs no
traced graph: per sample, the output curvature of the loss factorises as
``diag(p) - p p^T = sum_c u_c u_c^T`` with ``u_c = sqrt(p_c) (e_c - p)``, columns go
backwards through ``W`` (``U W``) and activations (``U * f'(h)``), and each
activation adds its residual ``diag(g * f''(h))`` as columns ``sqrt|r_j| e_j``
with signs ``sign(r_j)``. Those are kept *diagonal* (a ``(B, d)`` vector, never a
``diag_embed``-ed ``(B, d, d)`` block) until the next ``nn.Linear`` turns them into
``v_j W_j``. A Linear's parameters collect ``sum_c s_c (u_c a^T)^2 =
(sum_c s_c u_c^2) (a^2)^T`` per sample; summed over samples in one ``einsum``.
This is BackPACK's ``DiagHessian`` recursion (Dangel, Kunstner & Hennig, 2020)
with one Python step per layer instead of one per ATen node. Anything else (a
weight used twice, other layers or losses, inputs that are not ``(B, d)``) returns
``None`` and the traced engine runs.
"""

from __future__ import annotations

import torch
from torch import nn

from hesse._chunking import chunk_size_for, default_memory_budget, map_chunks

ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.ReLU)


def _derivatives(act: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``f'(h)`` and ``f''(h)`` (``None`` where it is zero almost everywhere)."""
    if isinstance(act, nn.Tanh):
        t = torch.tanh(h)
        d1 = 1 - t * t
        return d1, -2 * t * d1
    if isinstance(act, nn.Sigmoid):
        s = torch.sigmoid(h)
        d1 = s * (1 - s)
        return d1, d1 * (1 - 2 * s)
    return (h > 0).to(h.dtype), None  # ReLU: piecewise linear, no residual


def chain_plan(model: nn.Module, loss_fn, params: dict, inputs, targets) -> list | None:
    """The layers of a supported chain, or ``None`` (NOTE [chain fast path])."""
    if type(model) is not nn.Sequential or type(loss_fn) is not nn.CrossEntropyLoss:
        return None
    if loss_fn.weight is not None or loss_fn.label_smoothing != 0:
        return None
    if loss_fn.reduction not in ("mean", "sum"):
        return None
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
        return None
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.is_floating_point():
        return None
    if bool((targets == loss_fn.ignore_index).any()):
        return None
    layers = list(model)
    if not layers or type(layers[-1]) is not nn.Linear:
        return None
    named = dict(model.named_parameters())
    if set(params) != set(named):  # a subset, or parameters shared between layers
        return None
    seen: set[int] = set()
    for layer in layers:
        if type(layer) is nn.Linear:
            for p in (layer.weight, layer.bias):
                if p is not None and (id(p) in seen or not p.requires_grad):
                    return None
                if p is not None:
                    seen.add(id(p))
        elif type(layer) not in ACTIVATIONS:
            return None
    if len(seen) != len(named):
        return None
    return layers


def chain_diagonal(
    layers: list, names: list[str], params: dict, inputs, targets, reduction: str, *,
    per_sample: bool, call: str,
) -> torch.Tensor:  # fmt: skip
    """The flat exact diagonal, ``(n,)`` or ``(B, n)`` per sample, in the order of ``names``.

    Samples go in groups (:func:`hesse._chunking.map_chunks`) whose columns, at most
    ``(group, K, width)`` with ``K`` the classes plus the widths of the curved
    activations, fit :data:`hesse._chunking.EFFICIENT_CHUNK_BYTES` (and the memory
    budget).
    """
    b = inputs.shape[0]
    widths = [layer.out_features for layer in layers if type(layer) is nn.Linear]
    columns = sum(widths)  # at most: the classes plus every hidden width
    per_sample_bytes = 4 * columns * max(widths) * inputs.element_size()
    group = chunk_size_for(
        rows=b, per_row_bytes=per_sample_bytes, fixed_bytes=0,
        budget=int(default_memory_budget(inputs.device)),
    )  # fmt: skip
    groups = -(-b // group)

    def run(ids: torch.Tensor) -> torch.Tensor:
        lo = int(ids[0]) * group
        hi = min(b, lo + group)
        part = _chain_group(layers, names, params, inputs[lo:hi], targets[lo:hi], per_sample)
        return part if per_sample else part[None]

    if groups == 1:
        flat = run(torch.zeros(1))
        flat = flat if per_sample else flat[0]
    elif per_sample:
        parts = [run(torch.tensor([g])) for g in range(groups)]  # ragged groups: no stacking
        flat = torch.cat(parts)
    else:
        flat = map_chunks(
            run, None, groups, lambda s, e: torch.arange(s, e), chunk_size=1, call=call
        ).sum(0)
    scale = 1.0 / b if reduction == "mean" else 1.0
    return flat.mul_(scale) if scale != 1 else flat


def _chain_group(layers, names, params, inputs, targets, per_sample: bool) -> torch.Tensor:
    """One group of samples: the unscaled diagonal, ``(n,)`` or ``(B, n)``."""
    b = inputs.shape[0]
    prefix = {id(layer): str(i) for i, layer in enumerate(layers)}
    # Forward: each layer's input, with the parameter values of ``params``.
    acts = [inputs]
    with torch.no_grad():
        for layer in layers:
            x = acts[-1]
            if type(layer) is nn.Linear:
                key = prefix[id(layer)]
                w = params[f"{key}.weight"]
                bias = params.get(f"{key}.bias")
                acts.append(torch.nn.functional.linear(x, w, bias))
            else:
                acts.append(layer(x))
        logits = acts[-1]
        p = torch.softmax(logits, dim=1)
        g = p.clone()
        g[torch.arange(b), targets] -= 1  # d loss_b / d logits
        sq = p.sqrt()
        # Columns u_c = sqrt(p_c) (e_c - p): (B, C, C), all signs +1.
        dense = torch.diag_embed(sq) - sq[:, :, None] * p[:, None, :]
        dense_signs: torch.Tensor | None = None  # None: all +1
        diag_cols: torch.Tensor | None = None  # (B, d) columns sqrt|r_j| e_j
        diag_signs: torch.Tensor | None = None
        out: dict[str, torch.Tensor] = {}
        lead = "b" if per_sample else ""
        for i in range(len(layers) - 1, -1, -1):
            layer, a = layers[i], acts[i]
            if type(layer) is nn.Linear:
                key = prefix[id(layer)]
                w = params[f"{key}.weight"]
                # sum_c s_c u_c^2 per sample: (B, out)
                u2 = dense * dense
                weighted = (
                    u2.sum(1)
                    if dense_signs is None
                    else torch.einsum("bkd,bk->bd", u2, dense_signs)
                )
                if diag_cols is not None:
                    weighted = weighted + diag_signs * diag_cols * diag_cols
                out[f"{key}.weight"] = torch.einsum(f"bo,bi->{lead}oi", weighted, a * a)
                if layer.bias is not None:
                    out[f"{key}.bias"] = weighted if per_sample else weighted.sum(0)
                if i == 0:
                    break
                g = g @ w
                dense = dense @ w
                if diag_cols is not None:  # v_j e_j -> v_j W_j: now dense columns
                    from_diag = diag_cols[:, :, None] * w[None]
                    dense = torch.cat([dense, from_diag], 1)
                    base = (
                        torch.ones(dense.shape[0], dense.shape[1] - from_diag.shape[1],
                                   dtype=dense.dtype, device=dense.device)
                        if dense_signs is None else dense_signs
                    )  # fmt: skip
                    dense_signs = torch.cat([base, diag_signs], 1)
                    diag_cols = diag_signs = None
            else:
                d1, d2 = _derivatives(layer, a)
                dense = dense * d1[:, None, :]
                if d2 is not None:
                    r = g * d2
                    diag_cols, diag_signs = r.abs().sqrt(), torch.sign(r)
                g = g * d1
    pieces = [out[k].reshape(b, -1) if per_sample else out[k].reshape(-1) for k in names]
    return torch.cat(pieces, dim=1 if per_sample else 0)
