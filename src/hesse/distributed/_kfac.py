"""Data-parallel KFAC and EKFAC: every rank a shard, factors (and counts) summed over ranks.

KFAC's factor pass goes through the model operators' aggregation seam (NOTE
[kfac scaling] in hesse.kfac._kronecker), so the data-parallel behaviour of NOTE
[data parallel] carries over unchanged: each rank accumulates its shard's factor
sums and counts, ``_reduce`` all-reduces them, and every rank holds the factors of
the whole dataset. MC labels are keyed by the global batch position, so the
factors equal the single-process ones for any shard sizes. The factor pass runs
after the ranks have agreed on the parameters (and the MC seed). Products,
inverses and the other queries are then local (no communication).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch  # noqa: F401 - the examples use it
from torch import nn

from hesse.distributed._operators import _DataParallel
from hesse.kfac import _ekfac, _kfac


class _KroneckerDataParallel(_DataParallel):
    """The data-parallel construction shared by KFAC and EKFAC: agree, then the factor pass."""

    _build_in_init = False
    #: the single-process class whose ``__init__`` builds the operator on this rank's shard.
    _base: type
    _seed: int

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable[Any],
        *,
        process_group: Any = None,
        sharded: bool = False,
        timeout: float | timedelta | None = None,
        **options: Any,
    ) -> None:
        def init(local: Iterable[Any]) -> None:
            self._base.__init__(self, model, loss_fn, local, **options)

        self._setup(init, data, process_group=process_group, sharded=sharded, timeout=timeout)
        self._build()  # type: ignore[attr-defined]

    def _mc_seed(self) -> float:
        return float(self._seed % 2**52)


class KFACOperator(_KroneckerDataParallel, _kfac.KFACOperator):
    """:class:`hesse.KFACOperator` over data spread across ranks.

    Each rank passes the same ``data``, model and options; it accumulates the
    factors of its round-robin shard of the batches, and the ranks' sums and
    counts are all-reduced, so every rank holds the single-process operator
    (see NOTE [data parallel]). Options (``fisher_type``, ``kfac_approx``, ...) as
    in :class:`hesse.KFACOperator`, keyword-only; ``process_group``, ``sharded``
    and ``timeout`` as in :class:`hesse.distributed.GGNOperator`. Pass identically
    seeded generators for ``fisher_type="mc"``.

    Raises:
        hesse.distributed.DistributedError: as :class:`hesse.distributed.GGNOperator`.
        TypeError, ValueError, NotImplementedError: as :class:`hesse.KFACOperator`.

    Cost: the factor pass over ``1 / world_size`` of the data per rank, then one
    all-reduce of all factor sums; products, inverses and queries are local.

    Example:
        >>> import hesse.distributed as hd
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))]
        >>> hd.KFACOperator(model, torch.nn.CrossEntropyLoss(), data).shape
        (8, 8)
    """

    _title = "KFACOperator"
    _base = _kfac.KFACOperator


class EKFACOperator(_KroneckerDataParallel, _ekfac.EKFACOperator):
    """:class:`hesse.EKFACOperator` over data spread across ranks.

    As :class:`hesse.distributed.KFACOperator`; the eigenvalue corrections are a
    second pass over each rank's shard, all-reduced like the factors.

    Example:
        >>> import hesse.distributed as hd
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))]
        >>> hd.EKFACOperator(model, torch.nn.CrossEntropyLoss(), data).shape
        (8, 8)
    """

    _title = "EKFACOperator"
    _base = _ekfac.EKFACOperator


__all__ = ["EKFACOperator", "KFACOperator"]
