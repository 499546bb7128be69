"""The report of ``hesse analyze``: rendered in a real browser, provenance, CSV, terminal, help."""

from __future__ import annotations

import csv
import io
import json
import platform
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

import hesse
from hesse.cli import build_parser, main
from hesse.cli._analyze import BUDGETS, STEP_NAMES, _density, flag
from hesse.cli._figures import figures
from hesse.cli._progress import progress_mode
from hesse.cli._report import COLUMNS, LAYER_COLUMNS
from tests.cli.conftest import SEED, hesse_command

ROOT = Path(__file__).resolve().parents[2]
#: where the browser test leaves its screenshot (gitignored; CI may keep it).
ARTIFACTS = ROOT / "test-artifacts"


def _report(default_run) -> tuple[subprocess.CompletedProcess, Path, dict]:
    proc, out = default_run
    assert proc.returncode == 0, proc.stderr
    return proc, out, json.loads((out / "report.json").read_text())


def test_provenance_fields_are_present_and_correct(default_run):
    proc, out, report = _report(default_run)
    p = report["provenance"]
    assert p["hesse"] == hesse.__version__
    assert p["torch"] == torch.__version__
    assert p["python"] == platform.python_version()
    assert (p["device"], p["dtype"], p["threads"]) == ("cpu", "float64", 1)
    assert (p["samples"], p["batches"]) == (256, 2)  # --quick: 256 digits in batches of 128
    assert p["command"] == f"hesse analyze --quick --seed {SEED} --out {out}"
    started = datetime.fromisoformat(p["started_utc"])
    assert started.tzinfo is not None
    assert 0 <= (datetime.now(timezone.utc) - started).total_seconds() < 600
    phases = report["timings_s"]
    assert list(phases) == ["load model", *STEP_NAMES, "write report"]
    assert all(t >= 0 for t in phases.values())
    assert sum(phases.values()) <= p["wall_time_s"] + 0.05
    # the same record on the page and in the terminal
    page = (out / "report.html").read_text()
    for value in (
        p["hesse"],
        p["torch"],
        p["python"],
        p["started_utc"],
        "256 samples in 2 batches",
    ):
        assert value in page
    assert f"torch {p['torch']}, Python {p['python']}; cpu, float64, 1 thread;" in proc.stdout
    assert "256 samples in 2 batches" in proc.stdout


def test_html_settings_show_the_dtype_that_ran(default_run):
    _, out, _ = _report(default_run)
    page = (out / "report.html").read_text()
    assert "<th>--dtype</th><td>not given (kept the model&#x27;s float64)</td>" in page


def test_layers_csv_is_the_per_layer_table(default_run):
    _, out, report = _report(default_run)
    rows = list(csv.DictReader(io.StringIO((out / "layers.csv").read_text())))
    assert list(rows[0]) == list(LAYER_COLUMNS)
    assert [(r["layer"], r["type"], int(r["num_parameters"])) for r in rows] == [
        ("0", "Linear", 2080),
        ("2", "Linear", 330),
    ]
    for row, layer in zip(rows, report["layers"]):
        assert float(row["trace"]) == layer["trace"]["value"]  # full precision
        assert [float(row["trace_ci95_low"]), float(row["trace_ci95_high"])] == layer["trace"][
            "ci95"
        ]
        assert float(row["top_eigenvalue"]) == layer["top_eigenvalue"]


def test_terminal_summary_fits_100_columns(default_run):
    proc, _, report = _report(default_run)
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= COLUMNS
    assert "layer 0 (Linear)" in proc.stdout and "1 thread" in proc.stdout
    assert report["warnings"] == []  # torch's own deprecation notices are not the user's


def test_density_has_no_mass_beyond_the_ritz_values():
    """A PSD operator: the raw smoothed curve reaches below 0, the reported one does not."""
    eigenvalues = torch.cat([torch.zeros(150), torch.linspace(1e-3, 1.0, 50)]).double()
    A = torch.diag(eigenvalues)
    sd = hesse.spectral_density(
        A, num_probes=4, lanczos_steps=30, generator=torch.Generator().manual_seed(0)
    )
    assert float(sd.grid[0]) < -0.01 and float(sd.density[0]) > 0  # the smoothing's spill
    rep = _density(sd, 4, 30)
    grid = torch.tensor(rep["grid"], dtype=torch.float64)
    density = torch.tensor(rep["density"], dtype=torch.float64)
    assert float(grid[0]) >= -1e-10 and float(grid[-1]) <= 1.0 + 1e-10  # within the spectrum
    assert rep["support"] == [float(sd.nodes.min()), float(sd.nodes.max())]
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-12)
    assert 0 < rep["mass_cut"] < 0.5


