"""Public function transforms: the dense Hessian and Hessian-vector products."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from hesse._chunking import default_memory_budget, format_bytes
from hesse._flat import Flat
from hesse._hvp import FlatHVP, tensor_rows
from hesse._validation import call_form, check_chunk_size, check_memory_budget, describe, fail


def hessian(
    f: Callable[..., torch.Tensor],
    argnums: int | tuple[int, ...] = 0,
    *,
    chunk_size: int | None = None,
    memory_budget: int | float | None = None,
    mode: str = "auto",
) -> Callable[..., Any]:
    """The dense Hessian of a scalar function, as a function transform.

    ``hessian(f, argnums)(*args)`` returns exactly what
    ``torch.func.hessian(f, argnums)(*args)`` returns (tensors of any shape, tuples of
    arguments, dicts of parameters), computed as ``n`` Hessian-vector products with
    the basis vectors, vectorised in chunks that fit ``memory_budget``.

    .. math:: H_{ij} = \\partial^2 f / \\partial x_i \\partial x_j

    Args:
        f: a function returning a real scalar tensor.
        argnums: which positional arguments to differentiate (int or tuple).
        chunk_size: basis vectors per vectorised pass. ``None`` sizes chunks from
            ``memory_budget`` using the measured allocation of one product.
        memory_budget: bytes the result plus one chunk may use. Default: half the
            free memory of the device.
        mode: ``"auto"`` (reverse-over-reverse through a gradient graph built once,
            raced against forward-over-reverse on large jobs, each strategy falling
            back to the other where it fails), ``"forward-over-reverse"`` or
            ``"reverse-over-reverse"``. See NOTE [strategies] in ``hesse/_hvp.py``.

    Returns:
        A function of ``*args`` returning the Hessian in ``torch.func.hessian``'s
        structure: block ``[i][j]`` has shape ``shape_i + shape_j``.

    Raises:
        MemoryError: before any work, if the ``n x n`` result exceeds ``memory_budget``.
        ValueError, TypeError, NotImplementedError: for bad input (see messages).

    Cost: ``n`` HVPs (each about 2-4 gradients) in ``ceil(n / chunk_size)`` passes;
    memory ``n^2`` for the result plus one chunk.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> hessian(lambda x: x @ A @ x)(torch.ones(2, dtype=torch.float64))
        tensor([[4., 1.],
                [1., 6.]], dtype=torch.float64)
    """

    def wrapped(*args: Any) -> Any:
        call = call_form("hesse.hessian", len(args))
        check_chunk_size(call, chunk_size)
        check_memory_budget(call, memory_budget)
        engine = FlatHVP(f, args, argnums, call=call, mode=mode)
        n = engine.n
        itemsize = engine.x.element_size()
        result_bytes = n * n * itemsize
        budget = memory_budget or default_memory_budget(engine.x.device, needed=result_bytes)
        if result_bytes > budget:
            fail(
                call,
                f"the dense Hessian has {n} x {n} entries ({format_bytes(result_bytes)} in "
                f"{engine.x.dtype}), more than the memory budget of {format_bytes(budget)}. "
                "Use a structured alternative: hesse.sparse_hessian (sparse Hessians), "
                "hesse.hessian_diagonal (the diagonal only) or hesse.hessian_operator "
                "(matrix-free products), or raise memory_budget if the memory is there.",
                MemoryError,
            )
        out = engine.apply(
            n,
            None,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            fixed_bytes=result_bytes,
        )
        return engine.flat.unflatten_blocks(out)

    return wrapped


def hvp(
    f: Callable[..., torch.Tensor],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    batched: bool = False,
    chunk_size: int | None = None,
    mode: str = "auto",
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Gradient and Hessian-vector product, with ``torch.func.jvp``'s calling convention.

    Every argument in ``primals`` is differentiated; ``tangents`` has the same
    structure. With ``batched=True`` every tangent leaf carries a leading batch
    dimension of ``k`` vectors, all computed in one vectorised pass (chunked by
    ``chunk_size``).

    Args:
        f: a function returning a real scalar tensor.
        primals: tuple of the arguments of ``f`` (tensors, or tuples/dicts of tensors).
        tangents: tuple shaped like ``primals`` (with a leading ``k`` if ``batched``).
        batched: whether tangents carry a leading batch of vectors.
        chunk_size: vectors per vectorised pass when batched (default: all).
        mode: as in :func:`hessian`.

    Returns:
        ``(gradient, hvp)``: both shaped like ``primals``; ``hvp`` leaves gain the
        leading ``k`` when batched.

    Cost: one forward-over-reverse pass (about 2-4 gradients) per chunk of vectors.

    Example:
        >>> x = torch.tensor([1.0, 2.0])
        >>> hvp(lambda x: (x**3).sum(), (x,), (torch.ones(2),))[1]
        (tensor([ 6., 12.]),)
    """
    call = "hesse.hvp(f, primals, tangents)"
    if not isinstance(primals, tuple):
        fail(
            call,
            f"expected primals to be a tuple, got {describe(primals)}. Wrap it: (x,).",
            TypeError,
        )
    if not isinstance(tangents, tuple):
        fail(
            call,
            f"expected tangents to be a tuple, got {describe(tangents)}. Wrap it: (v,).",
            TypeError,
        )
    engine = FlatHVP(f, primals, tuple(range(len(primals))), call=call, mode=mode)
    flat = engine.flat
    t_leaves, t_spec = tree_flatten(tangents)
    if t_spec != flat.spec:
        fail(
            call, f"expected tangents to have the structure of primals ({flat.spec}), got {t_spec}."
        )
    lead = None
    for t, shape in zip(t_leaves, flat.shapes):
        if not isinstance(t, torch.Tensor):
            fail(call, f"expected every tangent to be a tensor, got {describe(t)}.", TypeError)
        expected = tuple(shape)
        got = tuple(t.shape)
        if batched:
            if len(got) != len(expected) + 1 or got[1:] != expected:
                fail(
                    call,
                    f"with batched=True expected a tangent of shape (k, *{expected}), got "
                    f"{got}. Stack the vectors along a new leading dimension.",
                )
            if lead is None:
                lead = got[0]
            elif got[0] != lead:
                fail(call, f"batched tangents disagree on the batch size: {lead} and {got[0]}.")
        elif got != expected:
            hint = " Pass batched=True for a batch of vectors." if got[1:] == expected else ""
            fail(call, f"expected a tangent of shape {expected}, got {got}.{hint}")
        if t.dtype != flat.dtype:
            fail(call, f"expected tangents of dtype {flat.dtype}, got {t.dtype}.", TypeError)
    if batched:
        vs = Flat.flatten_batched(flat, tangents)
        k = vs.shape[0]
        out = engine.apply(k, tensor_rows(vs), chunk_size=chunk_size or max(k, 1))
        hv = flat.unflatten(out)
    else:
        vs = flat.flatten(tangents).unsqueeze(0)
        out = engine.apply(1, tensor_rows(vs), chunk_size=1)
        hv = flat.unflatten(out[0])
    gradient = flat.unflatten(engine.gradient)
    return gradient, hv
