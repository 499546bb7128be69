"""Distributed curvature on gloo: N ranks equal one process; a failing rank never hangs the rest.

Each spawn is expensive (a fork server, then one process per rank), so each test
launches once and checks many things: every rank computes the same list of
results with ``hesse.distributed``; the parent computes it in one process with
``hesse`` (and a few independent references with ``torch.func``) and compares.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import hesse
import hesse.distributed as hd
from hesse.distributed._dense import split_counts
from hesse.distributed._launch import launch
from hesse.distributed._sharding import Shard

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

DT = torch.float64
#: batch sizes: a short last batch, and 5 batches so that 2 and 3 ranks get unequal shards.
SIZES = (6, 6, 6, 6, 3)
TOL = dict(rtol=1e-12, atol=1e-12)


# -- the problem, built identically in the parent and in every rank --------------------
def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(
        DT
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(m, 4, generator=g, dtype=DT), torch.randint(0, 3, (m,), generator=g))
        for m in SIZES
    ]


def _dense_f(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    return (x.sin() * (w["a"] @ x)).sum() + (w["b"] * x[:3]).prod() + (x**4).sum() * w["a"].sum()


def _dense_args() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, generator=g, dtype=DT)
    return x, {
        "a": torch.randn(7, 7, generator=g, dtype=DT),
        "b": torch.randn(3, generator=g, dtype=DT),
    }


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.cache
def _reference() -> dict[str, torch.Tensor]:
    return _results(hesse)


def _results(ns: Any) -> dict[str, torch.Tensor]:
    """Everything compared across process counts; ``ns`` is ``hesse`` or ``hesse.distributed``."""
    model, data, ce = _model(), _data(), torch.nn.CrossEntropyLoss()
    H = ns.HessianOperator(model, ce, data)
    G = ns.GGNOperator(model, ce, data)
    F = ns.FisherOperator(model, ce, data, kind="mc", mc_samples=2, generator=_gen(3))
    E = ns.FisherOperator(model, ce, data, kind="empirical")
    n = H.shape[0]
    V = torch.randn(n, 3, generator=_gen(4), dtype=DT)
    out = {f"{name} @ V": op @ V for name, op in [("H", H), ("G", G), ("F", F), ("E", E)]}
    out["H @ v"] = H @ V[:, 0]
    out["H @ dict"] = H.layout.flatten(H @ H.layout.unflatten(V[:, 1]))
    out["H dense"] = H.to_dense()
    out["diag G exact"] = hesse.diagonal(G, method="exact")
    out["diag F exact"] = hesse.diagonal(F, method="exact")
    out["diag H exact"] = hesse.diagonal(H, method="exact")
    for method in ("mc", "gnb"):  # sampled labels keyed by the global batch index
        est = hesse.diagonal(G, method=method, num_matvecs=2, generator=_gen(5))
        out[f"diag G {method}"] = torch.stack([est.value, est.stderr])
    hutch = hesse.diagonal(H, method="hutchinson", num_matvecs=6, generator=_gen(6))
    out["diag H hutchinson"] = torch.stack([hutch.value, hutch.stderr])
    est = hesse.trace(H, method="hutch++", num_matvecs=12, generator=_gen(7))
    out["trace hutch++"] = torch.stack([est.value, est.stderr])
    values, vectors = hesse.eigsh(G, k=3, tol=1e-10, generator=_gen(8))
    out["eigsh values"] = values
    out["eigsh |vectors|"] = vectors.abs()
    grid, density = hesse.spectral_density(G, num_probes=2, lanczos_steps=8, generator=_gen(9))
    out["density grid"], out["density"] = grid, density
    x, w = _dense_args()
    if ns is hd:
        out["dense hessian"] = ns.hessian(_dense_f, argnums=0, chunk_size=2)(x, w)
        out["dense hessian (x, w)"] = torch.cat(
            [t.reshape(-1) for t in _flat_blocks(ns.hessian(_dense_f, argnums=(0, 1))(x, w))]
        )
    else:
        out["dense hessian"] = hesse.hessian(_dense_f, argnums=0)(x, w)
        out["dense hessian (x, w)"] = torch.cat(
            [t.reshape(-1) for t in _flat_blocks(hesse.hessian(_dense_f, argnums=(0, 1))(x, w))]
        )
    return out


def _flat_blocks(tree: Any) -> list[torch.Tensor]:
    return torch.utils._pytree.tree_flatten(tree)[0]


def _rank_info() -> dict[str, Any]:
    model, data, ce = _model(), _data(), torch.nn.CrossEntropyLoss()
    H = hd.HessianOperator(model, ce, data)
    # Data sharded by the caller (sharded=True) gives the same operator.
    S = hd.HessianOperator(model, ce, hd.shard(data), sharded=True)
    V = torch.randn(H.shape[0], 2, generator=_gen(4), dtype=DT)
    same = torch.equal(S @ V, H @ V)
    return {
        "rank": H.rank,
        "world_size": H.world_size,
        "shard": [int(b[0].shape[0]) for b in H.data],
        "comm_calls": H.comm_calls,
        "sharded equals round-robin": same,
    }


# -- rank programs ------------------------------------------------------------------------
def _equivalence() -> dict[str, Any]:
    return {"results": _results(hd), "info": _rank_info()}


def _equivalence_then_failures() -> dict[str, Any]:
    out = _equivalence()
    # More ranks than columns: rank 2 computes none and still takes part in the gather.
    out["tiny hessian"] = hd.hessian(lambda x: (x**3).sum())(torch.tensor([1.0, 2.0], dtype=DT))
    rank = dist.get_rank()
    model, data, ce = _model(), _data(), torch.nn.CrossEntropyLoss()
    H = hd.HessianOperator(model, ce, data, timeout=2.0)
    v = torch.ones(H.shape[0], dtype=DT)
    failures: dict[str, tuple[str, float]] = {}

    def attempt(name: str, fn: Any) -> None:
        start = time.perf_counter()
        try:
            fn()
            failures[name] = ("no error", time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 - recorded for the parent
            failures[name] = (f"{type(err).__name__}: {err}", time.perf_counter() - start)

    # (0) fewer batches than ranks: every rank refuses at construction, none hangs.
    attempt("too few batches", lambda: hd.GGNOperator(model, ce, data[:2]))

    # (0') rank 1 alone is refused at construction (a parameter it does not have).
    attempt(
        "one rank refused",
        lambda: hd.FisherOperator(model, ce, data, params=["nope"] if rank == 1 else None),
    )

    # (a) rank 1 raises in the middle of a data pass; the group stays usable.
    def boom(module: Any, args: Any) -> None:
        raise ValueError("boom: a bad batch on rank 1")

    hook = model.register_forward_pre_hook(boom) if rank == 1 else None
    attempt("raise", lambda: H @ v)
    if hook is not None:
        hook.remove()
    attempt("healthy again", lambda: H @ v)
    # (b) rank 2 passes a different vector (an unseeded probe, say).
    attempt("different vectors", lambda: H @ (v if rank != 2 else -v))
    # (c) rank 2 stalls, then disappears; the others wait at most the 2 s timeout.
    if rank == 2:
        time.sleep(4.5)
        os._exit(3)
    attempt("stalled rank", lambda: H @ v)
    # (d) a new operator's start-up barrier names the rank that never arrives.
    attempt("missing rank", lambda: hd.GGNOperator(model, ce, data, timeout=2.0))
    out["failures"] = failures
    return out


# -- tests --------------------------------------------------------------------------------
def _compare(ranks: list[Any]) -> None:
    reference = _reference()
    first = ranks[0].value["results"]
    assert set(first) == set(reference)
    for res in ranks:
        for key, expected in reference.items():
            got = res.value["results"][key]
            torch.testing.assert_close(got, expected, **TOL, msg=f"rank {res.rank}: {key}")
            # Every rank holds the same result, bit for bit.
            assert torch.equal(got, first[key]), f"rank {res.rank} differs from rank 0 on {key}"


def _unflat(like: dict[str, torch.Tensor], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for k, t in like.items():
        out[k] = flat[offset : offset + t.numel()].reshape(t.shape)
        offset += t.numel()
    return out


def _independent_checks(results: dict[str, torch.Tensor]) -> None:
    """The distributed results against torch.func, not against hesse."""
    model, data = _model(), _data()
    params = {k: p.detach() for k, p in model.named_parameters()}
    X = torch.cat([x for x, _ in data])
    Y = torch.cat([y for _, y in data])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, _unflat(params, flat), (X,))
        return torch.nn.functional.cross_entropy(out, Y)

    flat = torch.cat([t.reshape(-1) for t in params.values()])
    dense = torch.func.hessian(loss)(flat)
    V = torch.randn(dense.shape[0], 3, generator=_gen(4), dtype=DT)
    torch.testing.assert_close(results["H @ V"], dense @ V, **TOL)
    torch.testing.assert_close(results["diag H exact"], dense.diagonal(), **TOL)
    # The GGN of cross-entropy: J^T (diag(p) - p p^T) J / N, with J the output Jacobian.
    J = torch.func.jacrev(lambda fl: torch.func.functional_call(model, _unflat(params, fl), (X,)))(
        flat
    )  # (N, C, n)
    p = torch.softmax(torch.func.functional_call(model, params, (X,)), dim=1)
    Hout = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    ggn = torch.einsum("nci,ncd,ndj->ij", J, Hout, J) / X.shape[0]
    top = torch.linalg.eigvalsh(ggn).flip(0)[:3]
    torch.testing.assert_close(results["eigsh values"], top, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results["diag G exact"], ggn.diagonal(), **TOL)
    x, w = _dense_args()
    torch.testing.assert_close(results["dense hessian"], torch.func.hessian(_dense_f)(x, w), **TOL)


def test_two_ranks_equal_one_process() -> None:
    ranks = launch(_equivalence, 2)
    _compare(ranks)
    _independent_checks(ranks[1].value["results"])
    infos = [r.value["info"] for r in ranks]
    assert [(i["rank"], i["world_size"]) for i in infos] == [(0, 2), (1, 2)]
    assert all(
        i["sharded equals round-robin"] and i["comm_calls"] == 2 for i in infos
    )  # one product: 2
    # Round-robin shards: batches 0, 2, 4 and 1, 3 (unequal, the short one on rank 0).
    assert [i["shard"] for i in infos] == [[6, 6, 3], [6, 6]]


def test_three_ranks_unequal_shards_and_failures() -> None:
    start = time.perf_counter()
    ranks = launch(_equivalence_then_failures, 3, check=False)
    elapsed = time.perf_counter() - start
    assert ranks[2].exitcode == 3 and ranks[2].value is None, ranks[2]
    for res in ranks[:2]:
        assert res.error is None, f"rank {res.rank}: {res.error}\n{res.traceback}"
    assert [r.value["info"]["shard"] for r in ranks[:2]] == [[6, 6], [6, 3]]
    ranks[2] = ranks[0]  # the equivalence part of rank 2 is checked through its twin ranks
    _compare(ranks[:2])

    assert all(r.value["info"]["sharded equals round-robin"] for r in ranks[:2])
    for res in ranks[:2]:
        expected = torch.diag(torch.tensor([6.0, 12.0], dtype=DT))
        torch.testing.assert_close(res.value["tiny hessian"], expected, rtol=0, atol=0)
    f0, f1 = ranks[0].value["failures"], ranks[1].value["failures"]
    for f in (f0, f1):
        assert f["too few batches"][0].startswith(
            "ValueError: hesse.distributed.GGNOperator(model, loss_fn, data): data has 2 batch(es) "
            "for 3 ranks"
        ), f["too few batches"][0]
    assert f1["one rank refused"][0].startswith("ValueError: hesse.FisherOperator"), f1
    assert "rank(s) 1 of 3 raised an error" in f0["one rank refused"][0], f0
    # (a) the raising rank re-raises its own error; the others stop at once, naming it.
    assert f1["raise"][0] == "ValueError: boom: a bad batch on rank 1"
    assert f0["raise"][0].startswith("DistributedError: hesse.distributed.HessianOperator")
    assert "rank(s) 1 of 3 raised an error" in f0["raise"][0]
    assert f0["raise"][1] < 2.0 and f1["raise"][1] < 2.0
    assert f0["healthy again"][0] == f1["healthy again"][0] == "no error"
    # (b) different vectors on one rank: every rank refuses.
    for f in (f0, f1):
        assert "disagree on the input vectors" in f["different vectors"][0]
        assert "torch.Generator" in f["different vectors"][0]
    # (c) a stalled rank: the others fail after the 2 s timeout, not later.
    for f in (f0, f1):
        message, seconds = f["stalled rank"]
        assert message.startswith("DistributedError:"), message
        assert "collectives wait at most 2 s" in message
        assert 1.5 < seconds < 5.0, seconds
    # (d) after rank 2 exited, a new operator fails at its start-up barrier, in bounded time.
    for f in (f0, f1):
        message, seconds = f["missing rank"]
        assert message.startswith("DistributedError: hesse.distributed.GGNOperator"), message
        assert seconds < 5.0, seconds
    assert elapsed < 60.0


# -- single-process behaviour (no spawn) ---------------------------------------------------
def test_alone_is_the_single_process_computation() -> None:
    x, w = _dense_args()
    torch.testing.assert_close(
        hd.hessian(_dense_f)(x, w), torch.func.hessian(_dense_f)(x, w), rtol=1e-12, atol=1e-12
    )
    H = hd.HessianOperator(_model(), torch.nn.CrossEntropyLoss(), _data())
    assert (H.rank, H.world_size, H.comm_calls) == (0, 1, 0)
    assert list(hd.shard([0, 1, 2])) == [0, 1, 2]
    s = Shard(list(range(7)), 1, 3)
    assert list(s) == [1, 4] and list(s) == [1, 4]  # re-iterable
    assert split_counts(7, 3) == [3, 2, 2] and split_counts(2, 3) == [1, 1, 0]


def test_bad_arguments() -> None:
    data = _data()
    ce = torch.nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match=r"hesse.distributed.shard\(data\): .*one-shot iterator"):
        hd.shard(iter(data))
    with pytest.raises(TypeError, match=r"expected an iterable of \(inputs, targets\) batches"):
        hd.shard(3)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"HessianOperator\(model, loss_fn, data\): expected process_group"
    ):
        hd.HessianOperator(_model(), ce, data, process_group="world")
    with pytest.raises(ValueError, match=r"timeout should be positive"):
        hd.GGNOperator(_model(), ce, data, timeout=0)
    with pytest.raises(TypeError, match=r"expected timeout in seconds"):
        hd.hessian(_dense_f, timeout="1s")(*_dense_args())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected sharded to be a bool"):
        hd.FisherOperator(_model(), ce, data, sharded=1)  # type: ignore[arg-type]
    with pytest.raises(
        MemoryError, match=r"hesse.distributed.hessian\(f\)\(x, y\): the dense Hessian"
    ):
        hd.hessian(_dense_f, memory_budget=100)(*_dense_args())
