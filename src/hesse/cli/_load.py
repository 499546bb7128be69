"""Loading the model for ``hesse analyze``: the ``--model`` factory or the default, placed.

See NOTE [analyze errors] in :mod:`hesse.cli._analyze`: every problem with the
user's input is raised here as :class:`AnalyzeError`, one line naming the fix.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from hesse.operators._data import as_batches


class AnalyzeError(Exception):
    """Bad input: reported as one line on stderr with exit code 2 (NOTE [analyze errors])."""


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def load(args: argparse.Namespace) -> tuple[nn.Module, Callable, Iterable, str]:
    """``(model, loss_fn, data, description)`` from ``--model`` or the default model."""
    if args.model is None:
        from hesse.cli._default_model import digits_mlp

        model, loss_fn, data = digits_mlp(seed=args.seed, quick=args.quick)
        source = "default: 64-32-10 tanh MLP trained on scikit-learn's digits"
    else:
        model, loss_fn, data = _from_factory(args.model)
        source = args.model
    model, data = _place(model, data, torch.device(args.device), args.dtype)
    return model, loss_fn, data, source


def _from_factory(spec: str) -> tuple[nn.Module, Callable, Iterable]:
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise AnalyzeError(f"--model expects path/to/file.py:factory, got {spec!r}.")
    path = Path(path_text)
    if not path.is_file():
        raise AnalyzeError(f"--model: file {path_text!r} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"_hesse_user_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise AnalyzeError(f"--model: cannot import {path_text!r} as a Python file.")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.resolve().parent))  # the file may import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise AnalyzeError(
            f"--model: importing {path_text!r} failed: {type(err).__name__}: {first_line(err)}"
        ) from err
    finally:
        sys.path.remove(str(path.resolve().parent))
    factory = getattr(module, name, None)
    if not callable(factory):
        raise AnalyzeError(f"--model: {path_text!r} has no callable {name!r}.")
    try:
        result = factory()
    except Exception as err:
        raise AnalyzeError(
            f"--model: {name}() raised {type(err).__name__}: {first_line(err)}"
        ) from err
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        got = (
            f"a {len(result)}-tuple" if isinstance(result, (tuple, list)) else type(result).__name__
        )
        raise AnalyzeError(f"--model: {name}() must return (model, loss_fn, data), got {got}.")
    model, loss_fn, data = result
    if not isinstance(model, nn.Module):
        raise AnalyzeError(
            f"--model: {name}() returned a {type(model).__name__} as the model; expected a torch.nn.Module."
        )
    if not callable(loss_fn):
        raise AnalyzeError(
            f"--model: {name}() returned a non-callable loss_fn ({type(loss_fn).__name__})."
        )
    # NOTE [data forms]: the library's one check, so the command accepts what it accepts.
    try:
        data = as_batches(f"--model: the data {name}() returned", data)
    except (TypeError, ValueError) as err:
        raise AnalyzeError(first_line(err)) from err
    return model, loss_fn, data


def _place(
    model: nn.Module, data: Iterable, device: torch.device, dtype: str | None
) -> tuple[nn.Module, Iterable]:
    if not any(p.requires_grad for p in model.parameters()):
        raise AnalyzeError("the model has no trainable parameters (none with requires_grad=True).")
    cast = getattr(torch, dtype) if dtype else None
    model = model.to(device=device, dtype=cast) if cast else model.to(device)

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        return t.to(device)

    try:  # each batch's form is checked as it is read (NOTE [data forms])
        data = as_batches("data", data)  # (the default model's data; a factory's is checked)
        if isinstance(data.data, (list, tuple)):
            return model, [tree_map(move, batch) for batch in data]
    except (TypeError, ValueError) as err:
        raise AnalyzeError(first_line(err)) from err
    return model, _Mapped(data, lambda batch: tree_map(move, batch))


class _Mapped:
    """A re-iterable view of ``data`` with ``fn`` applied to every batch."""

    def __init__(self, data: Iterable, fn: Callable[[Any], Any]) -> None:
        self.data, self.fn = data, fn

    def __iter__(self) -> Iterator[Any]:
        return (self.fn(batch) for batch in self.data)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]
