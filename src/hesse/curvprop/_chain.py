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
with one Python step per layer instead of one per ATen node.

Convolutional chains (``nn.Conv2d`` with ``groups=1`` and numeric zero padding,
``nn.MaxPool2d``, ``nn.Flatten``) take the same path: columns keep the feature
shape ``(B, K, C, H, W)``, go back through a convolution as its input gradient
and through max pooling by scattering to the argmax positions (piecewise linear:
no residual). A convolution's per-sample weight gradient of column ``u`` is
``u_p U_p^T`` over output positions ``p`` (``U`` the unfolded input patches), so
its squares are summed per column; a diagonal column ``sqrt|r| e_(o,p)`` gives
``|r| U_p^2`` in row ``o`` without materialising the column. Small batches then pay
one Python step per layer instead of the traced engine's per-node cost (the CNN
of ``hesse bench --sweep`` at ``B=1``). Anything else (a weight used twice, other
layers or losses, shapes a layer does not expect) returns ``None`` and the traced
engine runs.

Without the activations' residual columns the same sweep gives the exact diagonal
of the generalised Gauss-Newton matrix (``per_sample_diagonal(..., method="ggn")``,
BackPACK's ``BatchDiagGGNExact``): only the ``C`` columns of the loss's factor
travel. The loss's ``1/B`` (a mean) enters the columns as ``sqrt(1/B)`` rather than
as a pass over the result.

# NOTE [per-parameter results]
Per-sample diagonals are ``(B, numel)`` blocks of the size of the parameters times
the batch (40 MB for the 784x100 weight at ``B = 128`` in float32), written once
and returned. Each parameter gets its own tensor, not a view into one ``(B, n)``
block: glibc serves a block above its mmap threshold (at most 32 MiB) with fresh
pages, and every fresh page is a page fault when first written. One block puts the
small parameters' rows into fresh pages too (the 100x100 weight's 5 MB took 10 ms
to write there, 2 ms from the heap); separate tensors leave only the large ones
there, as BackPACK's per-parameter results do, and a caller keeping one
parameter's diagonals frees the others.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hesse._chunking import chunk_size_for, default_memory_budget, map_chunks

ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.ReLU)
F = torch.nn.functional


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
    if not isinstance(inputs, torch.Tensor) or inputs.dim() not in (2, 4):
        return None
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.long:
        return None
    if targets.shape != inputs.shape[:1]:  # one class index per sample
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
    dim = inputs.dim()  # the dimension of each layer's input (batch first)
    for layer in layers:
        kind = type(layer)
        if kind is nn.Linear and dim == 2 or kind is nn.Conv2d and _plain_conv(layer, dim):
            for p in (layer.weight, layer.bias):
                if p is not None and (id(p) in seen or not p.requires_grad):
                    return None
                if p is not None:
                    seen.add(id(p))
        elif kind is nn.MaxPool2d and dim == 4 and not layer.return_indices:
            pass
        elif kind is nn.Flatten and dim == 4 and (layer.start_dim, layer.end_dim) == (1, -1):
            dim = 2
        elif kind not in ACTIVATIONS:
            return None
    if len(seen) != len(named) or dim != 2:
        return None
    return layers


