"""The one tracer: functions to ATen-level ``torch.fx`` graphs (sparsity and curvprop).

# NOTE [tracing]
The function is traced with ``make_fx`` in *fake* mode: no arithmetic runs, every
node records the shape and dtype of its result, and Python control flow that
reads a value (``if x.sum() > 0``, ``.item()``, boolean-mask indexing) raises
instead of silently tracing one branch. Such a function has no single global
sparsity pattern: :func:`trace` turns the failure into an error that says so and
offers ``pattern=``. In-place updates are removed by ``functionalize`` so that
every graph node is a pure function of its inputs, and composite operators are
decomposed to the core ATen set, so that a modest number of propagation rules
covers ``matmul``, ``linear``, ``einsum``, losses and the like.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._decomp import core_aten_decompositions, get_decompositions
from torch._decomp.decompositions import native_batch_norm_helper
from torch.func import functionalize
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves

from hesse._attention import math_attention
from hesse._validation import fail

aten = torch.ops.aten


# -- the one tracer (sparsity detection and curvature backpropagation) ----------------------


def make_graph(
    fn: Callable[..., Any], *args: Any, decompositions: dict, functional: bool = True
) -> GraphModule:
    """``fn(*args)`` as a functional ATen graph, traced with fake tensors (NOTE [tracing]).

    The one tracer of hesse: sparsity detection (:func:`trace`) and curvature
    backpropagation (``hesse.curvprop``) both call it, each with its decomposition
    table. Exceptions of the tracing pass through; the callers report them.
    ``functional=False`` traces without functionalisation (the caller then checks
    that the graph has no in-place ops). Attention is traced on its math path
    (NOTE [math attention] in ``hesse/_attention.py``): matmul and softmax nodes.
    """
    with math_attention(), _ConstantMasks():
        return make_fx(
            functionalize(fn, remove="mutations") if functional else fn,
            decomposition_table=decompositions,
            tracing_mode="fake",
            _allow_non_fake_inputs=True,
        )(*args)


class _ConstantMasks(TorchFunctionMode):
    """Indexing with a constant boolean mask (``x[m]``, ``x[m] = v``) as integer indices.

    # NOTE [constant masks]
    Fake tensors cannot count a mask's ``True`` entries, so ``x[m]`` would stop tracing
    as value-dependent. A mask that ``f`` captured as a plain tensor is a constant: its
    indices are computed here, on the real tensor, and the indexing is traced with them
    (indices are structural, NOTE [constants]). A mask computed from the input stays a
    traced tensor and still raises.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
            index = args[1]
            parts = index if isinstance(index, tuple) else (index,)
            if any(_is_constant_mask(p) for p in parts):
                with _disable_current_modes():
                    new = []
                    for p in parts:
                        new.extend(p.nonzero(as_tuple=True) if _is_constant_mask(p) else (p,))
                args = (args[0], tuple(new), *args[2:])
        return func(*args, **kwargs)


def _is_constant_mask(index: Any) -> bool:
    return type(index) is torch.Tensor and index.dtype == torch.bool and index.dim() > 0


def _core() -> dict:
    table = dict(core_aten_decompositions())
    # keep detach visible: it has zero derivative, while its decomposition (alias)
    # would pass dependencies (and curvature) through
    table.pop(aten.detach.default, None)
    return table


def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    # NOTE [curvature families]: written with sum/sub/mul/div so that the variance
    # is made of pointwise and linear nodes (the stock decomposition emits prims).
    dims = list(range(x.dim())) if dim is None or len(dim) == 0 else list(dim)
    n = 1
    for d in dims:
        n *= x.shape[d]
    corr = 1 if correction is None else correction
    mean = aten.sum.dim_IntList(x, dims, True) / n
    centred = x - mean
    var = aten.sum.dim_IntList(centred * centred, dims, keepdim) / max(n - corr, 0)
    if not keepdim:
        mean = aten.squeeze.dims(mean, dims)
    return var, mean


def _var(x, dim=None, *, correction=None, keepdim=False):
    return _var_mean(x, dim, correction=correction, keepdim=keepdim)[0]


