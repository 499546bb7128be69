"""Curvature of a model's loss over a dataset: Hessian, GGN and Fisher operators.

# NOTE [aggregation]
Every dataset pass of every model operator goes through one method,
:meth:`_ModelOperator._accumulate`. It iterates the batches of ``data`` (afresh
for every product), asks a per-batch function for that batch's contribution in
*sum form* (see NOTE [loss conventions] in ``_losses.py``) together with the
batch's count ``M_b``, adds the contributions up, and passes the pair
``(total, count)`` through the hook :meth:`_ModelOperator._reduce`, which is the
identity in one process. A data-parallel subclass overrides ``_reduce`` to
all-reduce both (sums), which makes N ranks equal one process for any shard
sizes. Only then is the total divided by the dataset count for
``reduction="mean"``, so the operator is the curvature of the dataset-mean loss
(``sum_b M_b L_b / sum_b M_b``: a short last batch weighs what its terms weigh)
and, for ``reduction="sum"``, of the dataset-sum loss. Per-batch functions see
the batch's position ``index`` in the pass: MC-Fisher samples are drawn from a
generator seeded with ``(seed, index)`` so that every product uses the same
samples (a fixed operator); a sharded subclass must pass globally unique indices.

# NOTE [train/eval mode]
The model is evaluated as it is: its ``training`` flag is never changed. In
train mode, dropout makes every pass random (not a fixed operator: detect it
with ``check_deterministic=True``) and BatchNorm uses batch statistics (a
different, but deterministic, loss per batch). Buffers are passed as copies, so
products never update running statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._pytree import tree_flatten, tree_map

from hesse._attention import math_attention, raise_if_no_derivative
from hesse._chunking import default_memory_budget, map_chunks, saved_bytes
from hesse._flat import Flat
from hesse._hvp import batched_grad, tensor_rows
from hesse._probes import keyed_generator, stream_seed
from hesse._validation import (
    check_choice,
    check_differentiable_leaves,
    check_generator,
    check_memory_budget,
    describe,
    fail,
)
from hesse.operators._base import PSD, SYMMETRIC, LinearOperator
from hesse.operators._data import Batch, as_batches, model_arguments
from hesse.operators._losses import OutputCurvature, output_curvature
from hesse.operators._squares import batch_factor_gram, batch_factor_squares


def _select_params(call: str, model: nn.Module, params: Any) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        chosen = {k: p for k, p in named.items() if p.requires_grad}
        if not chosen:
            fail(
                call,
                "the model has no parameters that require grad. Unfreeze some or pass params=.",
            )
        return {k: p.detach() for k, p in chosen.items()}
    if isinstance(params, dict):
        for k, t in params.items():
            if k not in named:
                fail(
                    call,
                    f"params names {k!r}, which is not a parameter of the model. Parameters: {list(named)}.",
                )
            if not isinstance(t, torch.Tensor) or t.shape != named[k].shape:
                fail(
                    call,
                    f"expected params[{k!r}] of shape {tuple(named[k].shape)}, got {describe(t)}.",
                )
        order = [k for k in named if k in params]
        return {k: params[k].detach() for k in order}
    if isinstance(params, (list, tuple)) and params and all(isinstance(k, str) for k in params):
        for k in params:
            if k not in named:
                fail(
                    call,
                    f"params names {k!r}, which is not a parameter of the model. Parameters: {list(named)}.",
                )
            if not named[k].requires_grad:
                fail(
                    call,
                    f"parameter {k!r} does not require grad. Select trainable parameters, or call "
                    f"model.get_parameter({k!r}).requires_grad_().",
                )
        if len(set(params)) != len(params):
            fail(call, f"params lists a name twice: {list(params)}.")
        return {k: named[k].detach() for k in named if k in params}
    fail(
        call,
        f"expected params to be None, a non-empty list of parameter names or a dict name -> tensor, "
        f"got {describe(params)}.",
        TypeError,
    )


def _batch_size(inputs: Any) -> int:
    return int(tree_flatten(inputs)[0][0].shape[0])


def _versions(leaves: Iterable[Any]) -> tuple[int, ...]:
    return tuple(t._version for t in leaves if isinstance(t, torch.Tensor))


@dataclass(eq=False)
class _Kept:
    """One batch's kept gradient graph, with what it was built from."""

    inputs: Any
    targets: Any
    graph: tuple[torch.Tensor, torch.Tensor]
    size: int
    count: float

    def __post_init__(self) -> None:
        self.leaves, self.spec = tree_flatten((self.inputs, self.targets))
        self.versions = _versions(self.leaves)

    def holds(self, inputs: Any, targets: Any) -> bool:
        """Whether ``(inputs, targets)`` holds the values this graph was built from.

        A kept tensor changed in place since (its version counter moved) never matches;
        the same tensors, unmodified, match in O(1); new tensors compare by value.
        """
        if _versions(self.leaves) != self.versions:
            return False
        if (
            inputs is self.inputs
            and targets is self.targets
            and isinstance(inputs, torch.Tensor)  # (a dict or list may have new leaves)
            and isinstance(targets, torch.Tensor)
        ):
            return True
        leaves, spec = tree_flatten((inputs, targets))
        if spec != self.spec:
            return False
        for s, t in zip(self.leaves, leaves):
            if isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor):
                if s is not t and (
                    s.shape != t.shape or s.dtype != t.dtype or not torch.equal(s, t)
                ):
                    return False
            elif s is not t and s != t:
                return False
        return True


