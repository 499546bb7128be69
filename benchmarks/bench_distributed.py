"""Data-parallel curvature: dataset-level HVPs and top-5 eigenvalues on 1 vs 2 processes.

One launch of two gloo ranks (each ``torch.set_num_threads(1)``) times both
configurations side by side, interleaved round by round so that load from other
processes falls on both alike:

* **1 process**: rank 0 alone runs the single-process ``hesse.HessianOperator``
  over the whole dataset while rank 1 waits at a barrier (idle);
* **2 processes**: both ranks run ``hesse.distributed.HessianOperator``, each on
  half of the batches, every product all-reduced.

Rows report the median time, the speed-up (1-process time / 2-process time; the
target is at least 1.6x on a 2-core machine), and the communication share: the
time rank 0 spends in collectives (the status exchange and the all-reduce,
waiting for the slower rank included) over the total. Peak memory is rank 0's
RSS growth during the first call (NOTE [peak memory] in ``_measure.py``).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

WIDTH = 128
FEATURES, CLASSES = 64, 10


def _workload(num_samples: int, batch: int) -> tuple[torch.nn.Module, list[Any]]:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, WIDTH),
        torch.nn.Tanh(),
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.Tanh(),
        torch.nn.Linear(WIDTH, CLASSES),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    X = torch.randn(num_samples, FEATURES, generator=g)
    Y = torch.randint(0, CLASSES, (num_samples,), generator=g)
    return model, [(X[i : i + batch], Y[i : i + batch]) for i in range(0, num_samples, batch)]


def _rank(config: dict[str, Any]) -> dict[str, Any] | None:
    import torch.distributed as dist
    from benchmarks._measure import peak_memory, prepare_process

    import hesse
    import hesse.distributed as hd

    prepare_process(threads=1)
    rank = dist.get_rank()
    model, data = _workload(config["num_samples"], config["batch"])
    ce = torch.nn.CrossEntropyLoss()
    single = hesse.HessianOperator(model, ce, data) if rank == 0 else None
    spread = hd.HessianOperator(model, ce, data)
    n = spread.shape[0]
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))

    def alone(fn: Any) -> tuple[Any, float, int | None]:
        """Rank 0 runs ``fn`` by itself; rank 1 waits."""
        dist.barrier()
        out: tuple[Any, float, int | None] = (None, 0.0, None)
        if rank == 0:
            out = peak_memory(fn)
        dist.barrier()
        return out

    def together(fn: Any) -> tuple[Any, float, int | None, float]:
        dist.barrier()
        comm = spread.comm_seconds
        result, seconds, peak = peak_memory(fn)
        return result, seconds, peak, spread.comm_seconds - comm

    def eigsh(op: Any) -> Any:
        gen = torch.Generator().manual_seed(2)
        return hesse.eigsh(op, k=5, tol=config["tol"], generator=gen)

    rec: dict[str, Any] = {"n": n, "batches": len(data)}
    # First calls: peak memory (and warm-up).
    rec["hvp1_peak"] = alone(lambda: single @ v)[2]
    rec["hvp2_peak"] = together(lambda: spread @ v)[2]
    t1, t2, share = [], [], []
    for _ in range(config["repeats"]):
        t1.append(alone(lambda: single @ v)[1])
        _, seconds, _, comm = together(lambda: spread @ v)
        t2.append(seconds)
        share.append(comm / seconds)
    rec.update(hvp1=t1, hvp2=t2, hvp_share=share)
    e1, e2, eshare = [], [], []
    for r in range(config["eig_repeats"]):
        res1, s1, p1 = alone(lambda: eigsh(single))
        res2, s2, p2, comm = together(lambda: eigsh(spread))
        e1.append(s1)
        e2.append(s2)
        eshare.append(comm / s2)
        if r == 0:
            rec["eig1_peak"], rec["eig2_peak"] = p1, p2
            rec["eig2_matvecs"] = res2.num_matvecs
            rec["eig2_values"] = res2.eigenvalues
            if rank == 0:
                rec["eig1_matvecs"] = res1.num_matvecs
                rec["eig1_values"] = res1.eigenvalues
    rec.update(eig1=e1, eig2=e2, eig_share=eshare)
    # The collectives alone, after a barrier (no waiting for a slower rank): what one
    # product with one vector costs in communication proper.
    from hesse.distributed._context import all_reduce_, exchange

    for k in (1, 4):  # one vector (HVP), one block of eigsh
        pure = []
        for _ in range(5):
            dist.barrier()
            t = time.perf_counter()
            exchange(spread._ctx, "bench", [1.0, 2.0])
            all_reduce_(spread._ctx, "bench", torch.zeros(n, k))
            pure.append(time.perf_counter() - t)
        rec[f"pure_comm{k}"] = statistics.median(pure)
    rec["load"] = os.getloadavg()[0]
    return rec if rank == 0 else None


def run(quick: bool) -> list[dict[str, Any]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        return [
            {
                "workload": "distributed",
                "method": "hesse.distributed",
                "time_s": None,
                "peak_mem_bytes": None,
                "note": "torch.distributed with gloo not available",
            }
        ]
    from hesse.distributed._launch import launch

    config = {
        "num_samples": 512 if quick else 4096,
        "batch": 64 if quick else 256,
        "repeats": 3 if quick else 7,
        "eig_repeats": 1 if quick else 2,
        "tol": 1e-3 if quick else 1e-6,
    }
    start = time.perf_counter()
    rec = launch(_rank, 2, (config,), timeout=600.0, deadline=1800.0)[0].value
    total = time.perf_counter() - start
    shape = (
        f"MLP {FEATURES}-{WIDTH}-{WIDTH}-{CLASSES} tanh, n={rec['n']}, "
        f"N={config['num_samples']} in {rec['batches']} batches"
    )
    eig_diff = float((rec["eig1_values"] - rec["eig2_values"]).abs().max())
    rows = []
    for workload, key, extra1, extra2 in (
        (f"dataset HVP ({shape})", "hvp", {}, {}),
        (
            f"top-5 eigenvalues, eigsh tol={config['tol']:g} ({shape})",
            "eig",
            {"matvecs": rec["eig1_matvecs"]},
            {"matvecs": rec["eig2_matvecs"], "max |diff| vs 1 process": eig_diff},
        ),
    ):
        t1 = statistics.median(rec[f"{key}1"])
        t2 = statistics.median(rec[f"{key}2"])
        speedup = t1 / t2
        share = statistics.median(rec[f"{key}_share"])
        pure = rec["pure_comm4"] if key == "eig" else rec["pure_comm1"]
        products = -(-rec["eig2_matvecs"] // 4) if key == "eig" else 1  # eigsh: blocks of 4
        verdict = "meets" if speedup >= 1.6 else "misses"
        rows.append(
            {
                "workload": workload,
                "method": "hesse, 1 process",
                "time_s": t1,
                "peak_mem_bytes": rec[f"{key}1_peak"],
                "reference": True,
                "speedup": 1.0,
                **extra1,
                "note": f"rank 0 alone (rank 1 idle); median of {len(rec[f'{key}1'])}",
            }
        )
        rows.append(
            {
                "workload": workload,
                "method": "hesse.distributed, 2 processes (gloo)",
                "time_s": t2,
                "peak_mem_bytes": rec[f"{key}2_peak"],
                "speedup": speedup,
                "comm_share": pure * products / t2,
                "wait_share": share,
                **extra2,
                "note": (
                    f"{verdict} the 1.6x target; comm share: the collectives alone "
                    f"({pure * 1e3:.2f} ms per product) / total; wait share: "
                    "rank 0's time in collectives, waiting for the slower rank included / "
                    f"total; 1-min load avg {rec['load']:.1f} on "
                    f"{os.cpu_count()} cores; suite {total:.0f} s"
                ),
            }
        )
    return rows


if __name__ == "__main__":  # pragma: no cover
    import sys

    for row in run("--quick" in sys.argv):
        print(row)
