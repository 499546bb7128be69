"""Spectra: top eigenvalues, traces and densities of a model's Hessian vs PyHessian and
hessian-eigenthings (issue 5).

Workloads: a tanh MLP and a small CNN with cross-entropy on scikit-learn's bundled
digits data (8x8 images, 10 classes; no download), float64, the whole data set as the
Hessian's data. The reference is the dense Hessian (``hesse.hessian`` in chunks,
itself verified against ``torch.func.hessian`` in the core tests) and
``torch.linalg.eigh``.

Rows:

- ``<model>/top5``: matvecs and time to the top-5 (largest algebraic) eigenvalues
  at 1e-6 relative accuracy. hesse: ``eigsh(H, 5, tol=1e-6)``, one run. The peers
  have no accuracy-targeted stopping rule, so they are swept (PyHessian's power
  iteration over its ``tol``; hessian-eigenthings' unrestarted Lanczos over
  ``max_iter``) and the cheapest setting that reaches 1e-6 is reported (the sweep
  itself is not counted). ``error`` = max relative eigenvalue error.
- ``<model>/trace@B``: RMS relative error of the trace over seeds at an equal
  budget of ``B`` matvecs; ``time_s`` is one estimate.
- ``<model>/density``: L1 distance between the estimated and the exact spectral
  density, both smoothed with the same Gaussian on the same grid, at equal matvecs.

Each library uses its own Hessian-vector product (hesse: ``hesse.HessianOperator``;
PyHessian: double backward through a cached graph; hessian-eigenthings: its
``HessianOperator``), so times compare whole pipelines. Peers are optional; a missing
or broken one gets a row saying so.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import hesse
from hesse.operators._base import SYMMETRIC, LinearOperator

try:  # as a package (benchmarks.run) or as a script folder on sys.path
    from benchmarks._measure import measure, prepare_process
except ImportError:  # pragma: no cover
    from _measure import measure, prepare_process  # type: ignore[no-redef]

F64 = torch.float64
K = 5
TARGET = 1e-6


# -- workloads -----------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    evals: torch.Tensor  # exact spectrum, ascending

    @property
    def loss_fn(self) -> nn.Module:
        return nn.CrossEntropyLoss()


def digits(count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=F64)
    X = (X - X.mean(0)) / (X.std(0) + 1e-3)
    y = torch.tensor(data.target, dtype=torch.long)
    if count is not None:
        X, y = X[:count], y[:count]
    return X, y


def make_mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()


class SmallCNN(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3)
        self.fc = nn.Linear(channels * 36, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x.reshape(-1, 1, 8, 8)))
        return self.fc(h.flatten(1))


def train_briefly(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """A few full-batch steps, so the Hessian is not the one at initialisation."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)


