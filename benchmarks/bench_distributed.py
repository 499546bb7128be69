"""Data-parallel curvature: dataset-level HVPs and top-5 eigenvalues on 1 vs 2 processes.

One launch of two gloo ranks (each ``torch.set_num_threads(1)``) times both
configurations side by side, interleaved round by round so that load from other
processes falls on both alike:

* **1 process**: rank 0 alone runs the single-process ``hesse.HessianOperator``
  over the whole dataset while rank 1 waits at a barrier (idle);
* **2 processes**: both ranks run ``hesse.distributed.HessianOperator``, each on
  half of the batches, every product all-reduced.

Rows report the median wall time and the speed-up (1-process time / 2-process
time; the target is at least 1.6x on a 2-core machine); ``cpu_s``, the busier
rank's CPU time, and ``cpu_speedup``, the speed-up that CPU times predict for
otherwise idle cores (wall times on a machine shared with other jobs mostly
measure the others); ``comm_share``, the collectives alone (timed after a
barrier, no waiting) over the total; and ``wait_share``, rank 0's time inside
collectives, waiting for the slower rank included, over the total. Peak memory
is rank 0's RSS growth during the first call (NOTE [peak memory] in
``_measure.py``).
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

    def timed(fn: Any, first: bool) -> tuple[Any, float, float, int | None]:
        """``fn()`` with its wall and CPU time; on a first call also its peak memory."""
        box: dict[str, Any] = {}

        def inner() -> None:
            wall, cpu = time.perf_counter(), time.process_time()
            box["result"] = fn()
            box["wall"] = time.perf_counter() - wall
            box["cpu"] = time.process_time() - cpu

        peak = peak_memory(inner)[-1] if first else None
        if not first:
            inner()
        return box["result"], box["wall"], box["cpu"], peak

    def alone(fn: Any, first: bool = False) -> dict[str, Any]:
        """Rank 0 runs ``fn`` by itself; rank 1 waits at the barrier."""
        dist.barrier()
        out: dict[str, Any] = {}
        if rank == 0:
            out["result"], out["wall"], out["cpu"], out["peak"] = timed(fn, first)
        dist.barrier()
        return out

    def together(fn: Any, first: bool = False) -> dict[str, Any]:
        """Both ranks run ``fn``; CPU time is the busier rank's."""
        dist.barrier()
        comm = spread.comm_seconds
        out: dict[str, Any] = {}
        out["result"], out["wall"], cpu, out["peak"] = timed(fn, first)
        out["comm"] = spread.comm_seconds - comm
        busiest = torch.tensor([cpu], dtype=torch.float64)
        dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
        out["cpu"] = float(busiest)
        return out

    def eigsh(op: Any) -> Any:
        gen = torch.Generator().manual_seed(2)
        return hesse.eigsh(op, k=5, tol=config["tol"], generator=gen)

    rec: dict[str, Any] = {"n": n, "batches": len(data)}
    tasks = {
        "hvp": (lambda: single @ v, lambda: spread @ v, config["repeats"]),
        "eig": (lambda: eigsh(single), lambda: eigsh(spread), config["eig_repeats"]),
    }
    for key, (one, two, repeats) in tasks.items():
        rounds = []
        for r in range(repeats + (1 if key == "hvp" else 0)):
            # Interleaved rounds; the HVP's first round (peak memory, warm-up) is not timed.
            first = r == 0
            rounds.append((alone(one, first), together(two, first)))
        a0, b0 = rounds[0]
        rec[f"{key}1_peak"], rec[f"{key}2_peak"] = a0.get("peak"), b0["peak"]
        timed_rounds = rounds[1:] if key == "hvp" else rounds
        rec[f"{key}1"] = [a.get("wall") for a, _ in timed_rounds]
        rec[f"{key}1_cpu"] = [a.get("cpu") for a, _ in timed_rounds]
        rec[f"{key}2"] = [b["wall"] for _, b in timed_rounds]
        rec[f"{key}2_cpu"] = [b["cpu"] for _, b in timed_rounds]
        rec[f"{key}_share"] = [b["comm"] / b["wall"] for _, b in timed_rounds]
        if key == "eig":
            rec["eig2_matvecs"] = b0["result"].num_matvecs
            rec["eig2_values"] = b0["result"].eigenvalues
            if rank == 0:
                rec["eig1_matvecs"] = a0["result"].num_matvecs
                rec["eig1_values"] = a0["result"].eigenvalues
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
    rec = launch(_rank, 2, (config,), timeout=600.0, deadline=1800.0)[0].value
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
        c1 = statistics.median(rec[f"{key}1_cpu"])
        c2 = statistics.median(rec[f"{key}2_cpu"])
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
                "cpu_s": c1,
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
                "cpu_s": c2,
                "speedup": speedup,
                "cpu_speedup": c1 / c2,
                "comm_share": pure * products / t2,
                "wait_share": share,
                **extra2,
                "note": (
                    f"wall speed-up {verdict} the 1.6x target (1-min load {rec['load']:.1f} on "
                    f"{os.cpu_count()} cores); collectives {pure * 1e3:.2f} ms per product"
                ),
            }
        )
    return rows


if __name__ == "__main__":  # pragma: no cover
    import sys

    for row in run("--quick" in sys.argv):
        print(row)
