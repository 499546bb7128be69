"""Coverage of hesse's nominal 95 % intervals: estimator x operator family, many seeds.

Usage (from the repository root)::

    python -m benchmarks.interval_coverage [--seeds N] [--level 0.95]

Prints, per stochastic estimator (budget in products) and operator family, the
fraction of seeds whose ``Estimate.interval(level)`` contains the exact value
(averaged over entries for diagonals), and ``|z|`` of the mean over seeds (rms over
entries for diagonals; about 1 or less for an unbiased estimator). The families and
estimators are those of ``tests/estimators/test_coverage.py`` (which asserts
93-97 %), plus the Monte-Carlo GGN diagonals (``"mc"``, ``"gnb"``) on the MLP's GGN
operator itself. Not part of ``hesse bench``: it measures statistics, not time.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from tests.estimators.coverage_cases import BUDGETS, ESTIMATORS, FAMILIES, coverage, mlp

import hesse

MC_DRAWS = 16


def mc_coverage(method: str, seeds: int, level: float) -> dict[str, float]:
    """Coverage of the Monte-Carlo GGN diagonal (``MC_DRAWS`` draws) on the MLP's GGN."""
    model, x, y = mlp()
    G = hesse.GGNOperator(model, torch.nn.CrossEntropyLoss(), [(x[:20], y[:20]), (x[20:], y[20:])])
    truth = hesse.diagonal(G, method="exact")
    values, covered = [], []
    for seed in range(seeds):
        est = hesse.diagonal(
            G, method=method, num_matvecs=MC_DRAWS, generator=torch.Generator().manual_seed(seed)
        )
        low, high = est.interval(level)
        covered.append(((low <= truth) & (truth <= high)).double().mean())
        values.append(est.value)
    V = torch.stack(values)
    z = (V.mean(0) - truth) / (V.std(0) / math.sqrt(seeds)).clamp_min(1e-300)
    return {
        "coverage": float(torch.stack(covered).mean()),
        "bias_z": float(z.square().mean().sqrt()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per cell (default: as the test)"
    )
    parser.add_argument("--level", type=float, default=0.95)
    args = parser.parse_args()
    torch.set_num_threads(1)
    width = 15
    print(f"nominal {args.level:.0%} intervals: coverage (|z| of the mean over seeds)")
    print(f"{'estimator':<30}" + "".join(f"{f:>{width}}" for f in FAMILIES))
    start = time.perf_counter()
    for estimator in ESTIMATORS:
        m, default_seeds = BUDGETS[estimator]
        seeds = args.seeds or default_seeds
        cells = []
        for name in FAMILIES:
            r = coverage(estimator, name, seeds, args.level)
            cells.append(f"{r['coverage']:.3f} ({r['bias_z']:.1f})")
        label = f"{estimator}, m={m}, {seeds} seeds"
        print(f"{label:<30}" + "".join(f"{c:>{width}}" for c in cells), flush=True)
    for method in ("mc", "gnb"):
        seeds = args.seeds or 200
        r = mc_coverage(method, seeds, args.level)
        label = f"diagonal {method}, {MC_DRAWS} draws, {seeds} seeds"
        cell = f"{r['coverage']:.3f} ({r['bias_z']:.1f})"
        print(f"{label:<30}" + " " * (width * 4) + f"{cell:>{width}}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
