"""Trace a flat function to an ATen-level ``torch.fx`` graph for sparsity detection.

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

import torch
from torch._decomp import core_aten_decompositions
from torch.func import functionalize
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_leaves

from hesse._validation import fail

_DECOMPOSITIONS = None


def _decompositions() -> dict:
    global _DECOMPOSITIONS
    if _DECOMPOSITIONS is None:
        _DECOMPOSITIONS = dict(core_aten_decompositions())
        # keep detach visible: it has zero derivative, while its decomposition (alias)
        # would pass dependencies through
        _DECOMPOSITIONS.pop(torch.ops.aten.detach.default, None)
    return _DECOMPOSITIONS


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
        gm = make_fx(
            functionalize(flat, remove="mutations"),
            decomposition_table=_decompositions(),
            tracing_mode="fake",
            _allow_non_fake_inputs=True,
        )(x.detach())
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
