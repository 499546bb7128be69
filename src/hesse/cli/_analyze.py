"""``hesse analyze``: a curvature report for a model, from the command line.

The job (:func:`analyze`) computes, for ``(model, loss_fn, data)``: the loss, the
top eigenvalues of the Hessian and of the GGN (with the Hessian's eigenvalue
estimates along the way), the trace with a confidence interval (Hutch++), the
spectral density (stochastic Lanczos quadrature), per-layer traces and top
eigenvalues, and the exact GGN diagonal next to a Hutchinson estimate of the
Hessian diagonal. :mod:`hesse.cli._report` writes ``report.json``, the plots and
``report.html`` and prints the terminal summary.

# NOTE [analyze seeds]
Every stochastic call draws from its own fresh ``torch.Generator`` seeded with
``--seed``, so each number in ``report.json`` equals the library function called
directly with ``torch.Generator().manual_seed(seed)`` and the settings recorded
next to it (the tests check this).

# NOTE [analyze errors]
Bad input (a missing file, a factory that raises or returns the wrong thing, a
model without trainable parameters, a budget of zero, input the operators
reject) ends with one line on stderr and exit code 2; a failure inside a step
ends with one line and exit code 1. ``--debug`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesse.cli._load import AnalyzeError, first_line, load
from hesse.operators import LinearOperator

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

#: the budgets of a full run and of ``--quick`` (option name -> (full, quick)).
BUDGETS = {
    "num_eigenvalues": (5, 3),
    "eig_matvecs": (300, 60),
    "trace_matvecs": (120, 30),
    "diag_matvecs": (100, 20),
    "density_probes": (8, 3),
    "lanczos_steps": (60, 20),
    "layer_matvecs": (60, 20),
}
#: eigsh is re-run at up to this many smaller budgets for the convergence plot.
HISTORY_POINTS = 6
#: diagonals longer than this are summarised in report.json, not listed.
MAX_LISTED = 100_000


# -- command line --------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="a curvature report for a model (report.json, PNG plots, report.html)",
        description="Curvature report for a model: loss, top Hessian/GGN eigenvalues, trace "
        "with confidence interval, spectral density, per-layer curvature and diagonals. "
        "Without --model it trains a small MLP on scikit-learn's digits data and reports on it.",
    )
    p.add_argument("--model", metavar="FILE.py:FACTORY", help="factory() -> (model, loss_fn, data)")
    p.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="cast model and data (default: keep)",
    )
    p.add_argument("--out", default="hesse-report", help="output folder (default ./hesse-report)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random probe (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for the embedded model, whose products are too "
        "small to gain from threads; torch's default with --model)",
    )
    p.add_argument("--quick", action="store_true", help="small budgets and a smaller default model")
    for name, (full, quick) in BUDGETS.items():
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=None,
            help=f"default {full} ({quick} with --quick)",
        )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the job; map bad input and failures to one stderr line and an exit code."""
    try:
        settings = _settings(args)
        model, loss_fn, data, source = load(args)
        report = analyze(
            model, loss_fn, data, settings, source=source, progress=not args.no_progress
        )
        if report is not None:  # rank 0 (or the only process)
            from hesse.cli import _report

            _report.write_all(report, Path(args.out))
            print(_report.summary(report, Path(args.out)))
    except AnalyzeError as err:
        if args.debug:
            traceback.print_exception(err.__cause__ or err)
        print(f"hesse analyze: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("hesse analyze: interrupted.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - NOTE [analyze errors]
        if args.debug:
            traceback.print_exc()
        print(
            f"hesse analyze: failed: {type(err).__name__}: {first_line(err)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": args.model or "default (digits MLP)",
        "device": args.device,
        "dtype": args.dtype,
        "seed": args.seed,
        "quick": bool(args.quick),
    }
    for name, (full, quick) in BUDGETS.items():
        value = getattr(args, name)
        value = (quick if args.quick else full) if value is None else value
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise AnalyzeError(f"{flag} must be a positive integer, got {value}.")
        out[name] = value
    threads = args.threads if args.threads is not None else (1 if args.model is None else None)
    if threads is not None:
        if threads < 1:
            raise AnalyzeError(f"--threads must be a positive integer, got {threads}.")
        torch.set_num_threads(threads)
    out["threads"] = torch.get_num_threads()
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError, AssertionError) as err:  # no CUDA build: AssertionError
        raise AnalyzeError(
            f"--device {args.device!r} is not usable here: {first_line(err)}"
        ) from err
    return out