def _plain_conv(layer: nn.Conv2d, dim: int) -> bool:
    """A convolution whose input gradient ``conv2d_input`` and patches ``unfold`` give."""
    return (
        dim == 4
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def _back(layer: nn.Module, w, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (``(N, *output)``) times the Jacobian of ``layer`` (weight ``w``) at input ``a``.

    ``a`` is ``(B, *input)``; ``N`` is a multiple of ``B`` (columns sample-major). Only
    for the linear layers of a chain: Linear, Conv2d, MaxPool2d, Flatten.
    """
    n = t.shape[0]
    if type(layer) is nn.Linear:
        return t @ w
    if type(layer) is nn.Flatten:
        return t.reshape(n, *a.shape[1:])
    if type(layer) is nn.Conv2d:
        return torch.nn.grad.conv2d_input(
            (n, *a.shape[1:]), w, t, layer.stride, layer.padding, layer.dilation
        )
    # MaxPool2d: scatter to the argmax of each window (overlapping windows add).
    _, idx = F.max_pool2d(
        a, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
        ceil_mode=layer.ceil_mode, return_indices=True,
    )  # fmt: skip
    b, c, h, w = a.shape
    rep = n // b  # t holds rep columns per sample, sample-major
    flat = t.reshape(b, rep, c, -1)
    where = idx.reshape(b, 1, c, -1).expand(b, rep, c, flat.shape[3])
    out = flat.new_zeros(b, rep, c, h * w).scatter_add_(3, where, flat)
    return out.reshape(n, c, h, w)


def chain_diagonal(
    layers: list, names: list[str], params: dict, inputs, targets, reduction: str, *,
    per_sample: bool, residuals: bool = True, call: str,
) -> torch.Tensor | dict[str, torch.Tensor]:  # fmt: skip
    """The exact diagonal: flat ``(n,)`` in the order of ``names``, or per sample.

    ``residuals=False`` drops the activations' residual columns: the diagonal of the
    generalised Gauss-Newton matrix instead of the Hessian (NOTE [chain fast path]).
    ``per_sample``: a dict name -> ``(B, numel)``, one tensor per parameter (NOTE
    [per-parameter results]).

    Samples go in groups (:func:`hesse._chunking.map_chunks`) whose columns, at most
    ``(group, K, width)`` with ``K`` the classes plus the widths of the curved
    activations, fit :data:`hesse._chunking.EFFICIENT_CHUNK_BYTES` (and the memory
    budget). In a convolutional chain a width is a feature map's size, and a
    column also becomes a per-sample weight gradient (``(O, C kh kw)``).
    """
    b = inputs.shape[0]
    if any(type(layer) is nn.Conv2d for layer in layers):
        with torch.no_grad():  # one sample's feature sizes
            x, sizes, widths = inputs[:1], [inputs[0].numel()], []
            for i, layer in enumerate(layers):
                x = _apply(layer, params, str(i), x)
                sizes.append(x[0].numel())
                if type(layer) in (nn.Linear, nn.Conv2d):
                    widths.append(x[0].numel())
                    sizes.append(layer.weight.numel())
        width = max(sizes)
    else:
        widths = [layer.out_features for layer in layers if type(layer) is nn.Linear]
        width = max(widths)
    # At most the classes plus every hidden width (the classes alone without residuals).
    columns = sum(widths) if residuals else widths[-1]
    per_sample_bytes = 4 * columns * width * inputs.element_size()
    group = chunk_size_for(
        rows=b, per_row_bytes=per_sample_bytes, fixed_bytes=0,
        budget=int(default_memory_budget(inputs.device)),
    )  # fmt: skip
    groups = -(-b // group)
    # The loss's 1/B goes into the columns (squared: 1/B), not over the result afterwards.
    scale = 1.0 / b if reduction == "mean" else 1.0

    def one(lo: int, hi: int, dest: dict | None = None) -> torch.Tensor | None:
        return _chain_group(
            layers, names, params, inputs[lo:hi], targets[lo:hi], scale, residuals, dest
        )

    if per_sample:  # every group writes its rows of the per-parameter results: no copies
        out = {k: inputs.new_empty((b, params[k].numel())) for k in names}
        for lo in range(0, b, group):
            hi = min(b, lo + group)
            one(lo, hi, {k: v[lo:hi] for k, v in out.items()})
        return out
    if groups == 1:
        return one(0, b)
    return map_chunks(
        lambda ids: one(int(ids[0]) * group, min(b, int(ids[0]) * group + group))[None],
        None, groups, lambda s, e: torch.arange(s, e), chunk_size=1, call=call,
    ).sum(0)  # fmt: skip


def _chain_group(
    layers, names, params, inputs, targets, scale: float, residuals: bool,
    dest: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """One group of samples: the diagonal ``(n,)``, or per sample written to ``dest``.

    ``scale`` multiplies every sample's loss (``1/B`` for a mean): it enters the
    columns as ``sqrt(scale)`` and the gradient as ``scale``. ``dest``: name ->
    ``(group, numel)`` destination of each parameter's per-sample diagonals.
    """
    b = inputs.shape[0]
    per_sample = dest is not None
    prefix = {id(layer): str(i) for i, layer in enumerate(layers)}
    dest = dest or {}

    def weights(layer):
        key = prefix[id(layer)]
        return params.get(f"{key}.weight"), params.get(f"{key}.bias")

    # Forward: each layer's input, with the parameter values of ``params``.
    acts = [inputs]
    with torch.no_grad():
        for layer in layers:
            acts.append(_apply(layer, params, prefix[id(layer)], acts[-1]))
        logits = acts[-1]
        p = torch.softmax(logits, dim=1)
        g = None
        if residuals:
            g = p.clone()
            g[torch.arange(b), targets] -= 1  # d loss_b / d logits
            g = g.mul_(scale) if scale != 1 else g
        sq = p.sqrt()
        # Columns u_c = sqrt(p_c) (e_c - p): (B, C, C), all signs +1. Columns keep the
        # feature shape: (B, K, *features).
        dense = torch.diag_embed(sq) - sq[:, :, None] * p[:, None, :]
        if scale != 1:
            dense = dense.mul_(math.sqrt(scale))
        dense_signs: torch.Tensor | None = None  # None: all +1
        diag_cols: torch.Tensor | None = None  # (B, *features) columns sqrt|r_j| e_j
        diag_signs: torch.Tensor | None = None
        out: dict[str, torch.Tensor] = {}
        for i in range(len(layers) - 1, -1, -1):
            layer, a = layers[i], acts[i]
            kind = type(layer)
            if kind in (nn.Linear, nn.Conv2d):
                key = prefix[id(layer)]
                w, bias = weights(layer)
                sq_w, sq_b = (_linear_squares if kind is nn.Linear else _conv_squares)(
                    layer, a, dense, dense_signs, diag_cols, diag_signs, dest.get(f"{key}.weight")
                )
                if sq_w is not None:  # None: written to its destination
                    out[f"{key}.weight"] = sq_w
                if bias is not None:
                    out[f"{key}.bias"] = sq_b if per_sample else sq_b.sum(0)
                if i == 0:
                    break
            elif diag_cols is not None and kind is not nn.Flatten:
                # Diagonal columns meet a layer that mixes or re-weights entries: dense now.
                dense, dense_signs = _with_diagonal(dense, dense_signs, diag_cols, diag_signs)
                diag_cols = diag_signs = None
            if kind in ACTIVATIONS:
                d1, d2 = _derivatives(layer, a)
                dense = dense * d1[:, None]
                if g is not None and d2 is not None:
                    r = g * d2
                    diag_cols, diag_signs = r.abs().sqrt(), torch.sign(r)
                g = None if g is None else g * d1
                continue
            w = weights(layer)[0] if kind in (nn.Linear, nn.Conv2d) else None
            k = dense.shape[1]
            g = None if g is None else _back(layer, w, a, g)
            dense = _back(layer, w, a, dense.reshape(b * k, *dense.shape[2:]))
            dense = dense.reshape(b, k, *dense.shape[1:])
            if diag_cols is not None and kind is nn.Flatten:
                diag_cols = diag_cols.reshape(a.shape)
                diag_signs = diag_signs.reshape(a.shape)  # type: ignore[union-attr]
            elif diag_cols is not None:  # v_j e_j -> v_j J^T e_j: now dense columns
                if kind is nn.Linear:
                    from_diag = diag_cols[:, :, None] * w[None]
                else:
                    eye = torch.diag_embed(diag_cols.reshape(b, -1))  # (B, D, D)
                    d = eye.shape[1]
                    from_diag = _back(layer, w, a, eye.reshape(b * d, *diag_cols.shape[1:]))
                    from_diag = from_diag.reshape(b, d, *a.shape[1:])
                dense, dense_signs = _appended(dense, dense_signs, from_diag, diag_signs)
                diag_cols = diag_signs = None
    if not per_sample:
        return torch.cat([out[k].reshape(-1) for k in names])
    for k, value in out.items():
        dest[k].copy_(value.reshape(b, -1))
    return None


def _apply(layer: nn.Module, params: dict, key: str, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with the values of ``params`` (names ``key.weight``, ``key.bias``)."""
    if type(layer) is nn.Linear:
        return F.linear(x, params[f"{key}.weight"], params.get(f"{key}.bias"))
    if type(layer) is nn.Conv2d:
        w, bias = params[f"{key}.weight"], params.get(f"{key}.bias")
        return F.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation)
    return layer(x)


def _appended(dense, signs, more, more_signs):
    """Columns ``more`` (signs ``more_signs``, ``(B, ...)``) after ``dense`` (signs ``signs``)."""
    b, k = dense.shape[:2]
    base = signs if signs is not None else dense.new_ones(b, k)
    return torch.cat([dense, more], 1), torch.cat([base, more_signs.reshape(b, -1)], 1)


def _with_diagonal(dense, signs, diag_cols, diag_signs):
    """The diagonal columns written out as dense ones (``(B, D, *features)``)."""
    b = dense.shape[0]
    eye = torch.diag_embed(diag_cols.reshape(b, -1)).reshape(b, -1, *diag_cols.shape[1:])
    return _appended(dense, signs, eye, diag_signs)


def _weighted(squares: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """``sum_k s_k squares[:, k]`` (``squares``: ``(B, K, ...)``)."""
    if signs is None:
        return squares.sum(1)
    return torch.einsum("bk...,bk->b...", squares, signs)


def _linear_squares(layer, a, dense, signs, diag_cols, diag_signs, dest):
    """Weight and per-sample bias squares of a Linear layer (``sum_c s_c (u_c a^T)^2``).

    ``dest``: the per-sample weight squares' ``(B, numel)`` destination, written in
    place (the weight's entry is then ``None``); ``None`` for the sum over samples.
    """
    weighted = _weighted(dense * dense, signs)  # (B, out)
    if diag_cols is not None:
        weighted = weighted + diag_signs * diag_cols * diag_cols
    if dest is None:
        return weighted.T @ (a * a), weighted
    b, o = weighted.shape
    torch.mul(weighted[:, :, None], (a * a)[:, None, :], out=dest.view(b, o, a.shape[1]))
    return None, weighted


def _conv_squares(layer, a, dense, signs, diag_cols, diag_signs, dest):
    """Weight and per-sample bias squares of a Conv2d layer.

    Column ``u`` (``(O, P)`` over output positions) has the weight gradient ``u U^T``
    (``U``: the ``(C kh kw, P)`` unfolded patches) and the bias gradient ``u 1``.
    """
    b, k = dense.shape[:2]
    U = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    cols = dense.reshape(b, k, dense.shape[2], -1)  # (B, K, O, P)
    grads = torch.einsum("bkop,bcp->bkoc", cols, U)
    weight = _weighted(grads * grads, signs)  # (B, O, C kh kw)
    sums = cols.sum(3)
    bias = _weighted(sums * sums, signs)  # (B, O)
    if diag_cols is not None:
        r = (diag_signs * diag_cols * diag_cols).reshape(b, cols.shape[2], -1)  # (B, O, P)
        weight = weight + torch.einsum("bop,bcp->boc", r, U * U)
        bias = bias + r.sum(2)
    weight = weight.reshape(b, *layer.weight.shape)
    return (weight if dest is not None else weight.sum(0)), bias