def _curvature() -> dict:
    table = _core()
    table.update(
        get_decompositions(
            [
                aten._softmax,
                aten._log_softmax,
                aten.native_layer_norm,
                aten.native_group_norm,
                aten._native_batch_norm_legit_no_training,
                aten.gelu,
                aten.silu,
                aten.mish,
                aten.softplus,
                aten.elu,
                aten.logsumexp,
                aten.mse_loss,
                aten.nll_loss_forward,
                aten.binary_cross_entropy,
                aten.binary_cross_entropy_with_logits,
                aten.huber_loss,
                aten.smooth_l1_loss,
                aten.linalg_vector_norm,
            ]
        )
    )
    table[aten.var_mean.correction] = _var_mean
    table[aten.var.correction] = _var
    # nn.BatchNorm traces to these; left whole, an eval-mode one falls to the dense
    # "general" rule: an (N + 2C)^2 local Hessian per sample, whose float32 eigh can
    # fail to converge on its large null space.
    table[aten.native_batch_norm.default] = _batch_norm_eval
    table[aten._native_batch_norm_legit.default] = _batch_norm_eval
    return table


def _batch_norm_eval(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """Eval-mode batch norm as an affine map of ``x`` times ``weight``; else not decomposed.

    Training mode stays whole (the "general" rule, exact on the batch): decomposed,
    its batch statistics make the signed curvature factors cancel badly in float32.
    """
    if training:
        return NotImplemented
    out, mean, rstd, _, _ = native_batch_norm_helper(
        x, weight, bias, running_mean, running_var, False, momentum, eps, True
    )
    return out, mean, rstd


#: Sparsity detection: the core ATen set (its rules cover softmax, norms and losses whole).
SPARSITY_DECOMPOSITIONS = _core()
#: Curvature backpropagation: composite ops down to the families of NOTE [curvature families].
CURVATURE_DECOMPOSITIONS = _curvature()


_VALUE_DEPENDENT_MARKERS = (
    "data-dependent",
    "data dependent",
    "_local_scalar_dense",
    "DataDependentOutput",
    "DynamicOutputShape",
    "dynamic output shape",
    "GuardOnDataDependent",
)


def _is_value_dependent(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return any(m.lower() in text.lower() for m in _VALUE_DEPENDENT_MARKERS)


def trace(g: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, call: str) -> GraphModule:
    """The ATen graph of ``g`` (a function of one flat tensor ``x``), shapes in ``meta['val']``.

    Raises:
        NotImplementedError: if ``g`` reads values into Python (control flow, ``.item()``,
            data-dependent shapes), or cannot be traced at all.
    """

    def flat(v: torch.Tensor) -> torch.Tensor:  # a plain one-argument function for make_fx
        return g(v)

    try:
        gm = make_graph(flat, x.detach(), decompositions=SPARSITY_DECOMPOSITIONS)
        for node in gm.graph.nodes:
            for val in tree_leaves(node.meta.get("val")):
                if isinstance(val, torch.Tensor) and not all(isinstance(s, int) for s in val.shape):
                    raise RuntimeError(
                        f"data-dependent output shape of {node.target} (a shape depends on values)"
                    )
        return gm
    except Exception as err:  # noqa: BLE001 - any tracing failure is reported the same way
        if str(err).startswith(f"{call}:"):
            raise  # hesse's own validation of f's output, raised while tracing
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        if _is_value_dependent(err):
            fail(
                call,
                "f has value-dependent control flow or shapes (Python reads a tensor value, e.g. "
                "`if x.sum() > 0`, `.item()` or boolean-mask indexing), so the global sparsity "
                "pattern cannot be traced: it could differ from one input to the next. "
                f"({type(err).__name__}: {first}) Fix: pass the pattern yourself with pattern= "
                "(a boolean (n, n) tensor), or rewrite the branch with torch.where.",
                NotImplementedError,
            )
        fail(
            call,
            f"could not trace f to detect its sparsity pattern ({type(err).__name__}: {first}). "
            "Fix: pass the pattern yourself with pattern=, or use the dense path.",
            NotImplementedError,
        )
