"""``hesse analyze``: a curvature report for a model, from the command line.

The job (:func:`analyze`) computes, for ``(model, loss_fn, data)``: the loss, the
top eigenvalues of the Hessian and of the GGN (with the Hessian's eigenvalue
estimates along the way), the trace with a confidence interval (Hutch++), the
spectral density (stochastic Lanczos quadrature), per-layer traces and top
eigenvalues, and the exact GGN diagonal next to a Hutchinson estimate of the
Hessian diagonal, with the provenance of the run (versions, device, dtype,
threads, data size, command line, time per step). :mod:`hesse.cli._report`
writes ``report.json``, the figures, ``layers.csv`` and ``report.html`` and
prints the terminal summary.

# NOTE [analyze seeds]
Every stochastic call draws from its own fresh ``torch.Generator`` seeded with
``--seed``, so each number in ``report.json`` equals the library function called
directly with ``torch.Generator().manual_seed(seed)`` and the settings recorded
next to it (the tests check this).

# NOTE [analyze errors]
Bad input (a missing file, a factory that raises or returns the wrong thing, a
model without trainable parameters, a budget below what its method needs, a
model, data and loss that do not fit together (:mod:`hesse.cli._check`), input
the operators reject) ends with one line on stderr naming the flag or the input
and the fix, and exit code 2; a failure inside a step
ends with one line and exit code 1. ``--debug`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesse.cli._check import batch_rows, check_model_data_loss
from hesse.cli._load import AnalyzeError, first_line, load
from hesse.cli._progress import Steps, progress_mode, recording
from hesse.operators import LinearOperator
from hesse.operators._data import model_arguments

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
#: what each budget flag controls (its help text).
BUDGET_HELP = {
    "num_eigenvalues": "top eigenvalues of the Hessian and of the GGN",
    "eig_matvecs": "products allowed to each top-eigenvalue run (whole model and each layer)",
    "trace_matvecs": "products for the Hessian trace (Hutch++)",
    "diag_matvecs": "products for the Hutchinson estimate of the Hessian diagonal",
    "density_probes": "random probes of the spectral density (SLQ)",
    "lanczos_steps": "Lanczos steps per spectral-density probe",
    "layer_matvecs": "products for each layer's trace (exact when the layer has at most this "
    "many parameters)",
}


def flag(name: str) -> str:
    """The command-line flag of a setting: ``"eig_matvecs"`` -> ``"--eig-matvecs"``."""
    return "--" + name.replace("_", "-")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="a curvature report for a model (report.json, figures, layers.csv, report.html)",
        description="Curvature report for a model: loss, top Hessian and GGN eigenvalues, trace "
        "with a 95 % confidence interval, spectral density, per-layer curvature and diagonals, "
        "with the versions and settings that produced them. Without --model it trains a small "
        "MLP on scikit-learn's digits data and reports on it.",
    )
    p.add_argument(
        "--model",
        metavar="FILE.py:FACTORY",
        help="a function in FILE.py returning (model, loss_fn, data), data being a list of "
        "(inputs, targets) batches, an (X, y) pair or a DataLoader without shuffling",
    )
    p.add_argument("--device", default="cpu", help="device to run on, e.g. cuda (default cpu)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="cast the model and floating-point data to this type (default: keep the model's)",
    )
    p.add_argument("--out", default="hesse-report", help="output folder (default ./hesse-report)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random probe (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for the built-in model, whose products are too "
        "small to gain from threads; torch's default with --model)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small budgets (and a smaller built-in model)"
    )
    for name, (full, quick) in BUDGETS.items():
        p.add_argument(
            flag(name),
            type=int,
            default=None,
            metavar="N",
            help=f"{BUDGET_HELP[name]} (default {full}, {quick} with --quick)",
        )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="print no progress (default: bars on a terminal, one line per step otherwise)",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the job; map bad input and failures to one stderr line and an exit code."""
    started = time.time()
    try:
        settings = _settings(args)
        shown = not args.no_progress and os.environ.get("RANK", "0") == "0"  # rank 0 speaks
        steps = Steps(progress_mode(shown), total=len(STEP_NAMES) + 2, timings={})
        with steps.step("load model"):
            model, loss_fn, data, source = load(args)
        report = analyze(model, loss_fn, data, settings, source=source, steps=steps)
        if report is not None:  # rank 0 (or the only process)
            from hesse.cli import _report

            report["provenance"].update(
                command=getattr(args, "command_line", None) or "hesse analyze",
                started_utc=datetime.fromtimestamp(started, timezone.utc).isoformat(
                    timespec="seconds"
                ),
            )
            with steps.step("write report"):
                _report.write_figures(report, Path(args.out))
            steps.close()
            report["provenance"]["wall_time_s"] = round(time.time() - started, 2)
            report["warnings"] = steps.recorded_warnings()
            _report.write_documents(report, Path(args.out))
            print(_report.summary(report, Path(args.out)))
            for line in _report.warning_lines(report):
                print(line, file=sys.stderr)
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
            f"hesse analyze: failed: {type(err).__name__}: {first_line(err)} (run with --debug "
            "for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