def flat_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[Callable, torch.Tensor]:
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(theta: torch.Tensor) -> torch.Tensor:
        params = {k: t.reshape(s) for k, t, s in zip(names, theta.split(sizes), shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (X,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta


def make_workload(name: str, model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> Workload:
    train_briefly(model, X, y, steps=30)
    f, theta = flat_loss(model, X, y)
    H = hesse.hessian(f)(theta)
    evals = torch.linalg.eigvalsh((H + H.T) / 2)
    return Workload(name, model, X, y, evals)


class _HVPOperator(LinearOperator):
    """Fallback when hesse.HessianOperator is absent: the same Hessian through hesse.hvp."""

    def __init__(self, w: Workload) -> None:
        self.f, self.theta = flat_loss(w.model, w.X, w.y)
        n = self.theta.numel()
        self.shape, self.dtype, self.device = (n, n), F64, self.theta.device
        self.tags = frozenset({SYMMETRIC})

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return hesse.hvp(self.f, (self.theta,), (X.T.contiguous(),), batched=True)[1][0].T


def hesse_operator(w: Workload) -> LinearOperator:
    cls = getattr(hesse, "HessianOperator", None)
    if cls is None:
        return _HVPOperator(w)
    return cls(w.model, w.loss_fn, [(w.X, w.y)])


class Counter:
    def __init__(self) -> None:
        self.count = 0


class CountingOperator(LinearOperator):
    """Counts the columns hesse's algorithms multiply (the matvecs)."""

    def __init__(self, op: LinearOperator, counter: Counter) -> None:
        self.op, self.counter = op, counter
        self.shape, self.dtype, self.device, self.tags = op.shape, op.dtype, op.device, op.tags

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        self.counter.count += X.shape[1]
        return self.op._matmat(X)


def rel_error(values: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((values - ref).abs() / ref.abs()).max())


# -- peers ---------------------------------------------------------------------------
def _import_pyhessian() -> Any:
    import sys

    import pyhessian  # noqa: F401 - registers pyhessian.hessian (the module; the package
    # re-exports a class of the same name)

    return sys.modules["pyhessian.hessian"]


def _import_eigenthings() -> Any:
    import hessian_eigenthings

    return hessian_eigenthings


def peer(importer: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return importer(), None
    except ImportError as err:
        return None, f"not installed ({err.name})"
    except Exception as err:  # noqa: BLE001 - a broken peer is reported, not fatal
        return None, f"import failed ({type(err).__name__}: {str(err)[:80]})"


class _PyHessianRun:
    """PyHessian on a fresh copy of the model, counting its Hessian-vector products."""

    def __init__(self, ph: Any, w: Workload) -> None:
        self.ph, self.w, self.count = ph, w, 0

    def __call__(self, method: str, **kwargs: Any) -> Any:
        module = self.ph
        original = module.hessian_vector_product

        def counted(*args: Any) -> Any:
            self.count += 1
            return original(*args)

        previous = torch.get_default_dtype()
        module.hessian_vector_product = counted
        torch.set_default_dtype(F64)  # PyHessian draws its vectors in the default dtype
        try:
            comp = self.ph.hessian(
                copy.deepcopy(self.w.model),
                nn.CrossEntropyLoss(),
                data=(self.w.X, self.w.y),
                cuda=False,
            )
            return getattr(comp, method)(**kwargs)
        finally:
            module.hessian_vector_product = original
            torch.set_default_dtype(previous)


def _eigenthings_operator(he: Any, w: Workload, counter: Counter) -> Any:
    op = he.HessianOperator(
        copy.deepcopy(w.model), [(w.X, w.y)], he.supervised_loss(nn.CrossEntropyLoss())
    )

    def matvec(v: torch.Tensor) -> torch.Tensor:
        counter.count += 1
        return op.matvec(v)

    return he.LambdaOperator(matvec, op.size, dtype=F64)


# -- top-5 eigenvalues -----------------------------------------------------------------
def top5_rows(w: Workload, quick: bool) -> list[dict[str, Any]]:
    ref = w.evals.flip(0)[:K]
    workload = f"{w.name}/top5 (n={w.evals.numel()})"
    rows = []

    def hesse_run(block_size: int | None, tol: float = TARGET) -> Callable[[], Any]:
        def run() -> Any:
            counter = Counter()
            op = CountingOperator(hesse_operator(w), counter)
            result = hesse.eigsh(
                op, K, tol=tol, block_size=block_size, generator=torch.Generator().manual_seed(0)
            )
            return result.eigenvalues, counter.count

        return run

    calls = {"hesse.eigsh": hesse_run(None), "hesse.eigsh(block_size=4)": hesse_run(4)}
    cached = getattr(hesse, "hessian_operator", None)
    if cached is not None:  # the single-batch Hessian with its gradient graph built once

        def hesse_cached() -> Any:
            counter = Counter()
            f, theta = flat_loss(w.model, w.X, w.y)
            op = CountingOperator(cached(f)(theta), counter)
            result = hesse.eigsh(op, K, tol=TARGET, generator=torch.Generator().manual_seed(0))
            return result.eigenvalues, counter.count

        calls["hesse.eigsh [hessian_operator]"] = hesse_cached
    # The peers are swept to the cheapest setting that reaches the target; do the same
    # for hesse's residual tolerance (tol bounds the residual, and the eigenvalue error
    # is about residual^2 / gap, so tol=1e-6 is far more accurate than 1e-6).
    swept_tol = TARGET
    for tol in (1e-2, 1e-3, 1e-4, 1e-5):
        values, _ = hesse_run(None, tol)()
        if rel_error(values, ref) <= TARGET:
            swept_tol = tol
            break
    calls["hesse.eigsh (tol swept)"] = hesse_run(None, swept_tol)
    timed = measure(calls, repeats=1 if quick else 3, max_seconds=30.0)
    for name, fn in calls.items():
        values, count = fn()
        rows.append(
            {
                "workload": workload,
                "method": name,
                "time_s": timed[name]["time_s"],
                "peak_mem_bytes": timed[name]["peak_mem_bytes"],
                "matvecs": count,
                "error": rel_error(values, ref),
                "note": f"tol={swept_tol:g}" if "swept" in name else f"tol={TARGET:g}",
                "reference": name == "hesse.eigsh",
            }
        )

    ph, why = peer(_import_pyhessian)
    method = "pyhessian power iteration"
    if ph is None:
        rows.append({"workload": workload, "method": method, "time_s": None, "note": why})
    else:
        rows.append(_sweep_pyhessian(ph, w, ref, workload, quick))

    he, why = peer(_import_eigenthings)
    method = "hessian-eigenthings lanczos"
    if he is None:
        rows.append({"workload": workload, "method": method, "time_s": None, "note": why})
    else:
        rows.append(_sweep_eigenthings(he, w, ref, workload))
    return rows


def _sweep_pyhessian(
    ph: Any, w: Workload, ref: torch.Tensor, workload: str, quick: bool
) -> dict[str, Any]:
    method = "pyhessian power iteration"
    max_iter = 150 if quick else 1000
    last: dict[str, Any] = {}
    for tol in (1e-6, 1e-9) if quick else (1e-6, 1e-8, 1e-10, 1e-12):
        run = _PyHessianRun(ph, w)
        torch.manual_seed(0)  # PyHessian draws from the global RNG
        start = time.perf_counter()
        try:
            values, _ = run("eigenvalues", maxIter=max_iter, tol=tol, top_n=K)
        except Exception as err:  # noqa: BLE001
            return {
                "workload": workload,
                "method": method,
                "time_s": None,
                "note": f"failed ({type(err).__name__}: {str(err)[:80]})",
            }
        elapsed = time.perf_counter() - start
        values = torch.tensor(values, dtype=F64).sort(descending=True).values
        error = rel_error(values, ref)
        last = {
            "workload": workload,
            "method": method,
            "time_s": elapsed,
            "matvecs": run.count,
            "error": error,
            "note": f"tol={tol:g}, maxIter={max_iter}",
        }
        if error <= TARGET:
            return last
    last["note"] += f"; did not reach {TARGET:g}"
    return last


def _sweep_eigenthings(he: Any, w: Workload, ref: torch.Tensor, workload: str) -> dict[str, Any]:
    method = "hessian-eigenthings lanczos"
    n = w.evals.numel()
    last: dict[str, Any] = {}
    for steps in (10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200):
        if steps >= n:
            break
        counter = Counter()
        start = time.perf_counter()
        try:
            op = _eigenthings_operator(he, w, counter)
            result = he.lanczos(op, k=K, max_iter=steps, which="LA", seed=0, reorthogonalize=True)
        except Exception as err:  # noqa: BLE001
            return {
                "workload": workload,
                "method": method,
                "time_s": None,
                "note": f"failed ({type(err).__name__}: {str(err)[:80]})",
            }
        elapsed = time.perf_counter() - start
        error = rel_error(result.eigenvalues.to(F64), ref)
        last = {
            "workload": workload,
            "method": method,
            "time_s": elapsed,
            "matvecs": counter.count,
            "error": error,
            "note": f"max_iter={steps} (unrestarted, full reorth.)",
        }
        if error <= TARGET:
            return last
    last["note"] += f"; did not reach {TARGET:g}"
    return last


# -- trace -----------------------------------------------------------------------------
def trace_rows(w: Workload, budget: int, seeds: int) -> list[dict[str, Any]]:
    exact = float(w.evals.sum())
    workload = f"{w.name}/trace@{budget}"
    op = hesse_operator(w)
    rows = []

    def summarize(
        name: str, estimates: list[float], elapsed: float, note: str = "", **extra: Any
    ) -> dict[str, Any]:
        errs = torch.tensor(estimates, dtype=F64) / exact - 1
        return {
            "workload": workload,
            "method": name,
            "time_s": elapsed,
            "matvecs": budget,
            "error": float(errs.pow(2).mean().sqrt()),
            "note": note or f"RMS rel. error over {seeds} seeds",
            **extra,
        }

    for method in ("hutch++", "xtrace", "hutchinson"):
        estimates, start = [], time.perf_counter()
        stderr = []
        for s in range(seeds):
            est = hesse.trace(
                op, method=method, num_matvecs=budget, generator=torch.Generator().manual_seed(s)
            )
            estimates.append(float(est.value))
            stderr.append(float(est.stderr) / abs(exact))
        elapsed = (time.perf_counter() - start) / seeds
        note = f"RMS rel. error over {seeds} seeds; mean reported rel. stderr {sum(stderr) / seeds:.2g}"
        rows.append(
            summarize(
                f"hesse.trace({method})", estimates, elapsed, note, reference=method == "hutch++"
            )
        )

    ph, why = peer(_import_pyhessian)
    if ph is None:
        rows.append(
            {
                "workload": workload,
                "method": "pyhessian trace (Hutchinson)",
                "time_s": None,
                "note": why,
            }
        )
    else:
        estimates, start = [], time.perf_counter()
        try:
            for s in range(seeds):
                torch.manual_seed(s)
                run = _PyHessianRun(ph, w)
                samples = run("trace", maxIter=budget, tol=0.0)
                estimates.append(float(sum(samples) / len(samples)))
            rows.append(
                summarize(
                    "pyhessian trace (Hutchinson)", estimates, (time.perf_counter() - start) / seeds
                )
            )
        except Exception as err:  # noqa: BLE001
            rows.append(
                {
                    "workload": workload,
                    "method": "pyhessian trace (Hutchinson)",
                    "time_s": None,
                    "note": f"failed ({type(err).__name__}: {str(err)[:80]})",
                }
            )

    he, why = peer(_import_eigenthings)
    for method in ("hutch++", "hutchinson"):
        name = f"hessian-eigenthings trace({method})"
        if he is None:
            rows.append({"workload": workload, "method": name, "time_s": None, "note": why})
            continue
        estimates, start = [], time.perf_counter()
        try:
            for s in range(seeds):
                heop = _eigenthings_operator(he, w, Counter())
                estimates.append(
                    float(he.trace(heop, num_matvecs=budget, method=method, seed=s).estimate)
                )
            rows.append(summarize(name, estimates, (time.perf_counter() - start) / seeds))
        except Exception as err:  # noqa: BLE001
            rows.append(
                {
                    "workload": workload,
                    "method": name,
                    "time_s": None,
                    "note": f"failed ({type(err).__name__}: {str(err)[:80]})",
                }
            )
    return rows


# -- density -----------------------------------------------------------------------------
def smoothed(
    nodes: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float
) -> torch.Tensor:
    keep = torch.isfinite(nodes)
    nodes, weights = nodes[keep], weights[keep]
    z = (grid[:, None] - nodes[None, :]) / sigma
    density = torch.exp(-0.5 * z**2) @ weights / (sigma * math.sqrt(2 * math.pi))
    return density / torch.trapezoid(density, grid)


def density_rows(w: Workload, probes: int, steps: int) -> list[dict[str, Any]]:
    evals = w.evals
    sigma = 0.01 * float(evals[-1] - evals[0])
    grid = torch.linspace(
        float(evals[0]) - 5 * sigma, float(evals[-1]) + 5 * sigma, 2000, dtype=F64
    )
    exact = smoothed(evals, torch.full_like(evals, 1 / evals.numel()), grid, sigma)
    workload = f"{w.name}/density"
    rows = []

    def l1(density: torch.Tensor) -> float:
        return float(torch.trapezoid((density - exact).abs(), grid))

    op = hesse_operator(w)
    start = time.perf_counter()
    result = hesse.spectral_density(
        op,
        num_probes=probes,
        lanczos_steps=steps,
        sigma=sigma,
        generator=torch.Generator().manual_seed(0),
    )
    elapsed = time.perf_counter() - start
    rows.append(
        {
            "workload": workload,
            "method": "hesse.spectral_density",
            "time_s": elapsed,
            "matvecs": result.num_matvecs,
            "error": l1(smoothed(result.nodes, result.weights, grid, sigma)),
            "note": f"L1 to exact smoothed density; {probes} probes x {steps} steps, batched",
            "reference": True,
        }
    )

    ph, why = peer(_import_pyhessian)
    name = "pyhessian density"
    if ph is None:
        rows.append({"workload": workload, "method": name, "time_s": None, "note": why})
    else:
        try:
            torch.manual_seed(0)
            run = _PyHessianRun(ph, w)
            start = time.perf_counter()
            nodes, weights = run("density", iter=steps, n_v=probes)
            elapsed = time.perf_counter() - start
            nodes_t = torch.tensor(nodes, dtype=F64).flatten()
            weights_t = torch.tensor(weights, dtype=F64).flatten() / probes
            rows.append(
                {
                    "workload": workload,
                    "method": name,
                    "time_s": elapsed,
                    "matvecs": run.count,
                    "error": l1(smoothed(nodes_t, weights_t, grid, sigma)),
                }
            )
        except Exception as err:  # noqa: BLE001
            rows.append(
                {
                    "workload": workload,
                    "method": name,
                    "time_s": None,
                    "note": f"failed on torch {torch.__version__} ({type(err).__name__}: {str(err)[:70]})",
                }
            )

    he, why = peer(_import_eigenthings)
    name = "hessian-eigenthings spectral_density"
    if he is None:
        rows.append({"workload": workload, "method": name, "time_s": None, "note": why})
    else:
        try:
            counter = Counter()
            heop = _eigenthings_operator(he, w, counter)
            start = time.perf_counter()
            res = he.spectral_density(
                heop, num_runs=probes, lanczos_steps=steps, sigma=sigma, seed=0
            )
            elapsed = time.perf_counter() - start
            nodes_t = res.raw_eigenvalues.flatten().to(F64)
            weights_t = res.raw_weights.flatten().to(F64) / probes
            rows.append(
                {
                    "workload": workload,
                    "method": name,
                    "time_s": elapsed,
                    "matvecs": counter.count,
                    "error": l1(smoothed(nodes_t, weights_t, grid, sigma)),
                }
            )
        except Exception as err:  # noqa: BLE001
            rows.append(
                {
                    "workload": workload,
                    "method": name,
                    "time_s": None,
                    "note": f"failed ({type(err).__name__}: {str(err)[:80]})",
                }
            )
    return rows


# -- entry point -----------------------------------------------------------------------
def workloads(quick: bool) -> list[Workload]:
    X, y = digits(400 if quick else None)
    torch.manual_seed(0)  # nn.Module initialisation draws from the global RNG
    out = [make_workload("mlp", make_mlp(8 if quick else 32), X, y)]
    if not quick:
        torch.manual_seed(0)
        out.append(make_workload("cnn", SmallCNN(4).double(), X, y))
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    prepare_process()
    rows: list[dict[str, Any]] = []
    for w in workloads(quick):
        rows += top5_rows(w, quick)
        for budget in (30,) if quick else (30, 150):
            rows += trace_rows(w, budget, seeds=5 if quick else 20)
        rows += density_rows(w, probes=4 if quick else 10, steps=30 if quick else 80)
    return rows


if __name__ == "__main__":  # pragma: no cover
    import sys

    for row in run("--quick" in sys.argv):
        print(row, flush=True)
