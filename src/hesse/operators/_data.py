"""The one place where data for model operators is accepted, checked and normalised.

# NOTE [data forms]
Every model operator (Hessian, GGN, Fisher, their data-parallel versions, and any
later one) and ``hesse analyze`` pass the user's ``data`` through
:func:`as_batches`, which returns a re-iterable :class:`Batches` of ``(inputs,
targets)`` pairs. Accepted:

* a list (or tuple) of ``(inputs, targets)`` batches;
* one ``(inputs, targets)`` pair, taken as a single batch. The rule that tells it
  from a list of two batches: a batch is never a bare tensor, and targets are
  tensors, so a 2-tuple or 2-list whose second element is a tensor is one batch
  (``(X, y)``, ``[X, y]``, ``((x1, x2), y)``, ``({"input_ids": ...}, y)``), and
  its inputs must have as many rows as the targets (else it is refused, naming
  both readings); anything else of length 2 is a list of two batches;
* a ``torch.utils.data.DataLoader`` that does not shuffle, or any re-iterable
  collection of batches (an object whose ``__iter__`` starts a fresh pass).

``inputs`` is a tensor (``model(inputs)``), a tuple or list of them
(``model(*inputs)``) or a dict of them (``model(**inputs)``, as Hugging Face
models take ``input_ids`` and ``attention_mask``); see :func:`model_arguments`.

Refused, with the fix: a bare tensor (pass ``[(X, y)]``), a one-shot iterator or
generator (every product walks the data again), a shuffling ``DataLoader`` (every
product would see other batches), empty data, a batch that is not a pair, and,
with ``check_deterministic=True``, data whose batches differ between two passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import zip_longest
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from hesse._validation import describe, fail

Batch = tuple[Any, Any]

_HINT = "pass a list of (inputs, targets) batches, e.g. [(X, y)] for a single batch"


def check_reiterable(call: str, data: Any) -> None:
    """Refuse what cannot be walked again: non-iterables and one-shot iterators."""
    if isinstance(data, torch.Tensor):
        fail(
            call,
            f"expected a collection of (inputs, targets) batches, got {describe(data)}. A "
            f"tensor is not a collection of batches: {_HINT}.",
            TypeError,
        )
    try:
        one_shot = iter(data) is data
    except TypeError:
        fail(
            call,
            f"expected an iterable of (inputs, targets) batches, got {describe(data)}.",
            TypeError,
        )
    if one_shot:
        fail(
            call,
            f"data is a one-shot iterator ({describe(data)}), but every product walks the "
            "data again. Pass list(data), or the DataLoader itself.",
            TypeError,
        )


def _rows(obj: Any) -> int | None:
    leaves = [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
    return int(leaves[0].shape[0]) if leaves else None


def _single_pair(call: str, data: Any) -> bool:
    """Whether ``data`` is one ``(inputs, targets)`` pair (NOTE [data forms])."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    inputs, targets = data
    if not isinstance(targets, torch.Tensor):
        return False
    rows, count = _rows(inputs), (int(targets.shape[0]) if targets.dim() > 0 else None)
    if rows is None or count is None or rows != count:
        fail(
            call,
            f"data of length 2 whose second element is a tensor reads as one (inputs, targets) "
            f"batch, but its inputs ({describe(inputs)}) and targets ({describe(targets)}) "
            "differ in their leading (batch) dimension. For one batch pass [(X, y)] with "
            "matching rows; for two batches pass [(X1, y1), (X2, y2)].",
        )
    return True


def _shuffling(data: Any) -> str | None:
    """Why a DataLoader draws its batches at random, or None."""
    from torch.utils.data import (
        DataLoader,
        RandomSampler,
        SubsetRandomSampler,
        WeightedRandomSampler,
    )

    if not isinstance(data, DataLoader):
        return None
    samplers = [data.sampler, getattr(data.batch_sampler, "sampler", None)]
    for sampler in samplers:
        if isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)):
            return f"its sampler is a {type(sampler).__name__}"
        if getattr(sampler, "shuffle", False) is True:  # DistributedSampler(shuffle=True)
            return f"its sampler is a {type(sampler).__name__} with shuffle=True"
    return None


