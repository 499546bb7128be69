"""The one benchmark runner: collects rows from the suites and prints one table.

Usage::

    python -m benchmarks.run [--quick] [--only core,sparse] [--json out.json]
    hesse bench [--quick] [--only ...] [--json ...]      # the same runner
    hesse bench --sweep [--quick] [--families ...]        # grids: benchmarks/bench_sweep.py

Each suite is a module ``benchmarks/bench_<name>.py`` exposing
``run(quick: bool) -> list[dict]``; a row has the keys ``workload``, ``method``,
``time_s``, ``peak_mem_bytes`` and optionally ``ratio`` and extra columns (colors,
matvecs, error, note, ...). A suite that is missing or fails to import is skipped
with a note. Where a row carries no ``ratio``, the runner computes it as the row's
time over the time of hesse's row on the same workload in the same run (hesse's row:
the one marked ``"reference": True``, else the first whose method starts with
``hesse``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(ROOT))

SUITES = (
    "core",
    "sparse",
    "operators",
    "spectra",
    "distributed",
    "curvprop",
    "kfac",
    "applications",
    "scale",
)
BASE_COLUMNS = ("workload", "method", "time_s", "ratio", "peak_mem_bytes")
HIDDEN = {"reference", "suite", "repeats"}
HEADER = (
    "time: median wall time over interleaved repeats | ratio: time / hesse's time on the same "
    "workload, this run | peak mem: growth of the process RSS high-water mark during the "
    "method's first call (Linux VmHWM, reset per call; n/a elsewhere) | cpu_s: median CPU "
    "time of this process (steadier than wall time on a shared machine), cpu_ratio its ratio"
)


# -- collecting ----------------------------------------------------------------------
def run_suite(name: str, quick: bool) -> tuple[list[dict[str, Any]], str | None]:
    """Rows of one suite, or ``([], reason)`` when it is missing or fails."""
    module_name = f"benchmarks.bench_{name}"
    if not (ROOT / "benchmarks" / f"bench_{name}.py").exists():
        return [], "not present"
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - a broken suite must not stop the others
        return [], f"import failed ({type(err).__name__}: {_first_line(err)})"
    if not callable(getattr(module, "run", None)):
        return [], "has no run(quick) function"
    try:
        rows = module.run(quick)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return [], f"failed ({type(err).__name__}: {_first_line(err)})"
    for row in rows:
        row.setdefault("suite", name)
    return rows, None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else ""


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill in ``ratio = time_s / time_s(hesse)`` per (suite, workload) where missing."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row.get("suite", ""), row["workload"]), []).append(row)
    for group in groups.values():
        marked = [r for r in group if r.get("reference")]
        named = [r for r in group if str(r["method"]).startswith("hesse")]
        ref = (marked or named or [None])[0]
        ref_time = None if ref is None else ref.get("time_s")
        ref_cpu = None if ref is None else ref.get("cpu_s")
        for row in group:
            if row.get("ratio") is None:
                row["ratio"] = _ratio(row.get("time_s"), ref_time)
            if row.get("cpu_s") is not None:
                row["cpu_ratio"] = _ratio(row["cpu_s"], ref_cpu)
    return rows


def _ratio(t: float | None, ref: float | None) -> float | None:
    return t / ref if t is not None and ref is not None and ref > 0 else None


# -- printing ------------------------------------------------------------------------
def _fmt_time(t: Any) -> str:
    if t is None:
        return "-"
    t = float(t)
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _fmt_bytes(n: Any) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict[str, Any]], titles: dict[str, str] | None = None) -> str:
    """One text table: the base columns, then every extra key in order of appearance."""
    extras: list[str] = [c for c in ("cpu_s", "cpu_ratio") if any(c in row for row in rows)]
    for row in rows:
        for key in row:
            if (
                key not in BASE_COLUMNS
                and key not in HIDDEN
                and key not in extras
                and key != "note"
            ):
                extras.append(key)
    columns = [*BASE_COLUMNS, *extras, "note"]
    titles = {"time_s": "time", "peak_mem_bytes": "peak mem", **(titles or {})}
    cells = [[titles.get(c, c) for c in columns]]
    for row in rows:
        line = []
        for c in columns:
            v = row.get(c)
            if c in ("time_s", "cpu_s") or c.endswith("_time_s"):
                line.append(_fmt_time(v))
            elif c in ("ratio", "cpu_ratio"):
                line.append("-" if v is None else f"{v:.2f}x")
            elif c == "peak_mem_bytes":
                line.append(
                    _fmt_bytes(v) if "time_s" in row and row.get("time_s") is not None else "-"
                )
            elif c.endswith("_mem_bytes"):
                line.append("-" if v is None else _fmt_bytes(v))
            else:
                line.append(_fmt(v))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    right = {"time_s", "ratio", "peak_mem_bytes", "cpu_s", "cpu_ratio", "peer_time_s"}
    right |= {c for c in columns if c.endswith("_mem_bytes")}

    def render(r: list[str]) -> str:
        parts = [
            r[i].rjust(widths[i]) if columns[i] in right else r[i].ljust(widths[i])
            for i in range(len(columns))
        ]
        return " | ".join(parts).rstrip()

    out = [render(cells[0]), "-+-".join("-" * w for w in widths)]
    previous = None
    for row, line in zip(rows, cells[1:]):
        key = (row.get("suite"), row["workload"])
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(render(line))
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hesse bench",
        description="Benchmark hesse against the usual ways of computing second derivatives.",
    )
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a run under a minute (fewer repeats, slow loops skipped)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated suites to run (default: all of {','.join(SUITES)})",
    )
    parser.add_argument(
        "--json", dest="json_path", default=None, help="also write the rows to this JSON file"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="run every family over its grid instead of the suites: one ratio (hesse / best "
        "peer) per cell, at 1 thread and at PyTorch's default; --quick: a subset",
    )
    parser.add_argument(
        "--families",
        default=None,
        help="with --sweep: comma-separated families (default: all)",
    )
    parser.add_argument(
        "--match",
        default=None,
        help="with --sweep: only cells whose name contains this text (e.g. 'B=512')",
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return execute(args)


def execute(args: argparse.Namespace) -> int:
    from benchmarks._measure import prepare_process

    if getattr(args, "sweep", False):
        return execute_sweep(args)

    if args.only:
        suites = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in suites if s not in SUITES]
        if unknown:
            print(
                f"hesse bench: unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}.",
                file=sys.stderr,
            )
            return 2
    else:
        suites = list(SUITES)
    prepare_process(args.threads)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    suite_seconds: dict[str, float] = {}
    if args.smoke:  # tiny core subset, for the tests
        from benchmarks import bench_core

        rows = [dict(r, suite="core") for r in bench_core.smoke()]
    else:
        for name in suites:
            print(f"[hesse bench] running suite {name!r}...", file=sys.stderr, flush=True)
            suite_start = time.perf_counter()
            suite_rows, reason = run_suite(name, args.quick)
            suite_seconds[name] = round(time.perf_counter() - suite_start, 1)
            if reason is not None:
                skipped[name] = reason
            rows.extend(suite_rows)
    add_ratios(rows)
    elapsed = time.perf_counter() - started
    import torch

    settings = {
        "quick": bool(args.quick),
        "smoke": bool(args.smoke),
        "suites": suites,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "elapsed_s": round(elapsed, 2),
        "suite_seconds": suite_seconds,
    }
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    print(
        f"hesse bench ({mode}; torch {settings['torch']}, "
        f"{settings['threads']} thread(s), {settings['machine']})"
    )
    print(HEADER)
    print()
    print(format_table(rows) if rows else "(no rows)")
    for name, reason in skipped.items():
        print(f"suite {name}: skipped, {reason}")
    ran = ", ".join(
        f"{name} {sec:.0f} s" for name, sec in suite_seconds.items() if name not in skipped
    )
    print(f"total {elapsed:.1f} s" + (f" ({ran})" if ran else ""))
    if args.json_path:
        payload = {"settings": settings, "skipped": skipped, "rows": rows}
        Path(args.json_path).write_text(json.dumps(payload, indent=2, default=str))
    return 0


SWEEP_HEADER = (
    "one row per cell and thread count | time: hesse's median wall time over interleaved "
    "repeats | ratio: hesse's time / the best peer's time in the same run (below 1.00x hesse "
    "wins) | cpu_ratio: the same with this process's CPU time (steadier on a loaded machine) | "
    "peak mem: RSS growth during the first call (NOTE [peak memory]) | max_abs_err: "
    "largest difference between the methods' answers | rows sorted by ratio, the worst last"
)


def execute_sweep(args: argparse.Namespace) -> int:
    """``--sweep``: every family over its grid, both thread settings, one table per family."""
    import torch
    from benchmarks import bench_sweep

    default_threads = torch.get_num_threads()  # PyTorch's default, before anyone sets it
    threads = sorted({1, default_threads})
    families = None
    if getattr(args, "families", None):
        families = [f.strip() for f in args.families.split(",") if f.strip()]
        unknown = [f for f in families if f not in bench_sweep.FAMILIES]
        if unknown:
            print(
                f"hesse bench --sweep: unknown families {unknown}; choose from "
                f"{', '.join(bench_sweep.FAMILIES)}.",
                file=sys.stderr,
            )
            return 2
    started = time.perf_counter()
    tables = bench_sweep.run_sweep(
        bool(args.quick),
        threads,
        families,
        match=getattr(args, "match", None),
        progress=lambda text: print(f"[hesse bench --sweep] {text}", file=sys.stderr, flush=True),
    )
    elapsed = time.perf_counter() - started
    mode = "quick" if args.quick else "full"
    print(
        f"hesse bench --sweep ({mode}; torch {torch.__version__}, threads {threads} "
        f"(default {default_threads}), {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs)"
    )
    print(SWEEP_HEADER)
    worst: list[tuple[float, str, dict[str, Any]]] = []
    titles = {"peer_time_s": "peer time", "peer_mem_bytes": "peer mem", "best_peer": "best peer"}
    for family, rows in tables.items():
        rows.sort(key=lambda r: (r.get("ratio") is not None, r.get("ratio") or 0.0))
        print(f"\n== {family} ==")
        print(format_table(rows, titles) if rows else "(no cells)")
        worst += [(r["ratio"], family, r) for r in rows if r.get("ratio") is not None]
    losing = sorted(w for w in worst if w[0] > 1.0)
    print(f"\n{len(worst)} cells with a ratio, {len(losing)} above 1.00x")
    for ratio, family, r in losing:
        print(f"  {ratio:.2f}x  {family}: {r['workload']} ({r['method']}) vs {r['best_peer']}")
    print(f"total {elapsed:.1f} s")
    if args.json_path:
        payload = {"threads": threads, "elapsed_s": round(elapsed, 1), "tables": tables}
        Path(args.json_path).write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
