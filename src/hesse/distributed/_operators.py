"""Data-parallel Hessian, GGN and Fisher operators: each rank a shard, every product summed.

# NOTE [data parallel]
The model operators aggregate every data pass through one seam (NOTE
[aggregation] in hesse.operators._model): per-batch contributions in sum form
and the batch counts are added up, passed through ``_reduce``, and only then
divided by the count. The classes here plug into that seam and nothing else:

* ``data`` becomes this rank's round-robin shard (NOTE [sharding]);
* every pass is a guarded step (NOTE [failure]): ``_reduce`` first exchanges a
  small status table (failure flags, this rank's count, a checksum of the input
  vectors), then all-reduces the partial sum, so the operator on N ranks is the
  operator on one for any shard sizes, and a rank that raises mid-pass still
  joins the exchange, releasing the others with a clear error;
* per-batch randomness (MC-Fisher labels) is keyed by the batch's global
  position ``rank + i * world_size``, which is the single-process position under
  round-robin sharding, so the samples, and the operator, are the same.

Everything that uses the seam (products, ``to_dense``, the structured exact and
Monte-Carlo diagonals) is data-parallel without knowing it; spectra and
estimators that only call products run unchanged, and every rank holds the
same result because the all-reduced products are identical on every rank and
probes come from identically seeded generators.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from hesse._validation import fail
from hesse.distributed._context import (
    Context,
    all_reduce_,
    check_alive,
    check_same,
    checksum,
    exchange,
    resolve,
)
from hesse.distributed._sharding import make_shard
from hesse.operators import _model
from hesse.operators._data import as_batches

__all__ = ["FisherOperator", "GGNOperator", "HessianOperator"]


class _DataParallel:
    """The data-parallel behaviour shared by the three operators (see NOTE [data parallel])."""

    _ctx: Context
    _call: str
    _title: str
    shape: tuple[int, int]
    device: torch.device

    def _setup(
        self,
        init: Callable[[Iterable[Any]], None],
        data: Iterable[Any],
        *,
        process_group: Any,
        sharded: bool,
        timeout: float | timedelta | None,
    ) -> None:
        call = f"hesse.distributed.{self._title}(model, loss_fn, data)"
        if not isinstance(sharded, bool):
            fail(call, f"expected sharded to be a bool, got {sharded!r}.", TypeError)
        ctx = resolve(call, process_group, timeout)
        self._ctx = ctx
        self._inputs: torch.Tensor | None = None
        self._joined = True
        #: seconds spent in collectives (waiting for other ranks included) and their number.
        self.comm_seconds = 0.0
        self.comm_calls = 0
        # A rank that never gets here (crashed, or took another code path) is named.
        check_alive(ctx, call)
        try:
            # NOTE [data forms]: every form the single-process operators take.
            data = as_batches(call, data)
            local = data if sharded else make_shard(data, ctx.rank, ctx.world_size, call=call)
            if not sharded and data.has_len() and len(data) < ctx.world_size:
                fail(
                    call,
                    f"data has {len(data)} batch(es) for {ctx.world_size} ranks, so some rank "
                    "would have none. Split the data into at least as many batches as ranks.",
                )
            init(local)
            if ctx.backend == "nccl" and self.device.type != "cuda":
                fail(
                    call,
                    f"the NCCL backend needs the model on a GPU, got parameters on {self.device}. "
                    "Move the model with model.to(f'cuda:{local_rank}') or use the gloo backend.",
                )
        except Exception:
            # The same width as the healthy ranks' exchange below: collectives must match.
            exchange(ctx, call, [0.0] * len(self._AGREEMENT), failed=True)
            raise
        self._call = call
        mine = self._agreement()
        table = exchange(ctx, call, [v for _, v in mine])
        for j, (what, _) in enumerate(mine):
            check_same(ctx, call, what, table[:, j])

    #: what every rank's operator must agree on, checked at construction.
    _AGREEMENT = (
        "the number of parameters",
        "the parameter values (a checksum)",
        "the Monte-Carlo seed (seed the generators alike)",
    )

    def _agreement(self) -> list[tuple[str, float]]:
        values = [float(self.shape[0]), checksum(self._x), self._mc_seed()]  # type: ignore[attr-defined]
        return list(zip(self._AGREEMENT, values))

    def _mc_seed(self) -> float:
        return 0.0

    @property
    def rank(self) -> int:
        """This process's rank in the operator's process group."""
        return self._ctx.rank

    @property
    def world_size(self) -> int:
        """The number of ranks the data is spread over."""
        return self._ctx.world_size

    # -- the seam (NOTE [aggregation] in hesse.operators._model) ------------------------
    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        self._inputs = X
        try:
            return super()._matmat(X)  # type: ignore[misc]
        finally:
            self._inputs = None

    def _accumulate(self, per_batch: Callable[[int, Any, Any], torch.Tensor]) -> torch.Tensor:
        ctx = self._ctx
        if ctx.alone:
            return super()._accumulate(per_batch)  # type: ignore[misc]
        rank, world = ctx.rank, ctx.world_size

        def global_index(index: int, inputs: Any, targets: Any) -> torch.Tensor:
            return per_batch(rank + index * world, inputs, targets)

        self._joined = False
        try:
            return super()._accumulate(global_index)  # type: ignore[misc]
        except Exception:
            if not self._joined:  # failed mid-pass: release the others, then re-raise
                self._joined = True
                exchange(ctx, self._call, [0.0, 0.0], failed=True)
            raise

    def _reduce(self, total: torch.Tensor, count: float) -> tuple[torch.Tensor, float]:
        ctx = self._ctx
        if ctx.alone:
            return total, count
        self._joined = True
        start = time.perf_counter()
        table = exchange(ctx, self._call, [float(count), checksum(self._inputs)])
        check_same(ctx, self._call, "the input vectors (a checksum)", table[:, 1])
        total = all_reduce_(ctx, self._call, total.contiguous())
        self.comm_seconds += time.perf_counter() - start
        self.comm_calls += 2
        return total, float(table[:, 0].sum())


class HessianOperator(_DataParallel, _model.HessianOperator):
    """:class:`hesse.HessianOperator` over data spread across ranks.

    Each rank passes the same ``data`` (and the same model, parameters and
    arguments) and evaluates only its round-robin shard of the batches (batch
    ``i`` on rank ``i % world_size``); every product sums the ranks' partial
    results and sample counts before normalising, so it equals the
    single-process operator for any shard sizes (see NOTE [data parallel]).
    Without an initialised ``torch.distributed`` it is the single-process
    operator.

    Args:
        model, loss_fn, data, params, loss_count, progress, check_deterministic: as in
            :class:`hesse.HessianOperator`. ``data`` must hold at least one batch
            per rank.
        process_group: the ranks to spread over (default: the default group).
        sharded: ``True`` if ``data`` already is this rank's part (e.g. a
            ``DataLoader`` with a ``DistributedSampler``): it is then used as it
            is. Default ``False``: every rank passes all of ``data``.
        timeout: the most (seconds or a timedelta) a collective waits for the
            other ranks; default the process group's timeout.

    Attributes:
        rank, world_size: of this process in the group.
        comm_seconds, comm_calls: time spent in (and number of) collectives so
            far, waiting for slower ranks included.

    Raises:
        hesse.distributed.DistributedError: another rank raised, disappeared,
            stalled past the timeout, or called with different vectors.
        TypeError, ValueError: as in :class:`hesse.HessianOperator`, and for fewer
            batches than ranks.

    Cost: per product, one pass over ``1 / world_size`` of the data on each rank,
    then two all-reduces (a ``world_size x 3`` status table and the ``n x k``
    result).

    Example:
        >>> import hesse.distributed as hd
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
        >>> H = hd.HessianOperator(model, torch.nn.MSELoss(), data)  # alone: one process
        >>> (H.rank, H.world_size, H.shape)
        (0, 1, (8, 8))
    """

    _title = "HessianOperator"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable[Any],
        *,
        params: Any = None,
        loss_count: Callable | None = None,
        progress: bool = False,
        check_deterministic: bool = False,
        process_group: Any = None,
        sharded: bool = False,
        timeout: float | timedelta | None = None,
    ) -> None:
        def init(local: Iterable[Any]) -> None:
            _model.HessianOperator.__init__(
                self,
                model,
                loss_fn,
                local,
                params=params,
                loss_count=loss_count,
                progress=progress,
                check_deterministic=check_deterministic,
            )

        self._setup(init, data, process_group=process_group, sharded=sharded, timeout=timeout)


class GGNOperator(_DataParallel, _model.GGNOperator):
    """:class:`hesse.GGNOperator` over data spread across ranks.

    As :class:`hesse.distributed.HessianOperator` (sharding, exact weighting,
    failure handling, ``process_group``, ``sharded``, ``timeout``), for the
    generalised Gauss-Newton matrix; ``output_hessian`` as in
    :class:`hesse.GGNOperator`. ``hesse.diagonal(op, method="exact" | "mc" |
    "gnb")`` use the operator's structure and are data-parallel too.

    Example:
        >>> import hesse.distributed as hd
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))]
        >>> hd.GGNOperator(model, torch.nn.CrossEntropyLoss(), data).shape
        (8, 8)
    """

    _title = "GGNOperator"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable[Any],
        *,
        params: Any = None,
        output_hessian: Callable | None = None,
        loss_count: Callable | None = None,
        progress: bool = False,
        check_deterministic: bool = False,
        process_group: Any = None,
        sharded: bool = False,
        timeout: float | timedelta | None = None,
    ) -> None:
        def init(local: Iterable[Any]) -> None:
            _model.GGNOperator.__init__(
                self,
                model,
                loss_fn,
                local,
                params=params,
                output_hessian=output_hessian,
                loss_count=loss_count,
                progress=progress,
                check_deterministic=check_deterministic,
            )

        self._setup(init, data, process_group=process_group, sharded=sharded, timeout=timeout)


class FisherOperator(_DataParallel, _model.FisherOperator):
    """:class:`hesse.FisherOperator` over data spread across ranks.

    As :class:`hesse.distributed.HessianOperator` (sharding, exact weighting,
    failure handling, ``process_group``, ``sharded``, ``timeout``), for the
    Monte-Carlo or empirical Fisher; ``kind``, ``mc_samples``, ``generator`` and
    ``output_hessian`` as in :class:`hesse.FisherOperator`. The Monte-Carlo
    labels of batch ``i`` are drawn from a stream keyed by ``i``, the batch's
    position in the whole of ``data``, so with round-robin sharding (the
    default) the operator equals the single-process one sample for sample; pass
    identically seeded generators on every rank.

    Example:
        >>> import hesse.distributed as hd
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))]
        >>> hd.FisherOperator(model, torch.nn.CrossEntropyLoss(), data, kind="empirical").shape
        (8, 8)
    """

    _title = "FisherOperator"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable[Any],
        *,
        kind: str = "mc",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        params: Any = None,
        output_hessian: Callable | None = None,
        loss_count: Callable | None = None,
        progress: bool = False,
        check_deterministic: bool = False,
        process_group: Any = None,
        sharded: bool = False,
        timeout: float | timedelta | None = None,
    ) -> None:
        def init(local: Iterable[Any]) -> None:
            _model.FisherOperator.__init__(
                self,
                model,
                loss_fn,
                local,
                kind=kind,
                mc_samples=mc_samples,
                generator=generator,
                params=params,
                output_hessian=output_hessian,
                loss_count=loss_count,
                progress=progress,
                check_deterministic=check_deterministic,
            )

        self._setup(init, data, process_group=process_group, sharded=sharded, timeout=timeout)

    def _mc_seed(self) -> float:
        return float(self._seed % 2**52)
