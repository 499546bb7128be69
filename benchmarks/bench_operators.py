"""Curvature operators and diagonals: hesse against BackPACK and curvlinops.

Workloads (issue 4):

- ``* matvec``: one product of each operator (Hessian, GGN, Fisher) on a
  784-100-100-10 tanh MLP and on a small CNN (two conv + pool layers, 28x28
  inputs), batch 128, float32; the ``x_grad`` column is the time over one
  gradient of the same loss in the same run. Peers: curvlinops' operators.
- ``GGN diag exact``: ``hesse.diagonal(GGNOperator, method="exact")`` against
  BackPACK ``DiagGGNExact`` on the 784-100-100-10 tanh MLP, batch 128, and on the
  CNN, float64; ``error`` = largest absolute difference to hesse's diagonal.
- ``GGN diag MC``: ``method="mc"`` against BackPACK ``DiagGGNMC`` (one sample);
  ``error`` = relative L2 error to the exact diagonal.
- ``hutchinson`` / ``xdiag``: relative L2 error of the GGN diagonal estimate at
  equal matvec budgets, mean over seeds, against curvlinops' ``hutchinson_diag``
  and ``xdiag`` on the same GGN (a 64-32-10 tanh MLP on 256 samples, float64).

Peers are optional (the ``bench`` extra); a missing one gives a "not installed" row.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import hesse

try:  # as a package (benchmarks.run) or as a script folder on sys.path
    from benchmarks._measure import measure, prepare_process
except ImportError:  # pragma: no cover
    from _measure import measure, prepare_process  # type: ignore[no-redef]


def _missing(workload: str, method: str) -> dict[str, Any]:
    return {
        "workload": workload,
        "method": method,
        "time_s": None,
        "ratio": None,
        "peak_mem_bytes": None,
        "error": None,
        "note": "not installed",
    }


def _row(workload: str, method: str, m: dict[str, Any], **extra: Any) -> dict[str, Any]:
    row = {
        "workload": workload,
        "method": method,
        "time_s": m["time_s"],
        "peak_mem_bytes": m["peak_mem_bytes"],
        "error": None,
        "note": "",
    }
    row.update(extra)
    return row


# -- models ------------------------------------------------------------------------------
def mlp(dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear's initialisation draws from the global RNG
    model = nn.Sequential(
        nn.Linear(784, 100), nn.Tanh(), nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 10)
    ).to(dtype)
    X = torch.randn(128, 784, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (128,), generator=gen)
    return model, X, y


def cnn(
    dtype: torch.dtype, seed: int = 0, batch: int = 128
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    ).to(dtype)
    X = torch.randn(batch, 1, 28, 28, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, X, y


# -- matvecs ------------------------------------------------------------------------------
def _matvec_rows(name: str, build: Callable, quick: bool) -> list[dict[str, Any]]:
    from torch.func import functional_call

    model, X, y = build(torch.float32)
    loss_fn = nn.CrossEntropyLoss()
    data = [(X, y)]
    params = {k: p.detach() for k, p in model.named_parameters()}
    v = torch.randn(
        sum(p.numel() for p in params.values()), generator=torch.Generator().manual_seed(1)
    )

    def gradient() -> Any:
        return torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (X,)), y)

    cached = hesse.hessian_operator(f)(params)
    ops = {
        "Hessian": {
            "hesse.HessianOperator": hesse.HessianOperator(model, loss_fn, data),
            "hesse.hessian_operator (cached graph)": cached,
        },
        "GGN": {"hesse.GGNOperator": hesse.GGNOperator(model, loss_fn, data)},
        "Fisher": {
            "hesse.FisherOperator(kind='mc')": hesse.FisherOperator(model, loss_fn, data),
            "hesse.FisherOperator(kind='empirical')": hesse.FisherOperator(
                model, loss_fn, data, kind="empirical"
            ),
        },
    }
    peers: dict[str, dict[str, Any]] = {k: {} for k in ops}
    try:
        import curvlinops as cl

        plist = list(model.parameters())
        peers["Hessian"]["curvlinops HessianLinearOperator"] = cl.HessianLinearOperator(
            model, loss_fn, plist, data, check_deterministic=False
        )
        peers["GGN"]["curvlinops GGNLinearOperator"] = cl.GGNLinearOperator(
            model, loss_fn, plist, data, check_deterministic=False
        )
        peers["Fisher"]["curvlinops FisherMCLinearOperator"] = cl.FisherMCLinearOperator(
            model, loss_fn, plist, data, check_deterministic=False
        )
        peers["Fisher"]["curvlinops EFLinearOperator"] = cl.EFLinearOperator(
            model, loss_fn, plist, data, check_deterministic=False
        )
    except ImportError:
        peers = {k: {"curvlinops": None} for k in ops}
    rows = []
    repeats = 3 if quick else 15
    for kind in ops:
        workload = f"{kind} matvec, {name}"
        calls: dict[str, Callable[[], Any]] = {"one gradient (torch.autograd.grad)": gradient}
        for method, op in ops[kind].items():
            calls[method] = lambda op=op: op @ v
        for method, op in peers[kind].items():
            if op is not None:
                calls[method] = lambda op=op: op @ v
        res = measure(calls, repeats=repeats, max_seconds=10 if quick else 60)
        grad_t = res["one gradient (torch.autograd.grad)"]["time_s"]
        first = next(iter(ops[kind]))
        for method, m in res.items():
            rows.append(
                _row(
                    workload,
                    method,
                    m,
                    x_grad=m["time_s"] / grad_t,
                    reference=method == first,
                    note=f"{m['time_s'] / grad_t:.2f} gradients",
                )
            )
        for method, op in peers[kind].items():
            if op is None:
                rows.append(_missing(workload, method))
    return rows


# -- exact and MC GGN diagonals against BackPACK ---------------------------------------
def _diag_rows(name: str, build: Callable, quick: bool) -> list[dict[str, Any]]:
    model, X, y = build(torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    G = hesse.GGNOperator(model, loss_fn, [(X, y)])
    exact = hesse.diagonal(G)
    rows = []
    repeats = 5 if quick else 15
    w_exact = f"GGN diag exact, {name}, float64"
    w_mc = f"GGN diag MC (1 sample), {name}, float64"
    gen = torch.Generator().manual_seed(0)
    calls_exact: dict[str, Callable[[], Any]] = {
        "hesse.diagonal(method='exact')": lambda: hesse.diagonal(G)
    }
    calls_mc: dict[str, Callable[[], Any]] = {
        "hesse.diagonal(method='mc')": lambda: hesse.diagonal(G, method="mc", generator=gen).value,
        "hesse.diagonal(method='gnb')": lambda: (
            hesse.diagonal(G, method="gnb", generator=gen).value
        ),
    }
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagGGNMC

        # BackPACK hooks the module in place (and its hooks break torch.func): a copy.
        bmodel, bloss = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())

        def run_backpack(ext: Any, attr: str) -> torch.Tensor:
            bmodel.zero_grad()
            loss = bloss(bmodel(X), y)
            with backpack(ext):
                loss.backward()
            return torch.cat([getattr(p, attr).reshape(-1) for p in bmodel.parameters()])

        calls_exact["BackPACK DiagGGNExact"] = lambda: run_backpack(
            DiagGGNExact(), "diag_ggn_exact"
        )
        calls_mc["BackPACK DiagGGNMC"] = lambda: run_backpack(DiagGGNMC(), "diag_ggn_mc")
        have_backpack = True
    except ImportError:
        have_backpack = False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPACK's full-backward-hook notices
        res = measure(
            calls_exact, repeats=repeats, max_seconds=20, summarize=lambda *named: {"d": named[-1]}
        )
        for method, m in res.items():
            err = float((m.pop("d") - exact).abs().max())
            rows.append(
                _row(
                    w_exact,
                    method,
                    m,
                    error=err,
                    reference=method.startswith("hesse"),
                    note="error: max |d - hesse exact|",
                )
            )
        res = measure(
            calls_mc, repeats=repeats, max_seconds=20, summarize=lambda *named: {"d": named[-1]}
        )
        for method, m in res.items():
            err = float((m.pop("d") - exact).norm() / exact.norm())
            rows.append(
                _row(
                    w_mc,
                    method,
                    m,
                    error=err,
                    reference=method == "hesse.diagonal(method='mc')",
                    note="error: relative L2 to the exact diagonal (one draw)",
                )
            )
    if not have_backpack:
        rows.append(_missing(w_exact, "BackPACK DiagGGNExact"))
        rows.append(_missing(w_mc, "BackPACK DiagGGNMC"))
    return rows


# -- stochastic estimators against curvlinops ----------------------------------------------
def _estimator_rows(quick: bool) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    X = torch.randn(256, 64, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (256,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    data = [(X[:128], y[:128]), (X[128:], y[128:])]
    G = hesse.GGNOperator(model, loss_fn, data)
    exact = hesse.diagonal(G)
    try:
        import curvlinops as cl

        C = cl.GGNLinearOperator(
            model, loss_fn, list(model.parameters()), data, check_deterministic=False
        )
    except ImportError:
        cl = None
    seeds = 3 if quick else 10
    budgets = (20, 100) if quick else (20, 100, 400)
    rows = []
    for method in ("hutchinson", "xdiag"):
        for m in budgets:
            workload = f"{method} GGN diag error, {m} matvecs, MLP 64-32-10 (n={G.shape[0]})"
            for who in ("hesse", "curvlinops"):
                if who == "curvlinops" and cl is None:
                    rows.append(_missing(workload, f"curvlinops {method}"))
                    continue
                errs, times = [], []
                for s in range(seeds):
                    start = time.perf_counter()
                    if who == "hesse":
                        g = torch.Generator().manual_seed(100 + s)
                        d = hesse.diagonal(G, method=method, num_matvecs=m, generator=g).value
                    else:
                        torch.manual_seed(100 + s)  # curvlinops draws from the global RNG
                        fn = cl.hutchinson_diag if method == "hutchinson" else cl.xdiag
                        d = fn(C, m)
                    times.append(time.perf_counter() - start)
                    errs.append(float((d - exact).norm() / exact.norm()))
                rows.append(
                    {
                        "workload": workload,
                        "method": f"{who} {method}",
                        "time_s": statistics.median(times),
                        "peak_mem_bytes": None,
                        "error": statistics.mean(errs),
                        "note": f"error: mean relative L2 over {seeds} seeds",
                        "reference": who == "hesse",
                    }
                )
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows for ``hesse bench`` (see the module docstring)."""
    prepare_process()
    rows: list[dict[str, Any]] = []
    rows += _matvec_rows("MLP 784-100-100-10 tanh, N=128", mlp, quick)
    batch = 32 if quick else 128
    rows += _matvec_rows(
        f"CNN 2 conv + pool, 28x28, N={batch}", lambda dt: cnn(dt, batch=batch), quick
    )
    rows += _diag_rows("MLP 784-100-100-10 tanh, N=128", mlp, quick)
    rows += _diag_rows(
        f"CNN 2 conv + pool, 28x28, N={batch}", lambda dt: cnn(dt, batch=batch), quick
    )
    rows += _estimator_rows(quick)
    return rows  # ratios against the reference row: benchmarks.run.add_ratios


if __name__ == "__main__":  # pragma: no cover
    import sys

    for r in run("--quick" in sys.argv):
        print(
            {
                k: (f"{v:.4g}" if isinstance(v, float) else v)
                for k, v in r.items()
                if k != "reference"
            }
        )
