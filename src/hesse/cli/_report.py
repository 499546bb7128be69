"""The outputs of ``hesse analyze``: report.json, PNG plots, report.html, terminal summary.

The plots are drawn with matplotlib's Agg backend (no display needed); the HTML
page embeds them as base64 data, so the one file can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

PLOTS = {
    "spectral_density.png": "Spectral density of the Hessian (SLQ)",
    "diagonal_histogram.png": "Diagonal: exact GGN and Hutchinson estimate of the Hessian",
    "layers.png": "Per-layer curvature",
    "eigenvalue_convergence.png": "Top Hessian eigenvalue estimates vs. products spent",
}


def write_all(report: dict[str, Any], out: Path) -> list[Path]:
    """Write report.json, every plot and report.html into ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json"]
    paths[0].write_text(json.dumps(report, indent=1, allow_nan=True))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawers = {
        "spectral_density.png": _plot_density,
        "diagonal_histogram.png": _plot_diagonals,
        "layers.png": _plot_layers,
        "eigenvalue_convergence.png": _plot_convergence,
    }
    for name, draw in drawers.items():
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
        draw(ax, report)
        ax.set_title(PLOTS[name])
        fig.tight_layout()
        fig.savefig(out / name, format="png")
        plt.close(fig)
        paths.append(out / name)
    (out / "report.html").write_text(render_html(report, out))
    paths.append(out / "report.html")
    return paths


# -- plots ---------------------------------------------------------------------------
def _plot_density(ax: Any, report: dict[str, Any]) -> None:
    sd = report["spectral_density"]
    grid, density = sd["grid"], sd["density"]
    ax.plot(grid, density, color="C0")
    ax.fill_between(grid, density, alpha=0.25, color="C0")
    # Below the smoothing width the density has no detail: linear there, log beyond.
    spread = max(abs(g) for g in grid) or 1.0
    lin = max(sd["sigma"], spread * 1e-6, 1e-12)
    ax.set_xscale("symlog", linthresh=lin)
    _symlog_ticks(ax, lin, min(grid), max(grid))
    ax.set_yscale("log")
    positive = [d for d in density if d > 0]
    if positive:
        ax.set_ylim(max(min(positive), max(positive) * 1e-8), max(positive) * 2)
    ax.set_xlabel("eigenvalue (symmetric log scale)")
    ax.set_ylabel("density")


def _plot_diagonals(ax: Any, report: dict[str, Any]) -> None:
    diag = report["diagonal"]
    series = []
    if diag["ggn_exact"].get("values"):
        series.append(("GGN diagonal (exact)", diag["ggn_exact"]["values"]))
    if diag["hessian_hutchinson"].get("values"):
        series.append(("Hessian diagonal (Hutchinson)", diag["hessian_hutchinson"]["values"]))
    if not series:
        ax.text(0.5, 0.5, "diagonal too long to plot", ha="center", transform=ax.transAxes)
        return
    everything = [v for _, vals in series for v in vals]
    top = max(abs(v) for v in everything) or 1.0
    lin = max(top * 1e-4, 1e-12)
    edges = _symlog_edges(min(everything), max(everything), lin)
    for label, vals in series:
        ax.hist(vals, bins=edges, alpha=0.55, label=label)
    ax.set_xscale("symlog", linthresh=lin, linscale=2)
    _symlog_ticks(ax, lin, min(everything), max(everything))
    ax.set_yscale("log")
    ax.set_xlabel("diagonal entry (symmetric log scale)")
    ax.set_ylabel("count")
    ax.legend()


def _symlog_ticks(ax: Any, lin: float, low: float, high: float, most: int = 9) -> None:
    """Ticks at 0 and at powers of ten beyond the linear region (no crowding around 0)."""
    first = math.floor(math.log10(lin)) + 1
    pos = [10.0**e for e in range(first, math.floor(math.log10(max(high, lin))) + 1)]
    neg = [-(10.0**e) for e in range(first, math.floor(math.log10(max(-low, lin))) + 1)]
    ticks = sorted([*neg, 0.0, *pos])
    while len(ticks) > most:
        ticks = [t for i, t in enumerate(ticks) if i % 2 == 0 or t == 0.0]
    ax.set_xticks(ticks)


def _symlog_edges(low: float, high: float, lin: float, bins: int = 60) -> list[float]:
    """Bin edges evenly spaced in ``asinh(x / lin)``, the scale of a symlog axis."""
    a, b = math.asinh(low / lin), math.asinh(high / lin)
    if b <= a:
        b = a + 1.0
    return [lin * math.sinh(a + (b - a) * i / bins) for i in range(bins + 1)]


def _plot_layers(ax: Any, report: dict[str, Any]) -> None:
    layers = report["layers"]
    names = [f"{layer['layer']}\n({layer['num_parameters']})" for layer in layers]
    x = list(range(len(layers)))
    traces = [layer["trace"]["value"] for layer in layers]
    errors = [1.96 * layer["trace"]["stderr"] for layer in layers]
    tops = [layer["top_eigenvalue"] for layer in layers]
    width = 0.38
    ax.bar(
        [i - width / 2 for i in x], traces, width, yerr=errors, capsize=3, label="trace (95 % CI)"
    )
    ax.bar([i + width / 2 for i in x], tops, width, label="top eigenvalue")
    ax.set_xticks(x, names)
    top = max([abs(v) for v in traces + tops] or [1.0]) or 1.0
    ax.set_yscale("symlog", linthresh=max(top * 1e-4, 1e-12))
    ax.set_xlabel("layer (parameters)")
    ax.legend()


