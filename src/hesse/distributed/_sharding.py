"""Which batches are this rank's: a round-robin shard of an iterable of batches.

# NOTE [sharding]
Batch ``i`` of the data belongs to rank ``i % world_size``. Every rank walks the
same iterable and keeps its own batches, so the shards are disjoint, cover the
data, and may differ in size by one batch (or be empty, with more ranks than
batches); nothing is dropped or repeated. Exact weighting over unequal shards is
the aggregation's business: partial sums and sample counts are summed over ranks
before anything is divided (see NOTE [aggregation] in hesse.operators._model).

Walking the whole iterable costs nothing for a list of tensors; a ``DataLoader``
would load (and discard) the other ranks' batches, so give it a
``DistributedSampler`` with ``drop_last=False`` and ``shuffle=False`` instead and
pass ``sharded=True`` to the operator. Such a sampler pads the last shard with
repeated samples, which counts them twice: make the dataset size divisible by
the number of ranks (or use round-robin sharding) when exactness matters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from hesse.distributed._context import resolve
from hesse.operators._data import check_reiterable


class Shard:
    """The batches ``rank, rank + world_size, rank + 2 * world_size, ...`` of ``data``.

    Re-iterable whenever ``data`` is (every product walks the data again).
    """

    def __init__(self, data: Iterable[Any], rank: int, world_size: int) -> None:
        self.data = data
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[Any]:
        return islice(iter(self.data), self.rank, None, self.world_size)

    def __repr__(self) -> str:
        return f"Shard(rank={self.rank}, world_size={self.world_size}, data={type(self.data).__name__})"


def shard(data: Iterable[Any], *, process_group: Any = None) -> Shard:
    """This rank's round-robin shard of ``data``: batches ``i`` with ``i % world_size == rank``.

    The data-parallel operators shard their data themselves; use this to walk the
    same batches in your own code. Without an initialised ``torch.distributed``
    (and without ``process_group``) the shard is all of ``data``.

    Args:
        data: a re-iterable collection of batches (a list, a ``DataLoader``).
        process_group: the ranks to shard over (default: the default group).

    Returns:
        A re-iterable view of this rank's batches, in order.

    Raises:
        TypeError: for a one-shot iterator (every product walks the data again).

    Cost: walks ``data`` once per iteration, keeping every ``world_size``-th batch.

    Example:
        >>> list(shard([0, 1, 2, 3, 4]))  # a single process keeps everything
        [0, 1, 2, 3, 4]
    """
    call = "hesse.distributed.shard(data)"
    ctx = resolve(call, process_group)
    return make_shard(data, ctx.rank, ctx.world_size, call=call)


def make_shard(data: Iterable[Any], rank: int, world_size: int, *, call: str) -> Shard:
    """Validate ``data`` and return the shard of ``rank`` among ``world_size``."""
    check_reiterable(call, data)
    assert 0 <= rank < world_size, f"{call}: rank {rank} outside [0, {world_size})"
    return Shard(data, rank, world_size)
