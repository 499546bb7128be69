"""Sparsity rules for layer operators: matrix products, convolution, normalisation, pooling.

Same contract as :mod:`hesse.sparsity._rules` (NOTE [pattern representation]); every
rule here registers itself in ``_RULES``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hesse.sparsity._maps import (
    Compose,
    Gather,
    Local,
    Map,
    Matrix,
    Pair,
    State,
    from_pairs,
    groups,
)
from hesse.sparsity._rules import (
    _RULES,
    _dense,
    _group_ids,
    _is_float,
    _numel,
    _shape,
    broadcast_map,
)

# -- matrix products ---------------------------------------------------------------------------

_TRIPLE_LIMIT = 20_000_000


def _bmm(
    A: Any, B: Any, out_meta: Any, extra: list[tuple[State, Map]] | None = None
) -> Local | None:
    """``(b, p, q) @ (b, q, r)``; ``A``/``B`` are States (maybe constant) of those shapes."""
    out_shape = _shape(out_meta)
    bsz, p, q = A.shape if len(A.shape) == 3 else (1, *A.shape)
    r = B.shape[-1]
    deps: list[State] = []
    lin: list[tuple[int, Map]] = []
    pairs: list[Pair] = []
    bi, ii, jj = np.meshgrid(np.arange(bsz), np.arange(p), np.arange(r), indexing="ij")
    maps = {}
    if A.dependent:
        # row (b, i) of A, read by every output (b, i, j)
        gid = np.arange(bsz * p * q) // q
        rowmap = groups(gid, bsz * p)
        maps["A"] = Compose(Gather((bi * p + ii).reshape(-1), bsz * p), rowmap)
        deps.append(A)
        lin.append((len(deps) - 1, maps["A"]))
    if B.dependent:
        e = np.arange(bsz * q * r)
        gid = (e // (q * r)) * r + e % r
        colmap = groups(gid, bsz * r)
        maps["B"] = Compose(Gather((bi * r + jj).reshape(-1), bsz * r), colmap)
        deps.append(B)
        lin.append((len(deps) - 1, maps["B"]))
    if A.dependent and B.dependent:
        if bsz * p * q * r <= _TRIPLE_LIMIT:
            b4, i4, j4, k4 = np.meshgrid(
                np.arange(bsz), np.arange(p), np.arange(r), np.arange(q), indexing="ij"
            )
            ga = Gather(((b4 * p + i4) * q + k4).reshape(-1), bsz * p * q)
            gb = Gather(((b4 * q + k4) * r + j4).reshape(-1), bsz * q * r)
            owner = Gather(((b4 * p + i4) * r + j4).reshape(-1), bsz * p * r)
            pairs.append(Pair(0, ga, 1, gb, owner))
        else:  # coarser but still a superset: all of row i times all of column j
            pairs.append(Pair(0, maps["A"], 1, maps["B"]))
    for s, m in extra or []:
        deps.append(s)
        lin.append((len(deps) - 1, m))
    assert _numel(out_shape) == bsz * p * r, "matrix product: unexpected output size"
    return Local(deps, lin, pairs) if deps else None


def _as3(s: State, shape: tuple[int, ...]) -> State:
    return State(shape=shape, dtype=s.dtype, J=s.J, value=s.value, tainted=s.tainted, key=s.key)


def matmul_rule(name: str, args: tuple, kwargs: dict, out: Any) -> Any:
    if name == "mm":
        return _bmm(args[0], args[1], out)
    if name == "bmm":
        return _bmm(args[0], args[1], out)
    if name in ("addmm", "baddbmm"):
        bias, a, b = args[:3]
        extra = []
        if isinstance(bias, State) and bias.dependent:
            extra.append((bias, broadcast_map(bias.shape, _shape(out))))
        return _bmm(a, b, out, extra)
    if name == "mv":
        a, v = args[:2]
        return _bmm(a, _as3(v, (v.shape[0], 1)), out)
    if name == "dot":
        a, b = args[:2]
        return _bmm(_as3(a, (1, a.shape[0])), _as3(b, (b.shape[0], 1)), out)
    raise AssertionError(name)


# -- convolution -----------------------------------------------------------------------------


def convolution(name: str, args: tuple, kwargs: dict, out: Any) -> Any:
    inp, weight, bias, stride, padding, dilation, transposed, _out_pad, grp = args[:9]
    nd = len(inp.shape) - 2
    if transposed or nd not in (1, 2) or isinstance(padding, str):
        return _dense(f"{name} (transposed or 3-d)", args, kwargs, out)
    oshape = _shape(out)
    N, C = inp.shape[:2]
    n_out = weight.shape[0]
    ksz = tuple(weight.shape[2:])
    if nd == 1:
        ksz, stride, padding, dilation = (
            (1, *ksz),
            (1, stride[0]),
            (0, padding[0]),
            (1, dilation[0]),
        )
    spatial_in = tuple(inp.shape[2:]) if nd == 2 else (1, inp.shape[2])
    Lpos = _numel(oshape[2:])
    kk = _numel(ksz)
    Cg = C // grp
    Og = n_out // grp
    deps: list[State] = []
    lin: list[tuple[int, Map]] = []
    o_of = np.arange(N * n_out * Lpos) // Lpos % n_out
    n_of = np.arange(N * n_out * Lpos) // (n_out * Lpos)
    l_of = np.arange(N * n_out * Lpos) % Lpos
    in_map = w_map = None
    if inp.dependent:
        enc = torch.arange(1, N * C * _numel(spatial_in) + 1, dtype=torch.float64)
        enc = enc.reshape(N, C, *spatial_in)
        cols = torch.nn.functional.unfold(
            enc, ksz, dilation=dilation, padding=padding, stride=stride
        )
        assert cols.shape[-1] == Lpos, "convolution: unexpected output size"
        cols = cols.reshape(N, grp, Cg * kk, Lpos).permute(0, 1, 3, 2)  # (N, G, L, Cg*kk)
        v = cols.reshape(-1).to(torch.int64).numpy() - 1
        term = np.repeat(np.arange(N * grp * Lpos), Cg * kk)
        keep = v >= 0
        L = Matrix(from_pairs(term[keep], v[keep], (N * grp * Lpos, inp.numel)))
        g_of = o_of // Og
        in_map = Compose(Gather((n_of * grp + g_of) * Lpos + l_of, N * grp * Lpos), L)
        deps.append(inp)
        lin.append((len(deps) - 1, in_map))
    if isinstance(weight, State) and weight.dependent:
        rows = groups(np.arange(weight.numel) // (Cg * kk), n_out)
        w_map = Compose(Gather(o_of, n_out), rows)
        deps.append(weight)
        lin.append((len(deps) - 1, w_map))
    if isinstance(bias, State) and bias.dependent:
        deps.append(bias)
        lin.append((len(deps) - 1, Gather(o_of, n_out)))
    pairs = []
    if in_map is not None and w_map is not None:
        pairs.append(Pair(0, in_map, 1, w_map))
    return Local(deps, lin, pairs) if deps else None


# -- normalisation layers -----------------------------------------------------------------


def _normalisation(
    name: str,
    args: tuple,
    kwargs: dict,
    out: Any,
    x: Any,
    gid: np.ndarray,
    ng: int,
    params: list[tuple[Any, np.ndarray, int]],
    nonlinear: bool,
) -> Any:
    """``y = normalise(x over its group) * w[p] + b[p]`` and the group statistics.

    ``gid``: group of each element of ``x``; ``params``: ``(tensor, index of its entry
    for each element of x, its size)``; ``nonlinear``: whether the statistics are
    computed from ``x`` (training) or fixed (evaluation: ``y`` is affine in ``x``).
    """
    deps_params = [(p, idx, m) for p, idx, m in params if isinstance(p, State) and p.dependent]
    if not (isinstance(x, State) and x.dependent):
        if not deps_params:
            return [None] * len(out)
        return _dense(name, args, kwargs, out)
    L = groups(gid, ng)
    res = []
    for i, meta in enumerate(out):
        if not _is_float(meta) or _numel(_shape(meta)) == 0:
            res.append(None)
            continue
        if i == 0:
            xmap: Map = (
                Compose(Gather(gid, ng), L) if nonlinear else broadcast_map(x.shape, x.shape)
            )
            deps, lin = [x], [(0, xmap)]
            pairs = [Pair(0, L, 0, L, owner=groups(gid, ng))] if nonlinear else []
            for k, (p, idx, m) in enumerate(deps_params):
                deps.append(p)
                pm = Gather(idx, m)
                lin.append((len(deps) - 1, pm))
                if k == 0 and p is params[0][0]:  # the scale multiplies the normalised x
                    pairs.append(Pair(0, xmap, len(deps) - 1, pm))
            res.append(Local(deps, lin, pairs))
        elif nonlinear and _numel(_shape(meta)) == ng:  # mean / rstd per group
            res.append(Local([x], [(0, L)], [Pair(0, L, 0, L)]))
        else:
            res.append(None)
    return res


def layer_norm(name: str, args: tuple, kwargs: dict, out: Any) -> Any:
    x, normalized_shape, weight, bias = args[:4]
    k = len(normalized_shape)
    gid, ng = _group_ids(x.shape, list(range(len(x.shape) - k, len(x.shape))))
    per = _numel(normalized_shape)
    idx = np.arange(_numel(x.shape)) % per
    return _normalisation(
        name, args, kwargs, out, x, gid, ng, [(weight, idx, per), (bias, idx, per)], True
    )


def batch_norm(name: str, args: tuple, kwargs: dict, out: Any) -> Any:
    x, weight, bias = args[:3]
    training = args[5] if len(args) > 5 else kwargs.get("training", True)
    if name == "_native_batch_norm_legit_no_training":
        training = False
    elif not isinstance(training, bool):  # an overload with other arguments: assume training
        training = True
    C = x.shape[1] if len(x.shape) > 1 else 1
    dims = [d for d in range(len(x.shape)) if d != 1]
    gid, ng = _group_ids(x.shape, dims)
    chan = gid  # the group of an element is its channel
    return _normalisation(
        name, args, kwargs, out, x, gid, ng, [(weight, chan, C), (bias, chan, C)], bool(training)
    )


def group_norm(name: str, args: tuple, kwargs: dict, out: Any) -> Any:
    x, weight, bias, N, C, HxW, G = args[:7]
    e = np.arange(_numel(x.shape))
    c = (e // HxW) % C
    n = e // (C * HxW)
    gid = n * G + c // (C // G)
    return _normalisation(
        name, args, kwargs, out, x, gid, N * G, [(weight, c, C), (bias, c, C)], True
    )


# -- pooling ----------------------------------------------------------------------------------


def pooling(name: str, args: tuple, kwargs: dict, out: Any) -> Any:
    """Each output reads its window (linear; max-pooling is piecewise linear)."""
    x = args[0]
    kernel = list(args[1])
    stride = list(args[2]) if len(args) > 2 and args[2] else kernel
    padding = list(args[3]) if len(args) > 3 else [0]
    dilation = list(args[4]) if name == "max_pool2d_with_indices" and len(args) > 4 else [1]
    metas = out if isinstance(out, (tuple, list)) else [out]
    oshape = _shape(metas[0])
    if not (isinstance(x, State) and x.dependent) or len(x.shape) not in (3, 4):
        return _dense(name, args, kwargs, out, linear=True)
    shape4 = x.shape if len(x.shape) == 4 else (1, *x.shape)
    N, C, H, W = shape4
    expand = lambda v: v * 2 if len(v) == 1 else v  # noqa: E731
    enc = torch.arange(1, x.numel + 1, dtype=torch.float64).reshape(N * C, 1, H, W)
    cols = torch.nn.functional.unfold(
        enc,
        expand(kernel),
        dilation=expand(dilation),
        padding=expand(padding),
        stride=expand(stride),
    )  # (N*C, kk, L)
    L = cols.shape[-1]
    if N * C * L != _numel(oshape):  # ceil_mode windows: fall back
        return _dense(name, args, kwargs, out, linear=True)
    v = cols.permute(0, 2, 1).reshape(-1).to(torch.int64).numpy() - 1
    term = np.repeat(np.arange(N * C * L), cols.shape[1])
    keep = v >= 0
    local = Local([x], [(0, Matrix(from_pairs(term[keep], v[keep], (N * C * L, x.numel))))])
    if isinstance(out, (tuple, list)):
        return [local] + [None] * (len(out) - 1)
    return local


# -- registration ------------------------------------------------------------------------------

for _n in ("mm", "bmm", "addmm", "baddbmm", "mv", "dot"):
    _RULES[_n] = lambda op, args, kwargs, out, _n=_n: matmul_rule(_n, args, kwargs, out)
_RULES["convolution"] = lambda op, args, kwargs, out: convolution("convolution", args, kwargs, out)
_RULES["native_layer_norm"] = lambda op, a, k, out: layer_norm("native_layer_norm", a, k, out)
_RULES["native_group_norm"] = lambda op, a, k, out: group_norm("native_group_norm", a, k, out)
for _n in (
    "native_batch_norm",
    "_native_batch_norm_legit_functional",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
):
    _RULES[_n] = lambda op, a, k, out, _n=_n: batch_norm(_n, a, k, out)
for _n in ("avg_pool2d", "max_pool2d_with_indices"):
    _RULES[_n] = lambda op, a, k, out, _n=_n: pooling(_n, a, k, out)