# -- the job -------------------------------------------------------------------------
def _distributed() -> Any:
    """``hesse.distributed`` when running under torchrun with more than one rank, else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    try:
        import hesse.distributed as dist_ops
    except ImportError:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist_ops


def analyze(
    model: nn.Module,
    loss_fn: Callable,
    data: Iterable,
    settings: dict[str, Any],
    *,
    source: str = "",
    progress: bool = True,
) -> dict[str, Any] | None:
    """Compute every number of the report; ``None`` on ranks other than 0.

    Args:
        model, loss_fn, data: as a ``--model`` factory returns them.
        settings: budgets and seed (see :data:`BUDGETS`), device, dtype.
        source: where the model came from (for the report).
        progress: show tqdm progress bars on stderr.

    Returns:
        The report as a JSON-ready dict (lists and floats only).
    """
    import hesse

    dist_ops = _distributed()
    ops = dist_ops if dist_ops is not None else hesse
    rank = 0
    if dist_ops is not None:
        import torch.distributed as dist

        rank = dist.get_rank()
    progress = progress and rank == 0
    seed = settings["seed"]

    def gen() -> torch.Generator:  # NOTE [analyze seeds]
        return torch.Generator().manual_seed(seed)

    steps = _Steps(progress)
    report: dict[str, Any] = {"settings": dict(settings), "timings_s": {}}

    def build(cls_name: str, **kw: Any) -> Any:
        try:
            return getattr(ops, cls_name)(model, loss_fn, data, **kw)
        except (TypeError, ValueError) as err:
            raise AnalyzeError(first_line(err)) from err

    with steps.step("operators", report):
        H = build("HessianOperator")
        try:
            G = build("GGNOperator")
            ggn_reason = None
        except (NotImplementedError, AnalyzeError) as err:
            G, ggn_reason = None, first_line(err)
    n = H.shape[0]
    k = min(settings["num_eigenvalues"], max(1, n - 1))
    names = list(H.param_names)
    report["model"] = {
        "source": source,
        "num_parameters": n,
        "parameters": {name: list(model.get_parameter(name).shape) for name in names},
        "dtype": str(H.dtype).replace("torch.", ""),
        "device": str(H.device),
        "distributed_world_size": int(os.environ.get("WORLD_SIZE", "1")) if dist_ops else 1,
    }

    with steps.step("loss", report):
        report["loss"] = _mean_loss(model, loss_fn, data)
    with steps.step("Hessian top eigenvalues", report):
        report["hessian_eigenvalues"] = _top_eigenvalues(
            hesse,
            steps.counted(H, settings["eig_matvecs"], "Hessian eigsh"),
            k,
            settings,
            gen,
            history=True,
        )
    with steps.step("GGN top eigenvalues", report):
        if G is None:
            report["ggn_eigenvalues"] = {"available": False, "reason": ggn_reason}
        else:
            report["ggn_eigenvalues"] = _top_eigenvalues(
                hesse, steps.counted(G, settings["eig_matvecs"], "GGN eigsh"), k, settings, gen
            )
    with steps.step("Hessian trace (Hutch++)", report):
        est = hesse.trace(
            steps.counted(H, settings["trace_matvecs"], "trace"),
            method="hutch++",
            num_matvecs=settings["trace_matvecs"],
            generator=gen(),
        )
        report["trace"] = _estimate(est, method="hutch++")
    with steps.step("spectral density (SLQ)", report):
        p, m = settings["density_probes"], settings["lanczos_steps"]
        sd = hesse.spectral_density(
            steps.counted(H, p * min(m, n), "density"),
            num_probes=p,
            lanczos_steps=m,
            generator=gen(),
        )
        report["spectral_density"] = {
            "num_probes": p,
            "lanczos_steps": m,
            "grid": sd.grid.tolist(),
            "density": sd.density.tolist(),
            "nodes": sd.nodes.tolist(),
            "weights": sd.weights.tolist(),
            "sigma": float(sd.sigma),
            "mass": float(sd.mass),
            "num_matvecs": int(sd.num_matvecs),
        }
    with steps.step("per-layer curvature", report):
        report["layers"] = [
            _layer(
                hesse,
                build("HessianOperator", params=layer_names),
                layer,
                layer_names,
                settings,
                gen,
                steps,
            )
            for layer, layer_names in _layers(names).items()
        ]
    with steps.step("diagonals", report):
        report["diagonal"] = _diagonals(hesse, H, G, ggn_reason, settings, gen)
    steps.close()
    return report if rank == 0 else None


def _layers(names: list[str]) -> dict[str, list[str]]:
    """Parameter names grouped by the module that holds them (``"0.weight"`` -> ``"0"``)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        layer = name.rsplit(".", 1)[0] if "." in name else "(top level)"
        groups.setdefault(layer, []).append(name)
    return groups


