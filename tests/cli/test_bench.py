"""``hesse bench`` and the benchmark runner: table structure and ratios (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import run as runner  # noqa: E402


def _hesse(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = "import sys; from hesse.cli import main; raise SystemExit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    proc = _hesse("bench", "--smoke", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def test_smoke_table_has_every_column_and_method(smoke):
    proc, payload = smoke
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("workload"))
    columns = [c.strip() for c in header.split("|")]
    assert columns[:5] == ["workload", "method", "time", "ratio", "peak mem"]
    assert "max_abs_err" in columns and columns[-1] == "note"
    assert "peak mem: growth of the process RSS" in proc.stdout  # says what is measured
    from benchmarks.bench_core import METHODS

    rows = payload["rows"]
    workloads = {r["workload"] for r in rows}
    assert len(workloads) == 2
    for w in workloads:
        assert {r["method"] for r in rows if r["workload"] == w} == set(METHODS)
    start = lines.index(header) + 2  # the header, then the rule
    table_rows = [line for line in lines[start:] if " | " in line]
    assert len(table_rows) == len(rows)


def test_smoke_ratios_are_against_hesse_in_the_same_run(smoke):
    _, payload = smoke
    rows = payload["rows"]
    for w in {r["workload"] for r in rows}:
        group = [r for r in rows if r["workload"] == w]
        (ref,) = [r for r in group if r["method"] == "hesse.hessian"]
        assert ref["ratio"] == pytest.approx(1.0)
        for r in group:
            assert r["ratio"] == pytest.approx(r["time_s"] / ref["time_s"])
            assert r["max_abs_err"] < 1e-4  # every method computed the same Hessian
            assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0


def test_add_ratios_uses_the_marked_reference_per_workload():
    rows = [
        {"workload": "a", "method": "peer", "time_s": 3.0},
        {"workload": "a", "method": "hesse.x", "time_s": 1.5},
        {"workload": "a", "method": "hesse.y", "time_s": 2.0, "reference": True},
        {"workload": "b", "method": "hesse.z", "time_s": 4.0},
        {"workload": "b", "method": "peer", "time_s": 2.0, "ratio": 9.0},
        {"workload": "b", "method": "skipped", "time_s": None},
    ]
    runner.add_ratios(rows)
    assert [r["ratio"] for r in rows] == [1.5, 0.75, 1.0, 1.0, 9.0, None]
    table = runner.format_table(rows)
    assert "1.50x" in table and "0.75x" in table and "9.00x" in table


def test_missing_and_broken_suites_are_skipped_with_a_note(tmp_path, monkeypatch):
    assert runner.run_suite("no_such_suite", quick=True) == ([], "not present")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_broken.py").write_text("raise ImportError('peer missing')\n")
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    rows, reason = runner.run_suite("broken", quick=True)
    assert rows == [] and "import failed" in reason


def test_unknown_suite_is_refused(capsys):
    from hesse.cli import main

    assert main(["bench", "--only", "nonsense"]) == 2
    assert "unknown suite(s) nonsense" in capsys.readouterr().err


def test_bench_outside_a_checkout_says_where_the_benchmarks_are(monkeypatch, capsys):
    from hesse.cli import _bench, main

    monkeypatch.setattr(_bench, "find_benchmarks", lambda: None)
    assert main(["bench", "--quick"]) == 2
    assert "the benchmarks/ folder was not found" in capsys.readouterr().err


# -- sweeps ----------------------------------------------------------------------------------
def test_sweep_cell_reports_ratio_and_a_crashing_peer():
    import torch
    from benchmarks import bench_sweep

    x = torch.randn(6, dtype=torch.float64)
    f = lambda x: (x.sin() * x.roll(1)).sum()  # noqa: E731

    def crash():
        raise MemoryError("out of memory")

    def calls():
        return {
            "hesse": lambda: bench_sweep.hesse.hessian(f)(x),
            "torch.func.hessian": lambda: torch.func.hessian(f)(x),
            "crashing peer": crash,
        }

    cell = bench_sweep.Cell("family", "tiny", calls)
    row = bench_sweep.run_cell(cell, 1, repeats=1, max_seconds=1.0)
    assert row["best_peer"] == "torch.func.hessian"
    assert row["ratio"] == pytest.approx(row["time_s"] / row["peer_time_s"])
    assert "crashing peer failed (MemoryError: out of memory)" in row["note"]
    assert row["max_abs_err"] < 1e-12  # answers compared, not only timed
    table = runner.format_table([row], {"peer_time_s": "peer time"})
    assert "peer time" in table.splitlines()[0]


def test_sweep_grid_covers_the_issue_and_quick_is_a_subset():
    from benchmarks import bench_sweep

    cells = [c for fam in bench_sweep.FAMILIES.values() for c in fam()]
    names = {c.name for c in cells}
    for n, h in ((64, 32), (784, 128), (3072, 512)):
        assert f"forum MLP n={n} h={h} f64" in names
    assert {f"DiagHessian CNN B={b} f32" for b in (1, 8, 32, 128, 512)} <= names
    assert "forum MLP 784-128 B=256 f32" in names
    quick = [c for c in cells if c.quick]
    assert 0 < len(quick) < len(cells) / 5
    assert {c.family for c in quick} == set(bench_sweep.FAMILIES)
