"""Dispatch: the rule of an ATen operator (one per family, :mod:`._rules` and :mod:`._layers`).

Importing this module registers every rule; the rule modules import only helpers from
:mod:`._rules`, so there is no import cycle.
"""

from __future__ import annotations

from typing import Any

import torch

from hesse.sparsity import _layers  # noqa: F401 - registers the layer rules
from hesse.sparsity._rules import _RULES, ZERO_POINTWISE, _dense, op_name, pointwise

# Operators whose result does not depend on the values of their tensor arguments.
# fmt: off
VALUE_FREE = {
    "full_like", "zeros_like", "ones_like", "empty_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_full", "new_empty", "new_empty_strided",
    "scalar_tensor", "full", "zeros", "ones", "empty", "empty_strided", "arange", "linspace",
    "eye", "rand", "randn", "randint", "randperm", "empty_permuted", "sym_size", "sym_numel",
    "sym_stride", "_assert_async", "_assert_scalar",
}
# fmt: on
# fmt: off
ZERO_OPS = {
    "argmax", "argmin", "any", "all", "bucketize", "searchsorted", "_assert_tensor_metadata",
    "_local_scalar_dense",
}
# fmt: on


def is_inplace(op: Any) -> bool:
    """Whether ``op`` writes into its first argument (``add_``, ``squeeze_``, ``copy_``)."""
    try:
        first = op._schema.arguments[0]
    except (AttributeError, IndexError):
        return False
    return first.alias_info is not None and first.alias_info.is_write


def apply_rule(op: Any, args: tuple, kwargs: dict, out: Any) -> Any:
    """The :class:`Local` (or list of them, for tuple outputs) of ``op``; ``None`` = no dependency."""
    name = op_name(op)
    if is_inplace(op) and name.endswith("_"):
        name = name[:-1]  # the in-place form follows its out-of-place rule
    if name in ZERO_OPS or name in ZERO_POINTWISE:
        return [None] * len(out) if isinstance(out, (tuple, list)) else None
    rule = _RULES.get(name)
    if rule is not None:
        return rule(op, args, kwargs, out)
    if name != op_name(op):
        base = getattr(getattr(torch.ops.aten, name, None), "default", None)
        tags = getattr(base, "tags", ())
        if torch.Tag.pointwise in tags and not isinstance(out, (tuple, list)):
            return pointwise(name, args, kwargs, out)
    tags = getattr(op, "tags", ())
    if torch.Tag.pointwise in tags and not isinstance(out, (tuple, list)):
        return pointwise(name, args, kwargs, out)
    return _dense(name, args, kwargs, out)


def has_rule(name: str) -> bool:
    return name in _RULES
