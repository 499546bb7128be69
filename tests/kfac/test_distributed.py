"""Data-parallel KFAC/EKFAC on gloo: two ranks with unequal shards equal one process."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hesse
import hesse.distributed as hd
from hesse.distributed._launch import launch
from tests.kfac.test_kfac import ce_data, mlp

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

SIZES = (6, 6, 3)  # rank 0 gets batches 0 and 2 (a short one), rank 1 batch 1


def _results(ns):
    model, data, ce = mlp(), ce_data(sizes=SIZES), nn.CrossEntropyLoss()
    mc = ns.KFACOperator(
        model, ce, data, fisher_type="mc", generator=torch.Generator().manual_seed(3)
    )
    out = {
        "kfac": ns.KFACOperator(model, ce, data).to_dense(),
        "kfac reduce": ns.KFACOperator(model, ce, data, kfac_approx="reduce").to_dense(),
        "kfac mc": mc.to_dense(),
        "ekfac": ns.EKFACOperator(model, ce, data, fisher_type="empirical").to_dense(),
    }
    out["mc seed"] = torch.tensor(float(mc._seed))
    return out


def _rank_program():
    out = _results(hd)
    op = hd.KFACOperator(mlp(), nn.CrossEntropyLoss(), ce_data(sizes=SIZES))
    out["world"] = torch.tensor([op.rank, op.world_size, len(list(op.data))])
    return out


def test_two_ranks_equal_one_process():
    reference = _results(hesse)
    ranks = launch(_rank_program, 2)
    assert [res.value.pop("world").tolist() for res in ranks] == [[0, 2, 2], [1, 2, 1]]
    for res in ranks:
        for key, expected in reference.items():
            torch.testing.assert_close(res.value[key], expected, rtol=1e-12, atol=1e-14, msg=key)
