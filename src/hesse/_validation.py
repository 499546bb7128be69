"""The one validation layer: every public entry point checks its input here.

# NOTE [error messages]
Every message starts with the call form (``hesse.hessian(f)(x)``), says what was
expected and what was got, and names the fix. ``TypeError`` for the wrong kind of
object, ``ValueError`` for a wrong shape or value, ``NotImplementedError`` for an
unsupported case. Messages are built with :func:`fail` so they read the same
everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from torch.utils._pytree import tree_flatten


def fail(call: str, message: str, exc: type[Exception] = ValueError) -> NoReturn:
    """Raise ``exc`` with a message that starts with the call form."""
    raise exc(f"{call}: {message}")


def call_form(name: str, nargs: int) -> str:
    """The call form of a transform applied to ``nargs`` arguments: ``name(f)(x, y)``."""
    names = ", ".join(["x", "y", "z", "w"][:nargs]) if nargs <= 4 else "*args"
    return f"{name}(f)({names})"


def describe(obj: Any) -> str:
    """A short description of ``obj`` for error messages."""
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return f"an object of type {type(obj).__name__}"


def normalize_argnums(call: str, argnums: int | Sequence[int], nargs: int) -> tuple[int, ...]:
    """Check ``argnums`` against the number of positional arguments; return a tuple."""
    items = (argnums,) if isinstance(argnums, int) else argnums
    if isinstance(argnums, bool) or not isinstance(items, (tuple, list)) or not items:
        fail(
            call,
            f"expected argnums to be an int or a non-empty tuple of ints, got {argnums!r}.",
            TypeError,
        )
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, int):
            fail(call, f"expected argnums to hold ints, got {a!r}.", TypeError)
        if not -nargs <= a < nargs:
            fail(
                call,
                f"argnums={argnums!r} is out of range: f was called with {nargs} positional "
                f"argument(s), so argnums must lie in [{-nargs}, {nargs - 1}].",
            )
        out.append(a % nargs)
    if len(set(out)) != len(out):
        fail(call, f"argnums={argnums!r} repeats an argument; list each argument once.")
    return tuple(out)


def check_differentiable_leaves(call: str, tree: Any, what: str = "argument") -> list[torch.Tensor]:
    """Every leaf of ``tree`` must be a real floating-point tensor; return the leaves."""
    if isinstance(tree, torch.Tensor) and tree.is_floating_point():  # one valid tensor
        return [tree]
    leaves, _ = tree_flatten(tree)
    if not leaves:
        fail(call, f"expected the differentiated {what} to hold at least one tensor, got none.")
    dtype = None
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            fail(
                call,
                f"expected the differentiated {what} to be a tensor (or a tuple/dict of "
                f"tensors), got {describe(leaf)}. Pass non-tensor arguments at positions not "
                "listed in argnums.",
                TypeError,
            )
        if leaf.is_complex():
            fail(
                call,
                f"expected a real floating-point tensor, got {describe(leaf)}. Complex Hessians "
                "are not supported: split the input into real and imaginary parts "
                "(torch.view_as_real) and differentiate with respect to those.",
                NotImplementedError,
            )
        if not leaf.is_floating_point():
            fail(
                call,
                f"expected a floating-point tensor, got {describe(leaf)}. Derivatives with "
                "respect to integer or bool tensors are not defined: convert it with "
                ".double() or .float().",
                TypeError,
            )
        if dtype is None:
            dtype = leaf.dtype
        elif leaf.dtype != dtype:
            fail(
                call,
                f"expected every differentiated tensor to share one dtype, got {dtype} and "
                f"{leaf.dtype}. Cast them to a common dtype first.",
                TypeError,
            )
    return leaves


def check_scalar_output(call: str, out: Any) -> torch.Tensor:
    """``f`` must return a real scalar tensor."""
    if not isinstance(out, torch.Tensor):
        fail(
            call,
            f"expected f to return a scalar tensor, got {describe(out)}. Return a tensor "
            "(use has_aux-style wrapping outside hesse for extra outputs).",
            TypeError,
        )
    if out.numel() != 1:
        fail(
            call,
            f"expected f to return a scalar tensor, got shape {tuple(out.shape)}. Reduce it "
            "(e.g. .sum()) or use torch.func.jacrev for vector outputs.",
        )
    if not out.is_floating_point():
        fail(call, f"expected f to return a floating-point scalar, got {describe(out)}.", TypeError)
    return out


def check_chunk_size(call: str, chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        fail(call, f"chunk_size should be a positive int or None, got {chunk_size!r}.")


def check_memory_budget(call: str, memory_budget: int | float | None) -> None:
    if memory_budget is None:
        return
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        fail(call, f"memory_budget should be a number of bytes, got {memory_budget!r}.", TypeError)
    if memory_budget <= 0:
        fail(call, f"memory_budget should be positive, got {memory_budget!r}.")


def check_choice(call: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        fail(call, f"{name} should be one of {options}, got {value!r}.")


def check_generator(call: str, generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        fail(
            call,
            f"expected generator to be a torch.Generator or None, got {describe(generator)}. "
            "Create one with torch.Generator().manual_seed(0).",
            TypeError,
        )