def _mean_loss(model: nn.Module, loss_fn: Callable, data: Iterable) -> float:
    """The loss over the data, averaging batch losses weighted by batch size (summing for ``reduction='sum'``)."""
    total, count = 0.0, 0
    summed = getattr(loss_fn, "reduction", "mean") == "sum"
    with torch.no_grad():
        for inputs, targets in data:
            args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            size = int(args[0].shape[0])
            value = float(loss_fn(model(*args), targets))
            total += value if summed else value * size
            count += size
    return total if summed else total / max(count, 1)


def _top_eigenvalues(
    hesse: Any, op: Any, k: int, settings: dict[str, Any], gen: Callable, history: bool = False
) -> dict[str, Any]:
    n = op.shape[0]
    if n == 1:
        value = float(op.to_dense()[0, 0])
        return {
            "k": 1,
            "eigenvalues": [value],
            "residuals": [0.0],
            "converged": [True],
            "num_matvecs": 1,
            "history": [],
        }
    budget = settings["eig_matvecs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = hesse.eigsh(op, k, which="LA", max_matvecs=budget, generator=gen())
    out: dict[str, Any] = {
        "k": k,
        "which": "LA",
        "max_matvecs": budget,
        "eigenvalues": res.eigenvalues.tolist(),
        "residuals": res.residuals.tolist(),
        "converged": [bool(c) for c in res.converged],
        "num_matvecs": int(res.num_matvecs),
        "warnings": [str(w.message).splitlines()[0] for w in caught],
    }
    if history:
        out["history"] = _history(hesse, op, k, res, gen)
    return out


def _history(hesse: Any, op: Any, k: int, res: Any, gen: Callable) -> list[dict[str, Any]]:
    """Eigenvalue estimates after fewer products: eigsh re-run with smaller budgets.

    eigsh is deterministic given the seed, so a run stopped at a smaller budget is
    the same iteration cut short: its Ritz values are the estimates the full run had
    at that point. Budgets are multiples of the block size, at most
    ``HISTORY_POINTS`` of them, evenly spread (cost: about ``HISTORY_POINTS / 2``
    times the final run's products).
    """
    n = op.shape[0]
    block = min(1 if k == 1 else min(k, 4), n - k)
    total = int(res.num_matvecs)
    steps = total // block
    stride = max(1, -(-steps // HISTORY_POINTS))
    budgets = [i * block for i in range(stride, steps, stride) if i * block >= k]
    points = []
    op.quiet = True  # re-runs do not move the progress bar
    for budget in budgets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            partial = hesse.eigsh(op, k, which="LA", max_matvecs=budget, generator=gen())
        points.append(
            {"num_matvecs": int(partial.num_matvecs), "eigenvalues": partial.eigenvalues.tolist()}
        )
    op.quiet = False
    points.append({"num_matvecs": total, "eigenvalues": res.eigenvalues.tolist()})
    return points


def _estimate(est: Any, method: str) -> dict[str, Any]:
    low, high = est.confidence_interval()
    return {
        "method": method,
        "value": float(est.value),
        "stderr": float(est.stderr),
        "ci95": [float(low), float(high)],
        "num_matvecs": int(est.num_matvecs),
    }


def _layer(
    hesse: Any,
    op: Any,
    layer: str,
    names: list[str],
    settings: dict[str, Any],
    gen: Callable,
    steps: _Steps,
) -> dict[str, Any]:
    """Trace and top eigenvalue of one layer's Hessian block.

    The trace is exact (``n`` basis products, via ``hesse.diagonal(method="exact")``)
    when the block has at most ``layer_matvecs`` parameters, else Hutch++ with that budget.
    """
    n = op.shape[0]
    budget = settings["layer_matvecs"]
    if n <= budget:
        diag = hesse.diagonal(op, method="exact")
        trace = {
            "method": "exact",
            "value": float(diag.sum()),
            "stderr": 0.0,
            "ci95": [float(diag.sum())] * 2,
            "num_matvecs": n,
        }
    else:
        est = hesse.trace(
            steps.counted(op, budget, f"{layer} trace"),
            method="hutch++",
            num_matvecs=budget,
            generator=gen(),
        )
        trace = _estimate(est, "hutch++")
    top = _top_eigenvalues(
        hesse, steps.counted(op, settings["eig_matvecs"], f"{layer} eigsh"), 1, settings, gen
    )
    return {
        "layer": layer,
        "parameters": names,
        "num_parameters": n,
        "trace": trace,
        "top_eigenvalue": top["eigenvalues"][0],
        "top_eigenvalue_converged": top["converged"][0],
        "top_eigenvalue_matvecs": top["num_matvecs"],
    }


def _summary_stats(v: torch.Tensor) -> dict[str, float]:
    v = v.detach().double().cpu()
    return {
        "mean": float(v.mean()),
        "min": float(v.min()),
        "max": float(v.max()),
        "sum": float(v.sum()),
    }


def _diagonals(
    hesse: Any, H: Any, G: Any, ggn_reason: str | None, settings: dict[str, Any], gen: Callable
) -> dict[str, Any]:
    m = settings["diag_matvecs"]
    est = hesse.diagonal(H, method="hutchinson", num_matvecs=m, generator=gen())
    listed = H.shape[0] <= MAX_LISTED
    out: dict[str, Any] = {
        "hessian_hutchinson": {
            "num_matvecs": int(est.num_matvecs),
            **_summary_stats(est.value),
            "mean_stderr": float(est.stderr.double().mean()),
            "values": est.value.tolist() if listed else None,
            "stderr": est.stderr.tolist() if listed else None,
        }
    }
    if G is None:
        out["ggn_exact"] = {"available": False, "reason": ggn_reason}
    else:
        exact = hesse.diagonal(G, method="exact")
        out["ggn_exact"] = {**_summary_stats(exact), "values": exact.tolist() if listed else None}
        a, b = exact.double(), est.value.double()
        if a.numel() > 1 and float(a.std()) > 0 and float(b.std()) > 0:
            out["correlation"] = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    out["becker_lecun"] = _becker_lecun_check(hesse, H)
    return out


#: Largest model whose Becker-LeCun diagonal is checked against the exact one.
BECKER_LECUN_CHECK_LIMIT = 20_000


def _becker_lecun_check(hesse: Any, H: Any) -> dict[str, Any]:
    """The measured error of the Becker-LeCun diagonal against the exact Hessian diagonal.

    ``relative_error = ||d_BL - d|| / ||d||`` (1 means no information; the
    approximation drops every off-diagonal block of the curvature it propagates).
    Computed only where the exact diagonal is affordable (at most
    :data:`BECKER_LECUN_CHECK_LIMIT` parameters) and both methods support the model.
    """
    n = H.shape[0]
    if n > BECKER_LECUN_CHECK_LIMIT:
        return {
            "available": False,
            "reason": f"{n} parameters, more than the {BECKER_LECUN_CHECK_LIMIT} checked",
        }
    try:
        exact = hesse.diagonal(H, method="exact").double()
        approx = hesse.diagonal(H, method="becker-lecun").double()
    except (NotImplementedError, TypeError, ValueError, RuntimeError) as err:
        return {"available": False, "reason": f"{type(err).__name__}: {first_line(err)}"}
    scale = float(torch.linalg.vector_norm(exact))
    error = float(torch.linalg.vector_norm(approx - exact))
    return {
        "relative_error": error / scale if scale > 0 else (0.0 if error == 0 else math.inf),
        "max_abs_error": float((approx - exact).abs().max()),
        "exact_norm": scale,
        "num_parameters": n,
    }


# -- progress ------------------------------------------------------------------------
class _Steps:
    """A tqdm bar over the job's steps, one bar of products per long computation, step timings."""

    TOTAL = 8

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.wrappers: list[_ProgressOperator] = []
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.TOTAL, desc="hesse analyze", unit="step", file=sys.stderr)

    def step(self, name: str, report: dict[str, Any]) -> Any:
        steps = self

        class _Ctx:
            def __enter__(self) -> None:
                self.start = time.perf_counter()
                if steps.bar is not None:
                    steps.bar.set_postfix_str(name)

            def __exit__(self, *exc: Any) -> None:
                report["timings_s"][name] = round(time.perf_counter() - self.start, 4)
                for w in steps.wrappers:
                    w.close()
                steps.wrappers.clear()
                if steps.bar is not None and exc[0] is None:
                    steps.bar.update(1)

        return _Ctx()

    def counted(self, op: Any, total: int, desc: str = "products") -> Any:
        wrapped = _ProgressOperator(op, total=total, desc=desc, enabled=self.enabled)
        self.wrappers.append(wrapped)
        return wrapped

    def close(self) -> None:
        for w in self.wrappers:
            w.close()
        if self.bar is not None:
            self.bar.close()


class _ProgressOperator(LinearOperator):
    """``op`` itself (same products, tags and layout) with a tqdm bar counting its products."""

    def __init__(self, op: LinearOperator, *, total: int, desc: str, enabled: bool) -> None:
        self.op = op
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.tags, self.layout, self.chunk_size = op.tags, op.layout, op.chunk_size
        self.total, self.desc, self.enabled = total, desc, enabled
        self.quiet = False
        self.bar: Any = None

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        out = self.op._matmat(X)
        if self.enabled and not self.quiet:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=self.total, desc=self.desc, unit="matvec", leave=False, file=sys.stderr
                )
            self.bar.update(X.shape[1])
        return out

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.op._rmatmat(X)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
