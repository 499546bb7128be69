"""Distributed curvature on ``torch.distributed``: data-parallel operators, a split dense Hessian.

See docs/distributed.md. Every rank runs the same program; hesse combines the
ranks' parts with collectives that fail loudly (see NOTE [failure] in
:mod:`hesse.distributed._context`).
"""

from hesse.distributed._context import DistributedError
from hesse.distributed._dense import hessian
from hesse.distributed._kfac import EKFACOperator, KFACOperator
from hesse.distributed._operators import FisherOperator, GGNOperator, HessianOperator
from hesse.distributed._sharding import shard

__all__ = [
    "DistributedError",
    "EKFACOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "KFACOperator",
    "hessian",
    "shard",
]