def test_each_warning_is_reported_once(tmp_path):
    from tests.cli.test_analyze import FACTORY

    (tmp_path / "m.py").write_text(FACTORY)
    proc = hesse_command(
        "analyze", "--model", "m.py:loud", "--num-eigenvalues", "1", "--eig-matvecs", "8",
        "--trace-matvecs", "4", "--diag-matvecs", "2", "--density-probes", "1",
        "--lanczos-steps", "4", "--layer-matvecs", "4", "--out", "rep", "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    message = "loud model: this warning is raised on every forward pass"
    entry, lanczos = report["warnings"]
    assert entry["message"] == message and entry["category"] == "UserWarning"
    assert entry["count"] > 20 and "Hessian top eigenvalues" in entry["steps"]
    assert proc.stderr.count(message) == 1 and proc.stdout.count(message) == 0
    assert f"{entry['count']} times" in proc.stderr
    assert (tmp_path / "rep" / "report.html").read_text().count(message) == 1
    # eight products do not converge: said once, in flag names, for the three eigsh steps
    assert lanczos["message"].startswith(
        "Lanczos did not converge on every top eigenvalue within --eig-matvecs 8 products; "
        "raise --eig-matvecs"
    )
    assert lanczos["steps"] == [
        "Hessian top eigenvalues",
        "GGN top eigenvalues",
        "per-layer curvature",
    ]
    assert "max_matvecs" not in proc.stderr and proc.stderr.count("Lanczos did not") == 1
    assert not proc.stderr.count("hesse analyze: [")  # --no-progress: no step lines


def test_progress_mode_follows_the_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_mode(True, Tty()) == "bars"
    assert progress_mode(True, io.StringIO()) == "lines"
    assert progress_mode(False, Tty()) == "off"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hesse {hesse.__version__}"


def test_help_texts_say_what_each_flag_does(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, (full, quick) in BUDGETS.items():
        assert f"{flag(name)} N" in text
        assert f"(default {full}, {quick} with --quick)" in text
    assert "--version" in " ".join(build_parser().format_help().split())
    assert "%" not in text.replace("95 % confidence", "")  # no unexpanded argparse escapes
    for words in (
        "(X, y) pair",
        "DataLoader without shuffling",
        "keep the model's",
        "one line per step",
    ):
        assert words in text


# -- the page in a real browser ------------------------------------------------------
CHECK_SCRIPT = """<script>
window.addEventListener('load', async () => {
  const probe = (src) => new Promise((done) => {
    const img = new Image();
    img.onload = () => done(img.naturalWidth > 0);
    img.onerror = () => done(false);
    img.src = src;
  });
  const images = [...document.images];
  const vector = [...document.querySelectorAll('figcaption a')].map((a) => a.href)
    .filter((href) => href.endsWith('.svg'));
  const svgLoaded = await Promise.all(vector.map(probe));
  const out = document.createElement('pre');
  out.id = 'hesse-check';
  out.textContent = JSON.stringify({
    images: images.length,
    loaded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    svgs: svgLoaded.length,
    svgsLoaded: svgLoaded.filter(Boolean).length,
    figures: document.querySelectorAll('figure figcaption').length,
    sections: document.querySelectorAll('section p.explain').length,
    overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
    height: document.documentElement.scrollHeight,
  });
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser(*args: str) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (CI installs it)")
def test_report_renders_in_a_browser_with_every_figure(default_run):
    _, out, _ = _report(default_run)
    checked = out / "report-checked.html"  # the page plus a script that reports what loaded
    checked.write_text(
        (out / "report.html").read_text().replace("</body>", CHECK_SCRIPT + "</body>")
    )
    proc = _browser(
        "--window-size=800,1000", "--virtual-time-budget=20000", "--dump-dom", checked.as_uri()
    )
    match = re.search(r'<pre id="hesse-check">(.*?)</pre>', proc.stdout)
    assert match, proc.stderr[-2000:]
    result = json.loads(match.group(1))
    n = len(figures())
    assert result["images"] == result["loaded"] == n, result  # every embedded PNG decoded
    assert result["svgs"] == result["svgsLoaded"] == n, result  # every linked SVG renders
    assert result["figures"] == n and result["sections"] == 5
    assert result["overflow"] <= 0, result  # nothing wider than an 800-pixel window
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    proc = _browser(
        f"--window-size=1000,{min(result['height'], 16000)}",
        f"--screenshot={shot}",
        (out / "report.html").as_uri(),
    )
    assert shot.is_file() and shot.stat().st_size > 50_000, proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size[0] == 1000
        colours = img.convert("L").getextrema()
        assert colours[0] < 50 and colours[1] > 200  # not a blank page