def as_batches(call: str, data: Any, *, check_deterministic: bool = False) -> Batches:
    """``data`` in any accepted form as a validated, re-iterable :class:`Batches`.

    See NOTE [data forms] for the accepted forms and the rule for a single pair.

    Args:
        call: the call form for error messages.
        data: the user's data.
        check_deterministic: walk the data twice and refuse it if any batch
            differs (costs two passes of loading, no model evaluation).

    Returns:
        A :class:`Batches` (``data`` itself if it already is one and no check is asked).

    Raises:
        TypeError: a tensor, a non-iterable, a one-shot iterator, a batch that is not
            an ``(inputs, targets)`` pair.
        ValueError: a shuffling DataLoader, empty data, a pair whose inputs and
            targets differ in rows, batches that change between passes.
    """
    if isinstance(data, Batches) and not check_deterministic:
        return data
    if _single_pair(call, data):
        data = [tuple(data)]
    check_reiterable(call, data)
    reason = _shuffling(data)
    if reason is not None:
        fail(
            call,
            f"data is a DataLoader that shuffles ({reason}), so every product would see "
            "different batches and the products would not be of one operator. Build it with "
            "shuffle=False (or sampler=SequentialSampler(dataset)).",
        )
    batches = data if isinstance(data, Batches) else Batches(call, data)
    first = next(iter(batches), None)
    if first is None:
        fail(call, "data yielded no batches. Pass at least one (inputs, targets) batch.")
    if check_deterministic:
        _check_same_passes(call, batches)
    return batches


def _check_same_passes(call: str, batches: Batches) -> None:
    missing = object()
    for index, (a, b) in enumerate(zip_longest(batches, batches, fillvalue=missing)):
        if a is missing or b is missing:
            fail(
                call,
                "data yields a different number of batches on two passes, so products would "
                "not be of one fixed operator. Pass a list of batches.",
            )
        la, sa = tree_flatten(a)
        lb, sb = tree_flatten(b)
        same = sa == sb and all(
            (s.shape == t.shape and torch.equal(s, t))
            if isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor)
            else not isinstance(s, torch.Tensor) and not isinstance(t, torch.Tensor)
            for s, t in zip(la, lb)
        )
        if not same:
            fail(
                call,
                f"data yields a different batch {index} on two passes (shuffling, random "
                "augmentation?), so products would not be of one fixed operator. Use "
                "shuffle=False and deterministic transforms, or a list of batches.",
            )


class Batches:
    """A validated, re-iterable view of ``(inputs, targets)`` batches.

    Every iteration walks the underlying data afresh and checks each batch's form
    (a pair; inputs a tensor, a tuple/list or a dict). ``len()`` works when the
    data has a length.
    """

    def __init__(self, call: str, data: Iterable[Any]) -> None:
        self.call, self.data = call, data

    def __iter__(self) -> Iterator[Batch]:
        for index, batch in enumerate(self.data):
            yield self._check(index, batch)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def has_len(self) -> bool:
        """Whether the data knows its number of batches."""
        try:
            len(self.data)  # type: ignore[arg-type]
        except TypeError:
            return False
        return True

    def _check(self, index: int, batch: Any) -> Batch:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            hint = (
                f" If the data is one batch, {_HINT}."
                if isinstance(batch, torch.Tensor)
                else " Make the data (or the DataLoader's collate_fn) yield (inputs, targets)."
            )
            fail(
                self.call,
                f"expected each batch to be an (inputs, targets) pair, got {describe(batch)} "
                f"as batch {index}.{hint}",
                TypeError,
            )
        inputs, targets = batch
        if not isinstance(inputs, (torch.Tensor, tuple, list, Mapping)):
            fail(
                self.call,
                f"expected the inputs of batch {index} to be a tensor, a tuple of tensors "
                f"(positional arguments) or a dict of tensors (keyword arguments), got "
                f"{describe(inputs)}.",
                TypeError,
            )
        return inputs, targets

    def __repr__(self) -> str:
        return f"Batches({type(self.data).__name__})"


def model_arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` to call the model with: ``model(*args, **kwargs)``."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}
