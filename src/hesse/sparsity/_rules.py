"""One sparsity-propagation rule per family of ATen operators.

A rule receives the operator, its arguments (tensors replaced by
:class:`~hesse.sparsity._maps.State`) and the shapes of its outputs, and returns
the :class:`~hesse.sparsity._maps.Local` structure of each output: which input
elements every output element reads (first order) and which pairs of input
elements it couples nonlinearly (second order). See NOTE [pattern representation].

# NOTE [piecewise-linear operators]
``relu``, ``abs``, ``clamp``, ``maximum``/``minimum``, ``hardtanh``, ``leaky_relu``,
``amax``/``max``, sorting and max-pooling are piecewise linear: autograd gives
them an identically zero second derivative (their backward multiplies by a mask
or selects an element, and the mask has zero derivative), so they add no
second-order pairs here. The pattern is therefore the pattern of the Hessian
that autograd (``torch.func.hessian``) computes, everywhere; at the kinks
themselves the classical Hessian does not exist. They still propagate first-order
dependencies, so any nonlinearity applied after them is accounted for.

# NOTE [constants]
Floating-point constants captured by ``f`` (weights, targets) are treated as
*dense*: a zero entry in a weight matrix does not remove a dependency, because
the pattern must stay valid when the user updates that weight and reuses it.
Integer constants (indices) are structural and are used by value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from hesse.sparsity._maps import (
    Compose,
    Gather,
    Identity,
    Local,
    Map,
    Matrix,
    Pair,
    State,
    everything,
    from_pairs,
    groups,
)

aten = torch.ops.aten


class DenseRuleWarning(UserWarning):
    """An operator without a sparsity rule was treated as dense (correct, but coarse)."""


Rule = Callable[[Any, tuple, dict, Any], Any]
_RULES: dict[str, Rule] = {}
_WARNED: set[str] = set()


def _register(*names: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for name in names:
            _RULES[name] = fn
        return fn

    return deco


def op_name(op: Any) -> str:
    """``aten.add.Tensor`` -> ``"add"`` (the overload packet name)."""
    name = getattr(op, "__name__", str(op))
    try:
        return op._schema.name.split("::")[-1]
    except AttributeError:
        return name.split(".")[0]


# -- helpers ----------------------------------------------------------------------------


def _states(obj: Any) -> list[State]:
    out: list[State] = []
    if isinstance(obj, State):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            out.extend(_states(o))
    elif isinstance(obj, dict):
        for o in obj.values():
            out.extend(_states(o))
    return out


def _shape(meta: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in meta.shape)


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _is_float(meta: Any) -> bool:
    return isinstance(meta, torch.Tensor) and (meta.is_floating_point() or meta.is_complex())


def broadcast_map(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Map:
    n_in = _numel(in_shape)
    if tuple(in_shape) == tuple(out_shape):
        return Identity(n_in)
    idx = torch.arange(n_in).reshape(in_shape).expand(out_shape).reshape(-1).numpy()
    return Gather(idx, n_in)


def _dense(name: str, args: tuple, kwargs: dict, out: Any, *, linear: bool = False) -> Any:
    """Every output element reads every input element (nonlinearly unless ``linear``)."""
    if not linear and name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"hesse sparsity: no rule for aten.{name}; treating it as dense (every output "
            "element depends nonlinearly on every input element). The pattern stays "
            "correct but may be much denser than necessary.",
            DenseRuleWarning,
            stacklevel=4,
        )
    deps = [s for s in _states((args, kwargs)) if s.dependent]

    def one(meta: Any) -> Local | None:
        if not _is_float(meta) or not deps:
            return None
        m = _numel(_shape(meta))
        lin = [(k, everything(m, s.numel)) for k, s in enumerate(deps)]
        pairs = []
        if not linear:
            owner = everything(1, m)
            for a in range(len(deps)):
                for b in range(a, len(deps)):
                    pairs.append(
                        Pair(
                            a, everything(1, deps[a].numel), b, everything(1, deps[b].numel), owner
                        )
                    )
        return Local(deps, lin, pairs)

    if isinstance(out, (tuple, list)):
        return [one(o) for o in out]
    return one(out)


def _norm_dims(dims: Any, ndim: int) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % max(ndim, 1) for d in dims})


def _group_ids(shape: tuple[int, ...], dims: list[int]) -> tuple[np.ndarray, int]:
    """For each element of ``shape``, the id of its group when ``dims`` are reduced."""
    kd = tuple(1 if d in dims else s for d, s in enumerate(shape))
    ng = _numel(kd)
    gid = (
        torch.arange(ng).reshape(kd).expand(shape).reshape(-1).numpy()
        if shape
        else np.zeros(1, np.int64)
    )
    return gid, ng


# -- pointwise --------------------------------------------------------------------------

# Linear in every tensor argument (or piecewise linear: NOTE [piecewise-linear operators]).
# fmt: off
LINEAR_POINTWISE = {
    "add", "sub", "rsub", "neg", "clone", "_to_copy", "positive", "where", "relu", "abs",
    "clamp", "clamp_min", "clamp_max", "hardtanh", "leaky_relu", "maximum", "minimum", "fmax",
    "fmin", "masked_fill", "nan_to_num", "frac", "fill", "conj", "real", "_conj",
    "resolve_conj", "resolve_neg", "relu6", "threshold", "view_as_real", "copysign_",
}
# fmt: on
# Derivative zero wherever it exists (and zero in autograd).
# fmt: off
ZERO_POINTWISE = {
    "eq", "ne", "lt", "le", "gt", "ge", "sign", "sgn", "floor", "ceil", "round", "trunc",
    "isnan", "isinf", "isfinite", "isneginf", "isposinf", "logical_and", "logical_or",
    "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor",
    "signbit", "heaviside", "detach", "isclose",
}
# fmt: on


def _constant_mask(cond: Any) -> np.ndarray | None:
    """The values of a boolean mask that does not depend on x, else ``None``."""
    if isinstance(cond, State) and not cond.tainted and isinstance(cond.value, torch.Tensor):
        return cond.value.to(torch.bool).numpy()
    return None


def where(args: tuple, kwargs: dict, out: Any) -> Local | None:
    """``where(cond, a, b)``: with a constant ``cond`` each element reads one branch only.

    Index assignment (``g[i] = v``, ``masked_fill``) decomposes to ``where`` with a
    mask built from ``arange``; reading the mask keeps such code's pattern exact
    (NOTE [constants]: boolean and integer constants are structural). A mask that
    depends on x (or is unknown) selects either branch: both are read.
    """
    if not _is_float(out):
        return None
    cond = args[0] if args else kwargs.get("condition")
    mask = _constant_mask(cond)
    if mask is None:
        return pointwise("where", args, kwargs, out)
    out_shape = _shape(out)
    mask = np.broadcast_to(mask, out_shape).reshape(-1)
    branches = list(args[1:3])
    deps: list[State] = []
    idx: list[np.ndarray] = []
    for pick, s in zip((mask, ~mask), branches):
        if not (isinstance(s, State) and s.dependent):
            continue
        read = broadcast_map(s.shape, out_shape)
        full = read.idx if isinstance(read, Gather) else np.arange(s.numel, dtype=np.int64)
        chosen = np.where(pick, full, -1)
        if deps and deps[0] is s:  # where(m, x, x)
            idx[0] = np.maximum(idx[0], chosen)
        else:
            deps.append(s)
            idx.append(chosen)
    lin = [(k, Gather(i, s.numel)) for k, (s, i) in enumerate(zip(deps, idx)) if (i >= 0).any()]
    return Local(deps, lin) if lin else None


def pointwise(name: str, args: tuple, kwargs: dict, out: Any) -> Local | None:
    if name in ZERO_POINTWISE or not _is_float(out):
        return None
    out_shape = _shape(out)
    tensors = _states((args, kwargs))
    deps = [s for s in tensors if s.dependent]
    if not deps:
        return None
    maps = [broadcast_map(s.shape, out_shape) for s in deps]
    lin = list(enumerate(maps))
    pairs: list[Pair] = []
    if name in LINEAR_POINTWISE:
        pass
    elif name == "mul":
        # bilinear: only products of two different factors couple
        if len(deps) == 2:
            pairs.append(Pair(0, maps[0], 1, maps[1]))
        elif len(tensors) == 2 and tensors[0] is tensors[1]:
            pairs.append(Pair(0, maps[0], 0, maps[0]))
    elif name == "div":
        den = args[1] if len(args) >= 2 else kwargs.get("other")
        if isinstance(den, State) and den.dependent:
            d = deps.index(den)
            for a in range(len(deps)):
                pairs.append(Pair(a, maps[a], d, maps[d]))
        # a dependent numerator over a constant denominator is linear
    else:
        for a in range(len(deps)):
            for b in range(a, len(deps)):
                pairs.append(Pair(a, maps[a], b, maps[b]))
    # the same State passed twice counts once in deps; mul(x, x) is handled above
    return Local(deps, lin, pairs)


# -- data movement: run the operator on an index tensor -----------------------------------

# fmt: off
SELECTION = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "slice", "select",
    "squeeze", "unsqueeze", "flip", "roll", "repeat", "diagonal", "narrow", "unfold", "cat",
    "stack", "split", "split_with_sizes", "chunk", "unbind", "slice_scatter", "select_scatter",
    "diagonal_scatter", "index_select", "gather", "index", "_unsafe_index", "constant_pad_nd",
    "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
    "replication_pad2d", "replication_pad3d", "movedim", "view_copy", "permute_copy",
    "expand_copy", "slice_copy", "select_copy", "squeeze_copy", "unsqueeze_copy",
    "transpose_copy", "t_copy", "diagonal_copy", "alias_copy", "unfold_copy", "split_copy",
    "split_with_sizes_copy", "unbind_copy", "embedding", "index_fill", "take", "_reshape_alias",
    "expand_as", "clone_", "contiguous", "tril", "triu", "masked_scatter", "im2col", "alias",
    "copy", "lift_fresh_copy",
}
# fmt: on


def _encode(args: Any, deps: list[State], offsets: dict[int, int]) -> tuple[Any, bool]:
    """Replace tensors by index encodings; report whether an index was unknown."""
    unknown = False

    def enc(a: Any) -> Any:
        nonlocal unknown
        if isinstance(a, State):
            if a.dependent:
                o = offsets[a.key]
                return torch.arange(o + 1, o + 1 + a.numel, dtype=torch.float64).reshape(a.shape)
            if a.dtype.is_floating_point or a.dtype.is_complex:
                return torch.zeros(a.shape, dtype=torch.float64)
            if a.value is None:
                unknown = True
                return torch.zeros(a.shape, dtype=a.dtype)
            return a.value
        if isinstance(a, float):
            return 0.0  # fill values (padding, scatter) carry no dependency
        if isinstance(a, (list, tuple)):
            return type(a)(enc(b) for b in a)
        return a

    return enc(args), unknown


def selection(op: Any, name: str, args: tuple, kwargs: dict, out: Any) -> Any:
    deps = [s for s in _states((args, kwargs)) if s.dependent]
    if not deps:
        return None
    offsets, total = {}, 0
    for s in deps:
        offsets[s.key] = total
        total += s.numel
    (eargs, ekwargs), unknown = _encode((args, kwargs), deps, offsets)
    if unknown:  # index values depend on x: any element may be read
        return _dense(name, args, kwargs, out, linear=True)
    if total >= 2**53:
        return _dense(name, args, kwargs, out, linear=True)
    if "dtype" in ekwargs:
        ekwargs = {**ekwargs, "dtype": torch.float64}
    res = op(*eargs, **ekwargs)

    def one(val: Any, meta: Any) -> Local | None:
        if not _is_float(meta):
            return None
        v = val.reshape(-1).to(torch.int64).numpy() - 1
        lin = []
        for k, s in enumerate(deps):
            o = offsets[s.key]
            idx = np.where((v >= o) & (v < o + s.numel), v - o, -1)
            if (idx >= 0).any():
                lin.append((k, Gather(idx, s.numel)))
        return Local(deps, lin) if lin else None

    if isinstance(res, (tuple, list)):
        return [one(r, m) for r, m in zip(res, out)]
    return one(res, out)


# -- accumulating scatters (linear sums) ---------------------------------------------------


def _positions_rule(
    self_: State, src: State | None, pos: np.ndarray, src_idx: np.ndarray, out
) -> Local | None:
    deps, lin = [], []
    n_out = _numel(_shape(out))
    if isinstance(self_, State) and self_.dependent:
        deps.append(self_)
        lin.append((0, Identity(n_out)))
    if isinstance(src, State) and src.dependent:
        deps.append(src)
        lin.append((len(deps) - 1, Matrix(from_pairs(pos, src_idx, (n_out, src.numel)))))
    return Local(deps, lin) if deps else None


def scatter_add(name: str, args: tuple, kwargs: dict, out: Any) -> Any:
    self_, dim, index, src = args[:4]
    if isinstance(index, State) and index.value is None:
        return _dense(name, args, kwargs, out, linear=True)
    idx = index.value
    shape = _shape(out)
    dim = dim % max(len(shape), 1)
    pos = torch.gather(torch.arange(_numel(shape)).reshape(shape), dim, idx).reshape(-1).numpy()
    src_shape = src.shape if isinstance(src, State) else shape
    sidx = torch.arange(_numel(src_shape)).reshape(src_shape)
    sidx = sidx[tuple(slice(0, s) for s in idx.shape)].reshape(-1).numpy()
    return _positions_rule(self_, src if isinstance(src, State) else None, pos, sidx, out)


def index_put(op: Any, name: str, args: tuple, kwargs: dict, out: Any) -> Any:
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    if not accumulate:
        return selection(op, name, args, kwargs, out)
    self_, indices, values = args[:3]
    if any(isinstance(i, State) and i.value is None for i in indices):
        return _dense(name, args, kwargs, out, linear=True)
    shape = _shape(out)
    ar = torch.arange(_numel(shape)).reshape(shape)
    real = [None if i is None else i.value for i in indices]
    pos_t = ar[tuple(slice(None) if i is None else i for i in real)]
    vshape = values.shape if isinstance(values, State) else ()
    vidx = torch.arange(_numel(vshape)).reshape(vshape).expand(pos_t.shape).reshape(-1).numpy()
    return _positions_rule(
        self_, values if isinstance(values, State) else None, pos_t.reshape(-1).numpy(), vidx, out
    )


# -- reductions ------------------------------------------------------------------------------

# fmt: off
LINEAR_REDUCTIONS = {
    "sum", "mean", "amax", "amin", "max", "min", "nansum", "nanmean", "median", "nanmedian",
}
# fmt: on
# fmt: off
NONLINEAR_REDUCTIONS = {
    "prod", "logsumexp", "var", "std", "norm", "linalg_vector_norm", "var_mean", "std_mean",
}
# fmt: on


def reduction(name: str, args: tuple, kwargs: dict, out: Any) -> Any:
    x = args[0]
    if len(args) > 1 and isinstance(args[1], State):  # max.other / min.other: elementwise
        return pointwise("maximum", args, kwargs, out)
    if not isinstance(x, State) or not x.dependent:
        return None
    dims: Any = None
    if name in ("var", "std", "var_mean", "std_mean"):
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
    elif name == "linalg_vector_norm":
        dims = args[2] if len(args) > 2 else kwargs.get("dim")
    elif name == "norm":
        dims = args[2] if len(args) > 2 else kwargs.get("dim")
    elif len(args) > 1 and not isinstance(args[1], (bool, torch.dtype)):
        dims = args[1]
    else:
        dims = kwargs.get("dim")
    ndim = len(x.shape)
    dl = _norm_dims(dims, ndim)
    gid, ng = _group_ids(x.shape, dl)
    L = groups(gid, ng)
    nonlinear = name in NONLINEAR_REDUCTIONS

    def one(meta: Any) -> Local | None:
        if not _is_float(meta):
            return None
        assert _numel(_shape(meta)) == ng, f"reduction {name}: unexpected output size"
        pairs = [Pair(0, L, 0, L)] if nonlinear else []
        return Local([x], [(0, L)], pairs)

    if isinstance(out, (tuple, list)):
        return [one(o) for o in out]
    return one(out)


def along_dim(name: str, args: tuple, kwargs: dict, out: Any) -> Any:
    """Softmax-like: every element reads its whole line along ``dim``."""
    x = args[0]
    if not isinstance(x, State) or not x.dependent:
        return None
    if name in ("topk", "kthvalue"):
        dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
    else:
        dim = args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("dim", -1)
    ndim = len(x.shape)
    if ndim == 0:
        dl = []
    else:
        dl = [dim % ndim]
    gid, ng = _group_ids(x.shape, dl)
    L = groups(gid, ng)
    nonlinear = name in ("_softmax", "_log_softmax", "cumprod", "logcumsumexp")

    def one(meta: Any) -> Local | None:
        if not _is_float(meta):
            return None
        oshape = _shape(meta)
        if oshape == x.shape:
            ogid = gid
        else:  # topk / sort returning fewer elements along dim
            ogid, _ = _group_ids(oshape, dl)
        m = Compose(Gather(ogid, ng), L)
        pairs = [Pair(0, L, 0, L, owner=groups(ogid, ng))] if nonlinear else []
        return Local([x], [(0, m)], pairs)

    if isinstance(out, (tuple, list)):
        return [one(o) for o in out]
    return one(out)


# -- dispatch ----------------------------------------------------------------------------------

for _n in LINEAR_REDUCTIONS | NONLINEAR_REDUCTIONS:
    _RULES[_n] = lambda op, args, kwargs, out, _n=_n: reduction(_n, args, kwargs, out)
for _n in ("_softmax", "_log_softmax", "cumsum", "cumprod", "logcumsumexp", "sort", "topk"):
    _RULES[_n] = lambda op, args, kwargs, out, _n=_n: along_dim(_n, args, kwargs, out)
for _n in SELECTION:
    _RULES[_n] = lambda op, args, kwargs, out, _n=_n: selection(op, _n, args, kwargs, out)
for _n in LINEAR_POINTWISE | {"mul", "div"}:
    _RULES[_n] = lambda op, args, kwargs, out, _n=_n: pointwise(_n, args, kwargs, out)
_RULES["where"] = lambda op, args, kwargs, out: where(args, kwargs, out)
for _n in ("scatter_add", "scatter_reduce"):
    _RULES[_n] = lambda op, args, kwargs, out, _n=_n: (
        scatter_add(_n, args, kwargs, out)
        if _n == "scatter_add" or (len(args) > 4 and args[4] in ("sum", "mean"))
        else _dense(_n, args, kwargs, out, linear=True)
    )
_RULES["index_put"] = lambda op, args, kwargs, out: index_put(op, "index_put", args, kwargs, out)
_RULES["scatter"] = lambda op, args, kwargs, out: (
    selection(op, "scatter", args, kwargs, out)
    if "reduce" not in kwargs and len(args) <= 4
    else _dense("scatter", args, kwargs, out, linear=True)
)