def _minimums(settings: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """The smallest value of each budget flag the job can run with, and why."""
    from hesse.spectra._trace import _ESTIMATORS

    hutchpp = _ESTIMATORS["hutch++"].min_round
    k = settings["num_eigenvalues"]
    return {
        "eig_matvecs": (
            k,
            f"Lanczos needs at least one product per eigenvalue ({flag('num_eigenvalues')} {k})",
        ),
        "trace_matvecs": (hutchpp, "Hutch++ needs this many to estimate its own error"),
        "layer_matvecs": (hutchpp, "a layer's Hutch++ trace needs this many to estimate its error"),
        "diag_matvecs": (2, "Hutchinson needs two probes to estimate its own error"),
    }


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
            raise AnalyzeError(f"{flag(name)} must be a positive integer, got {value}.")
        out[name] = value
    for name, (least, why) in _minimums(out).items():
        if out[name] < least:
            raise AnalyzeError(
                f"{flag(name)} must be at least {least}, got {out[name]}: {why}. "
                f"Pass {flag(name)} {least} or more."
            )
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


#: the job's steps in order (each timed in report.json, NOTE [analyze progress]).
STEP_NAMES = (
    "check model, data and loss",
    "operators",
    "loss",
    "Hessian top eigenvalues",
    "GGN top eigenvalues",
    "Hessian trace (Hutch++)",
    "spectral density (SLQ)",
    "per-layer curvature",
    "diagonals",
)


def analyze(
    model: nn.Module,
    loss_fn: Callable,
    data: Iterable,
    settings: dict[str, Any],
    *,
    source: str = "",
    steps: Steps | None = None,
) -> dict[str, Any] | None:
    """Compute every number of the report; ``None`` on ranks other than 0.

    Args:
        model, loss_fn, data: as a ``--model`` factory returns them.
        settings: budgets and seed (see :data:`BUDGETS`), device, dtype.
        source: where the model came from (for the report).
        steps: progress, timings and warnings of the run (default: no progress shown).

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
    if steps is None or rank != 0:
        steps = Steps("off", total=len(STEP_NAMES), timings={})
    seed = settings["seed"]

    def gen() -> torch.Generator:  # NOTE [analyze seeds]
        return torch.Generator().manual_seed(seed)

    report: dict[str, Any] = {"settings": dict(settings), "timings_s": steps.timings}

    def build(cls_name: str, **kw: Any) -> Any:
        try:
            return getattr(ops, cls_name)(model, loss_fn, data, **kw)
        except (TypeError, ValueError) as err:
            raise AnalyzeError(first_line(err)) from err

    with steps.step("check model, data and loss"):
        check_model_data_loss(model, loss_fn, data)
    with steps.step("operators"):
        H = build("HessianOperator")
        try:
            G = build("GGNOperator")
            ggn_reason = None
        except (NotImplementedError, AnalyzeError) as err:
            G, ggn_reason = None, first_line(err)
    n = H.shape[0]
    k = min(settings["num_eigenvalues"], max(1, n - 1))
    names = list(H.param_names)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if dist_ops else 1
    report["model"] = {
        "source": source,
        "num_parameters": n,
        "parameters": {name: list(model.get_parameter(name).shape) for name in names},
        "dtype": str(H.dtype).replace("torch.", ""),
        "device": str(H.device),
        "distributed_world_size": world_size,
    }

    with steps.step("loss"):
        report["loss"], samples, batches = _mean_loss(H)
    report["provenance"] = provenance(H, samples=samples, batches=batches, world_size=world_size)
    with steps.step("Hessian top eigenvalues"):
        report["hessian_eigenvalues"] = _top_eigenvalues(
            hesse,
            steps.counted(H, settings["eig_matvecs"], "Hessian eigsh"),
            k,
            settings,
            gen,
            history=True,
        )
    with steps.step("GGN top eigenvalues"):
        if G is None:
            report["ggn_eigenvalues"] = {"available": False, "reason": ggn_reason}
        else:
            report["ggn_eigenvalues"] = _top_eigenvalues(
                hesse, steps.counted(G, settings["eig_matvecs"], "GGN eigsh"), k, settings, gen
            )
    with steps.step("Hessian trace (Hutch++)"):
        est = hesse.trace(
            steps.counted(H, settings["trace_matvecs"], "trace"),
            method="hutch++",
            num_matvecs=settings["trace_matvecs"],
            generator=gen(),
        )
        report["trace"] = _estimate(est, method="hutch++")
    with steps.step("spectral density (SLQ)"):
        p, m = settings["density_probes"], settings["lanczos_steps"]
        sd = hesse.spectral_density(
            steps.counted(H, p * min(m, n), "density"),
            num_probes=p,
            lanczos_steps=m,
            generator=gen(),
        )
        report["spectral_density"] = _density(sd, p, m)
    with steps.step("per-layer curvature"):
        report["layers"] = [
            _layer(
                hesse,
                build("HessianOperator", params=layer_names),
                layer,
                module_type,
                layer_names,
                settings,
                gen,
                steps,
            )
            for layer, module_type, layer_names in _layers(model, names)
        ]
    with steps.step("diagonals"):
        report["diagonal"] = _diagonals(hesse, H, G, ggn_reason, settings, gen)
    report["ggn_hessian_gap"] = _gap(report)
    return report if rank == 0 else None


def provenance(
    op: LinearOperator, *, samples: int, batches: int, world_size: int
) -> dict[str, Any]:
    """Versions, device, dtype, threads and data size of a run (its record for a paper)."""
    import numpy

    import hesse

    device = str(op.device)
    if op.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(op.device)})"
    return {
        "hesse": hesse.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": device,
        "dtype": str(op.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "samples": samples,
        "batches": batches,
        "world_size": world_size,
    }


def _layers(model: nn.Module, names: list[str]) -> list[tuple[str, str, list[str]]]:
    """``(module name, module type, parameter names)`` per module that holds parameters.

    ``"0.weight"`` belongs to module ``"0"``, whose type (``Linear``) comes from
    ``model.get_submodule``; parameters of the model itself form ``"(top level)"``.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        layer = name.rsplit(".", 1)[0] if "." in name else ""
        groups.setdefault(layer, []).append(name)
    return [
        (layer or "(top level)", type(model.get_submodule(layer)).__name__, params)
        for layer, params in groups.items()
    ]


def _mean_loss(op: Any) -> tuple[float, int, int]:
    """``(loss, samples, batches)``: the dataset loss the operators differentiate.

    Batch losses are weighted by their counts (NOTE [loss normalisation] in
    ``hesse.operators._normalization``), or summed for ``reduction='sum'``; samples
    are the rows of each batch's inputs.
    """
    total, count, samples, batches = 0.0, 0.0, 0, 0
    summed = op.reduction == "sum"
    with torch.no_grad():
        for inputs, targets in op._batches():
            args, kwargs = model_arguments(inputs)
            size = op._count(inputs, targets)
            value = float(op.loss_fn(op.model(*args, **kwargs), targets))
            total += value if summed else value * size
            count += size
            samples += batch_rows(inputs)
            batches += 1
    return (total if summed else total / max(count, 1.0)), samples, batches


def _density(sd: Any, probes: int, steps: int) -> dict[str, Any]:
    """The SLQ density as reported: cut to the Ritz values' range and renormalised.

    # NOTE [density support]
    Gaussian smoothing of width ``sigma`` spreads each Ritz value's weight over
    ``+- 3 sigma``, so the smoothed curve has mass beyond the extreme Ritz values,
    where the operator may have no eigenvalue at all (a positive semi-definite
    Hessian then seems to have negative curvature). Ritz values lie inside
    ``[lambda_min, lambda_max]`` (Cauchy interlacing), so the report keeps the curve
    only on ``[min Ritz, max Ritz]`` and rescales it to integrate to 1 there; the
    mass cut off is reported. ``sigma`` is the library's default, 1 % of the Ritz
    values' range.
    """
    grid, density = sd.grid.double().cpu(), sd.density.double().cpu()
    nodes = sd.nodes.double().cpu()
    low, high = float(nodes.min()), float(nodes.max())
    inside = (grid >= low) & (grid <= high)
    cut = 0.0
    if int(inside.sum()) >= 2:
        kept = float(torch.trapezoid(density[inside], grid[inside]))
        grid, density, cut = grid[inside], density[inside] / kept, 1.0 - kept
    return {
        "num_probes": probes,
        "lanczos_steps": steps,
        "grid": grid.tolist(),
        "density": density.tolist(),
        "nodes": sd.nodes.tolist(),
        "weights": sd.weights.tolist(),
        "sigma": float(sd.sigma),
        "smoothing": "Gaussian of width sigma (1 % of the range of the Ritz values)",
        "support": [low, high],
        "normalisation": "integrates to 1 over [min Ritz value, max Ritz value] (trapezoid rule)",
        "mass_cut": cut,
        "mass": float(sd.mass),
        "num_matvecs": int(sd.num_matvecs),
    }


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
    with recording() as caught:
        res = hesse.eigsh(op, k, which="LA", max_matvecs=budget, generator=gen())
    for w in caught:  # eigsh's own advice names its argument; the command's names the flag
        if not str(w.message).startswith("hesse.eigsh"):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not all(res.converged):
        warnings.warn(
            f"Lanczos did not converge on every top eigenvalue within {flag('eig_matvecs')} "
            f"{budget} products; raise {flag('eig_matvecs')} (report.json gives each estimate's "
            "residual and convergence).",
            UserWarning,
            stacklevel=1,
        )
    out: dict[str, Any] = {
        "k": k,
        "which": "LA",
        "max_matvecs": budget,
        "eigenvalues": res.eigenvalues.tolist(),
        "residuals": res.residuals.tolist(),
        "converged": [bool(c) for c in res.converged],
        "num_matvecs": int(res.num_matvecs),
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
    # Student-t with the estimate's degrees of freedom (NOTE [calibrated intervals])
    low, high = est.interval(0.95)
    return {
        "method": "exact" if est.exact else method,
        "value": float(est.value),
        "stderr": float(est.stderr),
        "dof": float(est.dof),
        "ci95": [float(low), float(high)],
        "num_matvecs": int(est.num_matvecs),
    }


def _layer(
    hesse: Any,
    op: Any,
    layer: str,
    module_type: str,
    names: list[str],
    settings: dict[str, Any],
    gen: Callable,
    steps: Steps,
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
        "type": module_type,
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


def _gap(report: dict[str, Any]) -> dict[str, Any]:
    """How far the GGN is from the Hessian: top eigenvalues and traces side by side.

    ``trace(GGN)`` is the sum of the exact GGN diagonal, so the trace difference
    carries only the Hutch++ error of ``trace(H)``.
    """
    diag = report["diagonal"]["ggn_exact"]
    if not diag.get("available", True):
        return {"available": False, "reason": diag["reason"]}
    t = report["trace"]
    ggn_trace = diag["sum"]
    top_h = report["hessian_eigenvalues"]["eigenvalues"][0]
    top_g = report["ggn_eigenvalues"]["eigenvalues"][0]
    return {
        "top_eigenvalue_hessian": top_h,
        "top_eigenvalue_ggn": top_g,
        "top_eigenvalue_relative_difference": (top_h - top_g) / abs(top_h) if top_h else None,
        "trace_hessian": t["value"],
        "trace_ggn": ggn_trace,
        "trace_difference": t["value"] - ggn_trace,
        "trace_difference_ci95": [t["ci95"][0] - ggn_trace, t["ci95"][1] - ggn_trace],
    }