def _plot_convergence(ax: Any, report: dict[str, Any]) -> None:
    history = report["hessian_eigenvalues"].get("history") or []
    if not history:
        ax.text(0.5, 0.5, "no history", ha="center", transform=ax.transAxes)
        return
    k = len(history[-1]["eigenvalues"])
    for i in range(k):
        xs = [p["num_matvecs"] for p in history if len(p["eigenvalues"]) > i]
        ys = [p["eigenvalues"][i] for p in history if len(p["eigenvalues"]) > i]
        ax.plot(xs, ys, marker="o", label=f"lambda_{i + 1}")
    ax.set_xlabel("Hessian-vector products spent (eigsh stopped at that budget)")
    ax.set_ylabel("eigenvalue estimate")
    ax.legend(fontsize="small")


# -- text ----------------------------------------------------------------------------
def _g(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers as ``(quantity, value)`` pairs (terminal table and HTML)."""
    m = report["model"]
    rows = [
        ("model", m["source"]),
        ("parameters", f"{m['num_parameters']} ({m['dtype']}, {m['device']})"),
        ("loss", _g(report["loss"])),
    ]
    he = report["hessian_eigenvalues"]
    conv = sum(he["converged"])
    rows.append(
        (
            f"Hessian top {he['k']} eigenvalues",
            ", ".join(_g(v) for v in he["eigenvalues"])
            + f"  ({conv}/{he['k']} converged, {he['num_matvecs']} products)",
        )
    )
    ge = report["ggn_eigenvalues"]
    if ge.get("available", True):
        rows.append(
            (
                f"GGN top {ge['k']} eigenvalues",
                ", ".join(_g(v) for v in ge["eigenvalues"])
                + f"  ({sum(ge['converged'])}/{ge['k']} converged)",
            )
        )
    else:
        rows.append(("GGN", f"not available: {ge['reason']}"))
    t = report["trace"]
    rows.append(
        (
            "Hessian trace (Hutch++)",
            f"{_g(t['value'])} +- {_g(t['stderr'])}  (95 % CI [{_g(t['ci95'][0])}, {_g(t['ci95'][1])}], {t['num_matvecs']} products)",
        )
    )
    sd = report["spectral_density"]
    nodes = sd["nodes"]
    rows.append(
        (
            "spectral density (SLQ)",
            f"Ritz values in [{_g(min(nodes))}, {_g(max(nodes))}], {sd['num_probes']} probes x {sd['lanczos_steps']} steps",
        )
    )
    for layer in report["layers"]:
        tr = layer["trace"]
        rows.append(
            (
                f"layer {layer['layer']} ({layer['num_parameters']} params)",
                f"trace {_g(tr['value'])} ({tr['method']}), top eigenvalue {_g(layer['top_eigenvalue'])}",
            )
        )
    d = report["diagonal"]
    h = d["hessian_hutchinson"]
    g = d["ggn_exact"]
    text = f"Hessian (Hutchinson, {h['num_matvecs']} products) mean {_g(h['mean'])}"
    if g.get("available", True):
        text = f"GGN (exact) mean {_g(g['mean'])}, " + text
        if "correlation" in d:
            text += f", correlation {_g(d['correlation'])}"
    rows.append(("diagonal", text))
    bl = d.get("becker_lecun")
    if bl is not None:
        text = (
            f"relative error {_g(bl['relative_error'])} against the exact diagonal"
            if "relative_error" in bl
            else f"not checked ({bl['reason']})"
        )
        rows.append(("Becker-LeCun diagonal", text))
    return rows


def summary(report: dict[str, Any], out: Path) -> str:
    """A two-column text table of the headline numbers and where the files are."""
    rows = summary_rows(report)
    width = max(len(a) for a, _ in rows)
    rule = "-" * (width + 2 + max(len(b) for _, b in rows))
    lines = ["hesse analyze", rule]
    lines += [f"{a.ljust(width)}  {b}" for a, b in rows]
    lines += [rule, f"report: {out / 'report.html'} (numbers: {out / 'report.json'})"]
    return "\n".join(lines)


def render_html(report: dict[str, Any], out: Path) -> str:
    """A self-contained page: the summary table, the settings and the plots inline."""
    rows = "".join(
        f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td></tr>"
        for a, b in summary_rows(report)
    )
    settings = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_g(v))}</td></tr>"
        for k, v in report["settings"].items()
    )
    figures = []
    for name, title in PLOTS.items():
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        figures.append(
            f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>"
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>hesse analyze report</title>"
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin-bottom:1.5em}th,td{border:1px solid #ccc;"
        "padding:4px 8px;text-align:left;vertical-align:top}th{background:#f4f4f4}"
        "figure{display:inline-block;margin:0.5em}img{max-width:460px}</style></head><body>"
        "<h1>hesse analyze</h1><h2>Summary</h2><table>"
        f"{rows}</table><h2>Plots</h2>{''.join(figures)}<h2>Settings</h2><table>{settings}</table>"
        "<p>Every number, with the settings that produced it, is in report.json.</p>"
        "</body></html>"
    )