class _GraphCache:
    """Per-batch gradient graphs kept within a byte budget (NOTE [graph cache])."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.entries: dict[int, _Kept] = {}
        self.too_large: set[int] = set()
        self.state: tuple | None = None

    def clear(self) -> None:
        self.entries.clear()
        self.too_large.clear()
        self.used = 0

    def check_state(self, state: tuple) -> None:
        """Drop every kept graph if the model's state moved since they were built."""
        if state != self.state:
            self.clear()
            self.state = state

    def get(self, index: int, inputs: Any, targets: Any) -> _Kept | None:
        kept = self.entries.get(index)
        if kept is None or kept.holds(inputs, targets):
            return kept
        self.used -= kept.size  # the pass yields a different batch here: drop the stale graph
        del self.entries[index]
        return None

    def may_fit(self, index: int) -> bool:
        """Whether building batch ``index``'s graph is worth measuring for the cache."""
        return self.budget > 0 and index not in self.too_large and self.used < self.budget

    def offer(self, index: int, kept: _Kept) -> None:
        if self.used + kept.size <= self.budget:
            self.entries[index] = kept
            self.used += kept.size
        else:
            self.too_large.add(index)


class _ModelOperator(LinearOperator):
    """Shared machinery: parameter selection, batch iteration, aggregation."""

    _title = "ModelOperator"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable[Batch],
        *,
        params: Any,
        progress: bool,
        check_deterministic: bool,
        curvature: OutputCurvature,
    ) -> None:
        call = self._call = f"hesse.{self._title}(model, loss_fn, data)"
        if not isinstance(model, nn.Module):
            fail(call, f"expected model to be a torch.nn.Module, got {describe(model)}.", TypeError)
        if not callable(loss_fn):
            fail(call, f"expected loss_fn to be callable, got {describe(loss_fn)}.", TypeError)
        # NOTE [data forms]: one place accepts and checks every form of data.
        self.data = as_batches(call, data, check_deterministic=check_deterministic)
        self.model, self.loss_fn = model, loss_fn
        self.progress = progress
        self.curvature = curvature
        self.reduction = curvature.reduction
        selected = _select_params(call, model, params)
        check_differentiable_leaves(call, selected, "parameters")
        self.param_names = list(selected)
        self.layout = Flat.of(selected)
        self._x = self.layout.flatten(selected).detach()
        names = set(selected)
        self._fixed = {k: p.detach() for k, p in model.named_parameters() if k not in names}
        self._fixed_list = list(self._fixed.values())
        self._module_list = list(model.modules())
        n = self.layout.n
        self.shape = (n, n)
        self.dtype, self.device = self._x.dtype, self._x.device
        self._validate_first_batch(check_deterministic)

    def _name(self) -> str:
        return self._call

    # -- evaluation -----------------------------------------------------------------
    def _state(self) -> tuple:
        """Everything besides the batch that a forward pass reads and that can change
        between products: see NOTE [graph cache]."""
        mods = self._module_list
        state = [self._x._version, *[t._version for t in self._fixed_list]]
        state += [m.training for m in mods]
        state += [id(c) for m in mods for c in m._modules.values()]  # replaced submodules
        for m in mods:
            if m._buffers:
                state += [(id(b), b._version) for b in m._buffers.values() if b is not None]
            if m._forward_pre_hooks or m._forward_hooks:
                state += [m, *m._forward_pre_hooks, "/", *m._forward_hooks]
        return tuple(state)

    def _tensors(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # NOTE [train/eval mode]: buffers are copies, so running statistics never change.
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        return {**self._fixed, **buffers, **params}

    def _forward(self, x: torch.Tensor, inputs: Any) -> torch.Tensor:
        args, kwargs = model_arguments(inputs)
        with math_attention():  # NOTE [math attention]
            return functional_call(
                self.model, self._tensors(self.layout.unflatten(x)), args, kwargs
            )

    def _sum_loss(self, x: torch.Tensor, inputs: Any, targets: Any) -> torch.Tensor:
        return self.curvature.sum_form(self._forward(x, inputs), targets)

    def _count(self, inputs: Any, targets: Any) -> float:
        """``M_b`` of one batch: see NOTE [loss normalisation] in ``_normalization.py``."""
        return self.curvature.count(targets, _batch_size(inputs))

    def _batch_count(self, index: int, inputs: Any, targets: Any) -> float:
        """``M_b`` of batch ``index`` in a pass (after its contribution was computed)."""
        return self._count(inputs, targets)

    def _unpack(self, batch: Batch) -> Batch:
        dev = self.device

        def move(t: Any) -> Any:
            return t.to(dev) if isinstance(t, torch.Tensor) and t.device != dev else t

        inputs, targets = batch
        if type(inputs) is torch.Tensor and type(targets) is torch.Tensor:  # the common case
            if inputs.device == dev and targets.device == dev:
                return inputs, targets
        elif all(move(t) is t for t in tree_flatten(batch)[0]):  # nothing to move: no copy
            return inputs, targets
        return tree_map(move, batch[0]), tree_map(move, batch[1])

    def _batches(self) -> Iterator[Batch]:
        data: Iterable = self.data
        if self.progress:
            from tqdm import tqdm

            total = len(self.data) if self.data.has_len() else None
            data = tqdm(data, total=total, desc=self._title, leave=False)
        for batch in data:
            yield self._unpack(batch)

    def _validate_first_batch(self, check_deterministic: bool) -> None:
        call = self._call
        inputs, targets = self._unpack(next(iter(self.data)))
        with torch.no_grad():
            out = self._forward(self._x, inputs)
        if not isinstance(out, torch.Tensor):
            fail(
                call,
                f"expected the model to return a tensor, got {describe(out)}. Wrap the model so "
                "that it returns the output tensor the loss takes.",
                TypeError,
            )
        self.curvature.normalization.check(call, out, targets, _batch_size(inputs))
        self.curvature.check(call, out, targets)
        with torch.no_grad():
            loss = self.loss_fn(out, targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            fail(
                call,
                f"expected loss_fn(output, targets) to return a scalar tensor, got {describe(loss)}.",
            )
        if check_deterministic:  # (the data itself was checked by as_batches)
            with torch.no_grad():
                out2 = self._forward(self._x, inputs)
            if not torch.equal(out, out2):
                fail(
                    call,
                    "the model returns different outputs on two passes over the same batch "
                    "(dropout or another random layer in train mode?), so products would not be of "
                    "one fixed operator. Call model.eval() or remove the randomness.",
                )

    # -- NOTE [aggregation] -----------------------------------------------------------
    def _accumulate(self, per_batch: Callable[[int, Any, Any], torch.Tensor]) -> torch.Tensor:
        """``sum_b per_batch(b, inputs_b, targets_b)``, reduced, divided by the count if mean."""
        total: torch.Tensor | None = None
        count = 0
        for index, (inputs, targets) in enumerate(self._batches()):
            contribution = per_batch(index, inputs, targets)
            total = contribution if total is None else total.add_(contribution)
            count += self._batch_count(index, inputs, targets)
        if total is None:
            fail(
                self._call,
                "data yielded no batches on this pass. Pass a re-iterable collection of batches.",
            )
        total, count = self._reduce(total, float(count))
        if self.reduction == "mean":  # in place, as the sum: total is ours (batch-sized)
            total = total.div_(count)
        return total

    def _reduce(self, total: torch.Tensor, count: float) -> tuple[torch.Tensor, float]:
        """Combine partial sums across processes: the identity in one process."""
        return total, count

    # -- vectorised products over columns ---------------------------------------------
    def _columns(
        self,
        single: Callable[[torch.Tensor], torch.Tensor],
        X: torch.Tensor,
        *,
        batched: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``single`` applied to each column of ``X`` (``(n, k)``): returns ``(k, n)``.

        Columns go in chunks of ``chunk_size`` through ``batched`` (default:
        ``vmap(single)``); one column is a plain call.
        """
        k = X.shape[1]
        if k == 1:
            return single(X[:, 0]).unsqueeze(0)
        return map_chunks(
            batched or vmap(single),
            single,
            k,
            tensor_rows(X.T),
            chunk_size=self.chunk_size,
            call=self._call,
        )

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        try:
            return self._accumulate(
                lambda index, inputs, targets: self._batch_matmat(index, inputs, targets, X)
            ).T
        except (RuntimeError, NotImplementedError) as err:
            raise_if_no_derivative(self._call, err)
            raise

    def _batch_matmat(self, index: int, inputs: Any, targets: Any, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class HessianOperator(_ModelOperator):
    """The Hessian of a model's loss over a dataset, with respect to its parameters.

    .. math:: H = \\nabla_\\theta^2 \\frac{1}{M} \\sum_b M_b \\, \\ell(f_\\theta(X_b), Y_b)

    for ``reduction="mean"`` (``M_b`` the number of terms the batch loss averages,
    ``M`` their total, so a short last batch is weighted exactly) and
    :math:`\\sum_b \\ell(f_\\theta(X_b), Y_b)` for ``"sum"``. ``M_b`` is read from
    the loss and the targets (NOTE [loss normalisation] in ``_normalization.py``):
    output entries for element-wise losses, non-ignored (weighted) targets for
    cross-entropy in any layout (``(N, C)``, ``(N, C, d1, ...)``, tokens flattened to
    ``(B*T, V)``), samples for a plain callable (a loss without a ``reduction``
    attribute), which must then return outputs with the inputs' batch size unless
    ``loss_count`` states the count.

    Products go batch by batch through the whole of ``data`` (re-iterated every
    time): per batch, the gradient graph of the loss (through
    ``torch.func.functional_call``) is built once and every chunk of
    ``chunk_size`` columns is one batched double-backward through it
    (reverse-over-reverse, NOTE [batched backward]). The model's train/eval mode is
    respected (see NOTE [train/eval mode]).

    Args:
        model: a ``torch.nn.Module`` returning a tensor.
        loss_fn: ``loss_fn(output, targets) -> scalar`` (an ``nn`` loss or any
            callable); ``reduction="none"`` is rejected.
        data: ``(inputs, targets)`` batches: a list of them, a single ``(X, y)``
            pair, a ``DataLoader`` that does not shuffle, or any re-iterable of
            batches; ``inputs`` is a tensor, a tuple of tensors (positional
            arguments) or a dict of tensors (keyword arguments, e.g.
            ``input_ids``/``attention_mask``). See NOTE [data forms] in
            ``hesse/operators/_data.py`` for the rule that tells one pair from two
            batches.
        params: ``None`` (every parameter that requires grad), a list of parameter
            names (a block of the Hessian), or a dict name -> tensor (the point at
            which to evaluate; other parameters keep their values).
        loss_count: ``fn(targets) -> M_b``, the number of terms ``loss_fn`` averages
            over in a batch; needed only where it cannot be read from the loss (a
            plain callable on flattened token or pixel outputs, a masked mean).
        progress: show a tqdm progress bar over batches on every pass.
        check_deterministic: at construction, walk the data twice and run the
            first batch twice, and raise if any batch or the output differs.
        cache_graphs: keep each batch's gradient graph after its first product
            while the kept graphs fit ``memory_budget`` (NOTE [graph cache]), so that
            later products skip the forward pass and the first backward. A kept
            graph is rebuilt when its batch, a parameter or buffer (in place or
            reassigned), a module's train/eval mode or its forward hooks change;
            other Python state the forward reads (module attributes, global flags)
            is not watched: rebuild the operator after changing it. Without it,
            graphs are still kept within one call of ``to_dense``, ``eigsh``,
            ``trace``, ``spectral_density``, ``solve`` and ``diagonal``.
        memory_budget: bytes the kept graphs may hold in total (counted as the
            tensors autograd saves downstream of the parameters); default half of
            the memory free on the device at construction (for ``cache_graphs``)
            or at the start of each call that keeps graphs.

    Attributes:
        layout: the :class:`hesse._flat.Flat` of the selected parameters, so
            ``op @ {name: tensor}`` works; ``param_names`` lists them in order.

    Raises:
        TypeError, ValueError: for a non-module model, data in a refused form (a
            bare tensor, a one-shot iterator, a shuffling DataLoader, no batches),
            unknown or frozen parameter names, a model that returns a non-tensor, a
            non-scalar loss, a loss whose count cannot be determined, a bad
            ``cache_graphs`` or ``memory_budget`` (messages name the fix).

    Cost: one product with ``k`` columns is one pass over the data; per batch one
    gradient with ``create_graph`` plus one double-backward per column
    (measured: one product ~2.7 gradients of the same data on a 784-100-100-10
    MLP); with ``cache_graphs``, and from the second product of one
    algorithm's call, a batch whose graph is kept costs only the double
    backward. Memory: one batch's gradient graph plus the chunk, plus the kept
    graphs (at most ``memory_budget``).

    Example:
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
        >>> H = HessianOperator(model, torch.nn.MSELoss(), data)
        >>> H.shape
        (8, 8)
    """

    _title = "HessianOperator"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable[Batch],
        *,
        params: Any = None,
        loss_count: Callable | None = None,
        progress: bool = False,
        check_deterministic: bool = False,
        cache_graphs: bool = False,
        memory_budget: int | float | None = None,
    ) -> None:
        call = f"hesse.{self._title}(model, loss_fn, data)"
        if not isinstance(cache_graphs, bool):
            fail(
                call,
                f"expected cache_graphs to be True or False, got {describe(cache_graphs)}.",
                TypeError,
            )
        check_memory_budget(call, memory_budget)
        curvature = output_curvature(call, loss_fn, required=False, loss_count=loss_count)
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            progress=progress,
            check_deterministic=check_deterministic,
            curvature=curvature,
        )
        self.tags = frozenset({SYMMETRIC})
        self.cache_graphs = cache_graphs
        self.memory_budget = (
            int(memory_budget) if memory_budget is not None else default_memory_budget(self.device)
        )
        self._budget_stated = memory_budget is not None
        self._graphs = _GraphCache(self.memory_budget if cache_graphs else 0)

    @contextlib.contextmanager
    def _keep_graphs(self) -> Iterator[None]:
        # NOTE [graph sessions] in _base.py: graphs kept for one algorithm's call only.
        cache = self._graphs
        random = any(
            m.training and isinstance(m, _DropoutNd) and m.p > 0 for m in self._module_list
        )
        if cache.budget > 0 or random:  # already kept (cache_graphs, a nested session)
            yield
            return
        cache.budget = (
            self.memory_budget if self._budget_stated else default_memory_budget(self.device)
        )
        try:
            yield
        finally:
            cache.budget = 0
            cache.clear()
            cache.state = None

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        if self._graphs.budget > 0:  # NOTE [graph cache]: once per product, not per batch
            self._graphs.check_state(self._state())
        return super()._matmat(X)

    def _batch_graph(
        self, index: int, inputs: Any, targets: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The leaf ``x`` and the gradient ``g`` (with its graph) of batch ``index``'s loss.

        # NOTE [graph cache]
        With ``cache_graphs=True`` a batch's gradient graph is kept after its first
        product when the bytes autograd saved for it (downstream of the parameters,
        counted while it is built) still fit ``memory_budget`` together with the
        graphs already kept; a later product through a kept graph is one batched
        double backward, with no forward pass and no first backward. A batch whose
        graph does not fit is rebuilt on every product (the uncached cost). A kept
        graph is used only while the pass yields the same batch (the same tensors,
        unmodified since, or equal ones), and all kept graphs are dropped when
        anything else a forward pass reads has moved since they were built
        (:meth:`_state`, checked once per product: version counters of the
        parameters and buffers, buffer and submodule identity, every module's
        ``training`` flag, forward hooks). What no check can see: plain Python
        attributes the forward reads (``module.p = 0.3``, a config field, a global
        flag) and randomness in the forward. Hence kept graphs are opt-in across
        products (``cache_graphs=True``) and automatic only within one algorithm's
        call, where no user code runs between the products (NOTE [graph sessions] in
        ``_base.py``; not at all for a model with active dropout).
        """
        kept = self._graphs.get(index, inputs, targets)
        if kept is not None:
            return kept.graph
        x = self._x.detach().requires_grad_(True)

        def build() -> torch.Tensor:
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self._sum_loss(x, inputs, targets), x, create_graph=True)
            return g

        if not self._graphs.may_fit(index):
            return x, build()
        g, used = saved_bytes(build, x)
        count = self._count(inputs, targets)
        self._graphs.offer(index, _Kept(inputs, targets, (x, g), used, count))
        return x, g

    def _batch_count(self, index: int, inputs: Any, targets: Any) -> float:
        kept = self._graphs.entries.get(index)
        if kept is not None and kept.holds(inputs, targets):  # O(1) for the same objects
            return kept.count
        return self._count(inputs, targets)

    def _batch_matmat(self, index, inputs, targets, X):
        # Reverse-over-reverse with plain autograd: the batch's gradient graph is built
        # once (or kept: NOTE [graph cache]), then every chunk of columns is one batched
        # double-backward through it (measured ~1.6x faster than vmapped
        # forward-over-reverse on an MLP, and the forward pass is never batched, so any
        # model works).
        x, g = self._batch_graph(index, inputs, targets)
        if not g.requires_grad:  # the loss is at most linear in the parameters
            return X.new_zeros(X.shape[1], X.shape[0])

        def product(V: torch.Tensor, batched: bool) -> torch.Tensor:
            if batched:  # NOTE [batched backward] in hesse/_hvp.py
                return batched_grad(g, [x], V)[0]
            (hv,) = torch.autograd.grad(g, x, V, retain_graph=True, allow_unused=True)
            return torch.zeros_like(V) if hv is None else hv

        return self._columns(lambda v: product(v, False), X, batched=lambda V: product(V, True))


class _OuterProductOperator(_ModelOperator):
    """``sum_n J_n^T Q_n J_n`` with ``J_n`` the per-sample output Jacobian (GGN, Fisher).

    ``_factor(index, output, targets)`` gives ``S`` (``(N, D, K)``) with
    ``Q_n = S_n S_n^T``; the exact diagonal is ``sum_{n,k} (J_n^T s_nk)^2``.
    """

    _linear_plan: dict | None = None
    _rows_per_sample: int | None = None  # NOTE [coupled rows] in _squares.py

    def _factor(self, index: int, output: torch.Tensor, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def _batch_matmat(self, index, inputs, targets, X):
        if X.shape[1] == 1:
            try:
                return self._forward_ad_product(index, inputs, targets, X[:, 0]).unsqueeze(0)
            except (NotImplementedError, RuntimeError):  # an op without a forward-AD formula
                pass
        x0 = self._x

        def fn(x: torch.Tensor) -> torch.Tensor:
            return self._forward(x, inputs)

        out, vjp_fn = vjp(fn, x0)
        out = out.detach()
        N = out.shape[0]
        # Q depends on the batch only; compute it once, outside the vmapped column loop.
        prod = self._output_product_fn(index, out, targets)

        def single(v: torch.Tensor) -> torch.Tensor:
            jv = jvp(fn, (x0,), (v,))[1]
            u = prod(jv.reshape(N, -1)).reshape(out.shape)
            return vjp_fn(u)[0]

        return self._columns(single, X)

    def _forward_ad_product(
        self, index: int, inputs: Any, targets: Any, v: torch.Tensor
    ) -> torch.Tensor:
        """One product with one forward pass carrying the tangent (autograd's forward
        mode) that also records the graph for the backward: ``J v`` and ``J^T u`` from
        one forward and one backward pass (about 1.8 gradients instead of 2.5)."""
        x = self._x.detach().requires_grad_(True)
        with torch.enable_grad(), fwAD.dual_level():
            dual = self._forward(fwAD.make_dual(x, v), inputs)
            out, jv = fwAD.unpack_dual(dual)
        if jv is None:
            jv = torch.zeros_like(out)
        prod = self._output_product_fn(index, out.detach(), targets)
        u = prod(jv.reshape(out.shape[0], -1)).reshape(out.shape)
        (g,) = torch.autograd.grad(out, x, u, allow_unused=True)
        return torch.zeros_like(x) if g is None else g

    def _output_product_fn(self, index, out, targets) -> Callable[[torch.Tensor], torch.Tensor]:
        S = self._factor(index, out, targets)
        return lambda V: torch.einsum("ndk,nk->nd", S, torch.einsum("ndk,nd->nk", S, V))

    # -- the dense matrix --------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """The ``(n, n)`` matrix as a Gram product of per-sample VJPs (NOTE [factor Gram]).

        Cost: per batch, ``N * K`` VJPs (``K`` the output factor's columns, e.g. the
        classes), batched, and one ``(n x NK) (NK x n)`` matrix product; memory one
        group of rows of the VJP matrix plus the result.
        """
        return self._dense_block(None)

    def _dense_block(self, columns: torch.Tensor | None) -> torch.Tensor:
        """Rows and columns ``columns`` (all if ``None``) of the dense matrix."""

        def per_batch(index: int, inputs: Any, targets: Any) -> torch.Tensor:
            G = batch_factor_gram(
                self,
                self._factor,
                index,
                inputs,
                targets,
                columns=columns,
                chunk_size=None,
                verify=self._linear_plan is None,
            )
            if G is not None:
                return G
            # Coupled rows with more VJPs than columns: products with the unit vectors.
            n = self.shape[0]
            cols = torch.arange(n, device=self.device) if columns is None else columns
            E = torch.zeros(n, cols.numel(), dtype=self.dtype, device=self.device)
            E[cols, torch.arange(cols.numel(), device=self.device)] = 1
            return self._batch_matmat(index, inputs, targets, E)[:, cols]

        try:
            return self._accumulate(per_batch)
        except (RuntimeError, NotImplementedError) as err:
            raise_if_no_derivative(f"{self._title}.to_dense()", err)
            raise

    # -- structure used by hesse.diagonal -----------------------------------------------
    def _factor_squares(
        self,
        factor: Callable[[int, torch.Tensor, Any], torch.Tensor],
        *,
        chunk_size: int | None = None,
        keep: str = "total",
    ) -> torch.Tensor:
        """``sum_n sum_k (J_n^T s_nk)^2`` over the dataset (reduced and normalised).

        See NOTE [linear fast path] in ``_squares.py``. Returns ``(n,)``; ``(K, n)``
        for ``keep="column"``; ``(N, n)`` for ``keep="sample"`` (one batch of ``N``
        output rows; with several batches their rows would be added, so the caller
        passes one).
        """
        # NOTE [linear fast path]: the plan is found and verified once, on the first batch.

        def per_batch(index: int, inputs: Any, targets: Any) -> torch.Tensor:
            return batch_factor_squares(
                self,
                factor,
                index,
                inputs,
                targets,
                chunk_size=chunk_size,
                keep=keep,
                verify=self._linear_plan is None,
            )

        return self._accumulate(per_batch)

    def _batch_gradient_squares(
        self, factor: Callable[[int, torch.Tensor, Any], torch.Tensor]
    ) -> torch.Tensor:
        """``sum_b sum_k (J_b^T s_bk)^2``: squares of whole-batch VJPs (``(K, n)``)."""

        def per_batch(index: int, inputs: Any, targets: Any) -> torch.Tensor:
            x = self._x.detach().requires_grad_(True)
            with torch.enable_grad():
                out = self._forward(x, inputs)
            S = factor(index, out.detach(), targets)
            cot = S.permute(2, 0, 1).reshape(S.shape[2], *out.shape)
            if cot.shape[0] == 1:
                (G,) = torch.autograd.grad(out, x, cot[0])
                G = G.unsqueeze(0)
            else:
                (G,) = batched_grad(out, [x], cot)
            return G.square()

        return self._accumulate(per_batch)


class GGNOperator(_OuterProductOperator):
    """The generalised Gauss-Newton matrix of a model's loss over a dataset.

    .. math:: G = \\frac{1}{M} \\sum_n J_n^\\top H_n J_n

    with ``J_n`` the Jacobian of sample ``n``'s model output with respect to the
    selected parameters and ``H_n`` the Hessian of its loss with respect to that
    output (closed forms for ``nn.MSELoss``, ``nn.CrossEntropyLoss``,
    ``nn.BCEWithLogitsLoss`` and ``nn.BCELoss``; any other loss through
    ``output_hessian``). Weighting over batches is as in :class:`HessianOperator`.
    Symmetric and positive semi-definite.

    Args:
        model, loss_fn, data, params, loss_count, progress, check_deterministic: as
            in :class:`HessianOperator`.
        output_hessian: for a loss without a closed form, a callable
            ``(output, targets) -> (N, D, D)`` returning the per-sample blocks of
            the Hessian of ``loss_fn(output, targets)`` with respect to each
            sample's flattened output (``D`` entries).

    Raises:
        NotImplementedError: for a loss without a known output Hessian and no
            ``output_hessian`` (or an unsupported loss option).
        TypeError, ValueError: as in :class:`HessianOperator`.

    Cost: per batch and column, one forward-mode (JVP) and one reverse (VJP) pass
    through the model. A single vector uses one forward pass carrying the tangent
    and one backward pass (measured ~1.8 gradients on a 784-100-100-10 MLP);
    several columns are vmapped in chunks of ``chunk_size``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))]
        >>> G = GGNOperator(model, torch.nn.CrossEntropyLoss(), data)
        >>> bool((G.to_dense() - G.to_dense().T).abs().max() < 1e-12)
        True
    """

    _title = "GGNOperator"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable[Batch],
        *,
        params: Any = None,
        output_hessian: Callable | None = None,
        loss_count: Callable | None = None,
        progress: bool = False,
        check_deterministic: bool = False,
    ) -> None:
        curvature = output_curvature(
            f"hesse.{self._title}(model, loss_fn, data)",
            loss_fn,
            output_hessian,
            loss_count=loss_count,
        )
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            progress=progress,
            check_deterministic=check_deterministic,
            curvature=curvature,
        )
        self.tags = frozenset({SYMMETRIC, PSD})

    def _factor(self, index, output, targets):
        return self.curvature.factor(output, targets)

    def _output_product_fn(self, index, out, targets):
        return lambda V: self.curvature.hessian_vector(out, targets, V)


class FisherOperator(_OuterProductOperator):
    """The Fisher information of a model over a dataset: Monte-Carlo or empirical.

    .. math:: F = \\frac{1}{M} \\sum_n J_n^\\top \\, \\Big(\\frac{1}{m} \\sum_{j=1}^m s_{nj} s_{nj}^\\top\\Big) J_n

    ``kind="mc"``: ``s_nj`` are output gradients of the loss at labels sampled
    from the model's predictive distribution (categorical for cross-entropy,
    Bernoulli for BCE, Gaussian for MSE; ``E[s s^T] = H_n``, so ``F`` is an
    unbiased estimate of the GGN). The samples are drawn from ``generator`` at
    construction time and reused by every product (see NOTE [aggregation]), so
    ``F`` is one fixed symmetric PSD operator. ``kind="empirical"``: ``m = 1`` and
    ``s_n`` is the output gradient at the true target (any loss works).

    Args:
        model, loss_fn, data, params, loss_count, progress, check_deterministic: as
            in :class:`HessianOperator`.
        kind: ``"mc"`` or ``"empirical"``.
        mc_samples: labels sampled per sample (``kind="mc"``).
        generator: the ``torch.Generator`` the MC samples come from (default: a
            fresh generator seeded with 0, so results are reproducible).
        output_hessian: as in :class:`GGNOperator`; an MC Fisher of such a loss
            samples Gaussian vectors ``S_n z`` with ``S_n S_n^T = H_n``.

    Raises:
        NotImplementedError: ``kind="mc"`` for a loss with no known output
            Hessian and no ``output_hessian``.
        TypeError, ValueError: as in :class:`HessianOperator`, and for a bad
            ``kind``, ``mc_samples`` or ``generator``.

    Cost: as :class:`GGNOperator`, plus drawing the samples in every pass.

    Example:
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))]
        >>> F = FisherOperator(model, torch.nn.CrossEntropyLoss(), data, kind="empirical")
        >>> F.shape
        (8, 8)
    """

    _title = "FisherOperator"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable[Batch],
        *,
        kind: str = "mc",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        params: Any = None,
        output_hessian: Callable | None = None,
        loss_count: Callable | None = None,
        progress: bool = False,
        check_deterministic: bool = False,
    ) -> None:
        call = f"hesse.{self._title}(model, loss_fn, data)"
        check_choice(call, "kind", kind, ("mc", "empirical"))
        check_generator(call, generator)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            fail(call, f"mc_samples should be a positive int, got {mc_samples!r}.")
        self.kind, self.mc_samples = kind, mc_samples
        curvature = output_curvature(
            call, loss_fn, output_hessian, required=kind == "mc", loss_count=loss_count
        )
        self._seed = stream_seed(generator)
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            progress=progress,
            check_deterministic=check_deterministic,
            curvature=curvature,
        )
        self.tags = frozenset({SYMMETRIC, PSD})

    def _generator(self, index: int) -> torch.Generator:
        # NOTE [aggregation]: one stream per batch position, identical in every pass.
        return keyed_generator(self._seed, index, self.device)

    def _factor(self, index, output, targets):
        if self.kind == "empirical":
            return self.curvature.gradient(output, targets).unsqueeze(2)
        return self.curvature.sample(output, targets, self._generator(index), self.mc_samples)
