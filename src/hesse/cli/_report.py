"""The outputs of ``hesse analyze``: report.json, figures, layers.csv, report.html, terminal.

The HTML page embeds the PNG figures as base64 data, so the one file can be
mailed or archived; it links the SVG and PDF files next to it (NOTE [report
figures] in :mod:`hesse.cli._figures`). Every section of the page opens with a
short plain-language account of what its numbers mean.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import textwrap
from pathlib import Path
from typing import Any

from hesse.cli import _figures

#: the terminal summary fits this many columns.
COLUMNS = 100
#: labels longer than this get a line of their own in the terminal summary.
MAX_LABEL = 30
#: columns of layers.csv (and of the HTML per-layer table).
LAYER_COLUMNS = (
    "layer",
    "type",
    "num_parameters",
    "trace",
    "trace_stderr",
    "trace_ci95_low",
    "trace_ci95_high",
    "trace_method",
    "top_eigenvalue",
    "top_eigenvalue_converged",
    "top_eigenvalue_matvecs",
)


def write_figures(report: dict[str, Any], out: Path) -> list[Path]:
    """Every figure as PNG, SVG and PDF in ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    return _figures.write(report, out)


def write_documents(report: dict[str, Any], out: Path) -> list[Path]:
    """report.json, layers.csv and report.html in ``out`` (figures written first)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "layers.csv", out / "report.html"]
    paths[0].write_text(json.dumps(report, indent=1, allow_nan=True))
    paths[1].write_text(layers_csv(report))
    paths[2].write_text(render_html(report, out))
    return paths


def write_all(report: dict[str, Any], out: Path) -> list[Path]:
    """Figures, report.json, layers.csv and report.html in ``out``; return the paths."""
    return [*write_figures(report, out), *write_documents(report, out)]


# -- numbers as text -----------------------------------------------------------------
def _g(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.6g}"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    return str(x)


def _layer_row(layer: dict[str, Any]) -> dict[str, Any]:
    tr = layer["trace"]
    return {
        "layer": layer["layer"],
        "type": layer["type"],
        "num_parameters": layer["num_parameters"],
        "trace": tr["value"],
        "trace_stderr": tr["stderr"],
        "trace_ci95_low": tr["ci95"][0],
        "trace_ci95_high": tr["ci95"][1],
        "trace_method": tr["method"],
        "top_eigenvalue": layer["top_eigenvalue"],
        "top_eigenvalue_converged": layer["top_eigenvalue_converged"],
        "top_eigenvalue_matvecs": layer["top_eigenvalue_matvecs"],
    }


def layers_csv(report: dict[str, Any]) -> str:
    """The per-layer table as CSV (full precision, one row per layer)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LAYER_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for layer in report["layers"]:
        writer.writerow(
            {k: repr(v) if isinstance(v, float) else v for k, v in _layer_row(layer).items()}
        )
    return buffer.getvalue()


def _trace_text(t: dict[str, Any], pm: str = "+-") -> str:
    if t["method"] == "exact":
        return f"{_g(t['value'])} (exact, {t['num_matvecs']} products)"
    return (
        f"{_g(t['value'])} {pm} {_g(t['stderr'])} (95 % CI [{_g(t['ci95'][0])}, "
        f"{_g(t['ci95'][1])}], {t['method']}, {t['num_matvecs']} products)"
    )


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers as ``(quantity, value)`` pairs (terminal table and HTML)."""
    m = report["model"]
    rows = [
        ("model", m["source"]),
        ("parameters", f"{m['num_parameters']:,} ({m['dtype']}, {m['device']})"),
        ("loss", _g(report["loss"])),
    ]
    he = report["hessian_eigenvalues"]
    rows.append(
        (
            f"Hessian top {he['k']} eigenvalues",
            ", ".join(_g(v) for v in he["eigenvalues"])
            + f" ({sum(he['converged'])}/{he['k']} converged, {he['num_matvecs']} products)",
        )
    )
    ge = report["ggn_eigenvalues"]
    if ge.get("available", True):
        rows.append(
            (
                f"GGN top {ge['k']} eigenvalues",
                ", ".join(_g(v) for v in ge["eigenvalues"])
                + f" ({sum(ge['converged'])}/{ge['k']} converged, {ge['num_matvecs']} products)",
            )
        )
    else:
        rows.append(("GGN", f"not available: {ge['reason']}"))
    rows.append(("Hessian trace", _trace_text(report["trace"])))
    gap = report.get("ggn_hessian_gap", {})
    if gap.get("available", True) and gap:
        low, high = gap["trace_difference_ci95"]
        rows.append(
            (
                "trace(Hessian) - trace(GGN)",
                f"{_g(gap['trace_difference'])} (95 % CI [{_g(low)}, {_g(high)}]; "
                f"trace(GGN) {_g(gap['trace_ggn'])} exact)",
            )
        )
    sd = report["spectral_density"]
    rows.append(
        (
            "spectral density (SLQ)",
            f"Ritz values in [{_g(sd['support'][0])}, {_g(sd['support'][1])}], "
            f"{sd['num_probes']} probes x {sd['lanczos_steps']} steps, sigma {_g(sd['sigma'])}",
        )
    )
    for layer in report["layers"]:
        rows.append(
            (
                f"layer {layer['layer']} ({layer['type']})",
                f"{layer['num_parameters']:,} params, trace {_trace_text(layer['trace'])}, "
                f"top eigenvalue {_g(layer['top_eigenvalue'])}",
            )
        )
    d = report["diagonal"]
    h, g = d["hessian_hutchinson"], d["ggn_exact"]
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


def provenance_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Versions, machine, data size, command line and timings as ``(field, value)`` pairs."""
    p = report["provenance"]
    rows = [
        ("hesse", p["hesse"]),
        ("torch", p["torch"]),
        ("Python", p["python"]),
        ("NumPy", p["numpy"]),
        ("platform", p["platform"]),
        ("device", p["device"]),
        ("dtype", p["dtype"]),
        ("CPU threads", str(p["threads"])),
        ("data", _data_size(p)),
    ]
    if p["world_size"] > 1:
        rows.append(("processes", str(p["world_size"])))
    rows += [
        ("command", p.get("command", "-")),
        ("started (UTC)", p.get("started_utc", "-")),
        ("wall time", f"{p['wall_time_s']:.2f} s" if "wall_time_s" in p else "-"),
    ]
    rows += [(f"time: {step}", f"{seconds:.2f} s") for step, seconds in report["timings_s"].items()]
    return rows


def _data_size(p: dict[str, Any]) -> str:
    samples = f"{p['samples']:,} sample" + ("s" if p["samples"] != 1 else "")
    return f"{samples} in {p['batches']:,} batch" + ("es" if p["batches"] != 1 else "")


def _provenance_line(report: dict[str, Any]) -> str:
    p = report["provenance"]
    threads = f"{p['threads']} thread" + ("s" if p["threads"] != 1 else "")
    wall = f", {p['wall_time_s']:.1f} s" if "wall_time_s" in p else ""
    return (
        f"hesse {p['hesse']}, torch {p['torch']}, Python {p['python']}; {p['device']}, "
        f"{p['dtype']}, {threads}; {_data_size(p)}; "
        f"started {p.get('started_utc', '-')}{wall}"
    )


def _table(rows: list[tuple[str, str]]) -> list[str]:
    """Two columns within :data:`COLUMNS`: values wrapped, long labels on their own line."""
    width = min(max(len(a) for a, _ in rows), MAX_LABEL)
    indent = " " * (width + 2)
    lines = []
    for label, value in rows:
        wrapped = textwrap.wrap(value, COLUMNS - width - 2, break_on_hyphens=False) or [""]
        if len(label) > width:
            lines.append(label)
            lines += [indent + part for part in wrapped]
        else:
            lines.append(f"{label.ljust(width)}  {wrapped[0]}")
            lines += [indent + part for part in wrapped[1:]]
    return lines


def summary(report: dict[str, Any], out: Path) -> str:
    """The headline numbers, the provenance and where the files are, within 100 columns."""
    rule = "-" * COLUMNS
    lines = ["hesse analyze", rule, *_table(summary_rows(report)), rule]
    lines += _table([("run", _provenance_line(report))])
    lines += textwrap.wrap(
        f"report: {out / 'report.html'} (numbers: report.json; per-layer table: layers.csv; "
        f"figures: PNG, SVG and {_figures.PDF})",
        COLUMNS,
        subsequent_indent="  ",
        break_on_hyphens=False,
    )
    return "\n".join(lines)


def warning_lines(report: dict[str, Any]) -> list[str]:
    """Each distinct warning of the run once (NOTE [analyze warnings])."""
    lines = []
    for w in report.get("warnings", []):
        times = f", {w['count']} times" if w["count"] > 1 else ""
        where = w["steps"][0] if len(w["steps"]) == 1 else f"{len(w['steps'])} steps"
        lines.append(f"hesse analyze: warning ({w['category']} in {where}{times}): {w['message']}")
    return lines


# -- HTML ----------------------------------------------------------------------------
EXPLAIN = {
    "eigenvalues": (
        "The top eigenvalue of the Hessian is the curvature of the loss along its steepest "
        "direction in parameter space. It measures how sharp the minimum is: plain gradient "
        "descent with learning rate &eta; is stable near this point only while &eta; &lt; "
        "2&nbsp;/&nbsp;&lambda;<sub>1</sub>. The GGN (generalised Gauss&ndash;Newton matrix) is "
        "the part of the Hessian that comes from the curvature of the loss in the model's "
        "output; it is never negative. Lanczos iterations find the largest eigenvalues from "
        "Hessian-vector products; the figure shows each estimate settling as products are "
        "spent, and an estimate is marked converged when its residual is small."
    ),
    "trace": (
        "The trace is the sum of all eigenvalues, equal to the sum of the Hessian's diagonal "
        "entries: the total curvature, or the average curvature times the number of "
        "parameters. It is estimated from random products (Hutch++); the interval is the 95 % "
        "confidence interval of that estimate, not a spread over data or seeds."
    ),
    "density": (
        "The spectral density shows how all the Hessian's eigenvalues are spread: most "
        "trained networks have a bulk near zero (flat directions) and a few outliers (the "
        "sharp directions, often about as many as classes). Eigenvalues below zero are "
        "directions of negative curvature: the point is not a minimum in those directions."
    ),
    "gap": (
        "The Hessian is the GGN plus a term that weighs the network's own second derivatives "
        "by the loss's gradient in the output (the residuals). That term vanishes for a "
        "perfect fit and for models linear in their parameters. A small gap means the GGN "
        "&mdash; which K-FAC, Gauss&ndash;Newton optimisers and Laplace approximations use "
        "&mdash; captures the curvature; a large one means it misses negative or extra "
        "curvature. Each point of the scatter is one parameter; points on the dashed line "
        "y&nbsp;=&nbsp;x agree, and the spread includes the Hutchinson estimate's noise."
    ),
    "layers": (
        "Each layer's block of the Hessian: the curvature of the loss in that layer's "
        "parameters with all other parameters held fixed. Layers with a large trace or top "
        "eigenvalue are where the loss is most sensitive; comparing them shows which layers "
        "would limit a step size or dominate a curvature-based pruning score. A layer's trace "
        "is computed exactly when the layer is small enough."
    ),
}


def _esc(x: Any) -> str:
    return html.escape(x if isinstance(x, str) else _g(x))


def _rows_html(rows: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{_esc(a)}</th><td>{_esc(b)}</td></tr>" for a, b in rows)


def _figure(out: Path, stem: str, caption: str) -> str:
    """Figure N of the page (N = its page of figures.pdf), the PNG inline, links to the files."""
    title = _figures.figures()[stem][0]
    page = list(_figures.figures()).index(stem) + 1
    data = base64.b64encode((out / f"{stem}.png").read_bytes()).decode("ascii")
    links = [f'<a href="{stem}.{fmt}">{fmt.upper()}</a>' for fmt in _figures.FORMATS]
    links.append(f'<a href="{_figures.PDF}#page={page}">PDF</a> (page {page} of {_figures.PDF})')
    return (
        f'<figure id="{stem}"><img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{data}"><figcaption><b>Figure {page}.</b> '
        f"{html.escape(title)}. {caption} Files: {' &middot; '.join(links)}.</figcaption></figure>"
    )


def _density_caption(report: dict[str, Any]) -> str:
    sd = report["spectral_density"]
    low, high = sd["support"]
    return html.escape(
        f"Stochastic Lanczos quadrature, {sd['num_probes']} probes x {sd['lanczos_steps']} "
        f"Lanczos steps ({sd['num_matvecs']} products). Each Ritz value (ticks along the bottom) "
        f"is smoothed by a Gaussian of width sigma = {sd['sigma']:.3g}, 1 % of the range of the "
        f"Ritz values. The curve is drawn only from the smallest to the largest Ritz value "
        f"([{low:.4g}, {high:.4g}]; every eigenvalue estimate lies in the true spectrum's "
        f"range), where it is normalised to integrate to 1; the smoothing mass beyond that "
        f"range ({100 * sd['mass_cut']:.2g} %) is dropped. Dashed lines: the top Hessian "
        "eigenvalues found by Lanczos. Linear eigenvalue axis, logarithmic density axis."
    )


def _eigen_table(report: dict[str, Any]) -> str:
    he, ge = report["hessian_eigenvalues"], report["ggn_eigenvalues"]
    has_ggn = ge.get("available", True)
    head = "<tr><th></th><th>Hessian</th><th>converged</th>"
    head += "<th>GGN</th><th>converged</th></tr>" if has_ggn else "</tr>"
    body = ""
    for i, value in enumerate(he["eigenvalues"]):
        body += f"<tr><th>&lambda;<sub>{i + 1}</sub></th><td>{_esc(value)}</td>"
        body += f"<td>{_esc(he['converged'][i])}</td>"
        if has_ggn and i < len(ge["eigenvalues"]):
            body += f"<td>{_esc(ge['eigenvalues'][i])}</td><td>{_esc(ge['converged'][i])}</td>"
        body += "</tr>"
    return f"<div class='scroll'><table>{head}{body}</table></div>"


def _layer_table(report: dict[str, Any]) -> str:
    shown = ("layer", "type", "num_parameters", "trace", "trace_ci95_low", "trace_ci95_high")
    shown += ("trace_method", "top_eigenvalue", "top_eigenvalue_converged")
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in shown)
    body = ""
    for layer in report["layers"]:
        row = _layer_row(layer)
        body += "<tr>" + "".join(f"<td>{_esc(row[c])}</td>" for c in shown) + "</tr>"
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def _gap_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    gap = report.get("ggn_hessian_gap", {})
    if not gap.get("available", True):
        return [("GGN", f"not available: {gap['reason']}")]
    rel = gap["top_eigenvalue_relative_difference"]
    low, high = gap["trace_difference_ci95"]
    return [
        (
            "top eigenvalue: Hessian / GGN",
            f"{_g(gap['top_eigenvalue_hessian'])} / {_g(gap['top_eigenvalue_ggn'])}"
            + (f" (relative difference {rel:.3g})" if rel is not None else ""),
        ),
        ("trace: Hessian / GGN (exact)", f"{_g(gap['trace_hessian'])} / {_g(gap['trace_ggn'])}"),
        ("trace difference", f"{_g(gap['trace_difference'])} (95 % CI [{_g(low)}, {_g(high)}])"),
    ]


def _settings_rows(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """The settings under the flags that set them (``eig_matvecs`` -> ``--eig-matvecs``)."""
    return [("--" + k.replace("_", "-"), _g(v)) for k, v in settings.items()]


def render_html(report: dict[str, Any], out: Path) -> str:
    """A self-contained page: summary, one section per quantity, provenance and settings."""
    settings = dict(report["settings"])
    if settings.get("dtype") is None:
        settings["dtype"] = f"not given (kept the model's {report['provenance']['dtype']})"
    warnings_html = ""
    if report.get("warnings"):
        items = "".join(f"<li>{html.escape(line)}</li>" for line in warning_lines(report))
        warnings_html = f"<h2>Warnings</h2><ul>{items}</ul>"
    diag = report["diagonal"]
    scatter_caption = html.escape(
        f"One point per parameter, coloured by layer; symmetric logarithmic axes (linear near "
        f"zero). The Hessian diagonal is a Hutchinson estimate from "
        f"{diag['hessian_hutchinson']['num_matvecs']} products (mean standard error "
        f"{diag['hessian_hutchinson']['mean_stderr']:.3g}), the GGN diagonal is exact."
    )
    p = report["provenance"]
    sections = [
        (
            "Top eigenvalues",
            EXPLAIN["eigenvalues"],
            _eigen_table(report)
            + _figure(
                out,
                "eigenvalue_convergence",
                "Lanczos stopped after fewer products, same seed: the estimates it had at that point.",
            ),
        ),
        (
            "Trace",
            EXPLAIN["trace"],
            f"<div class='scroll'><table>{_rows_html([('Hessian trace', _trace_text(report['trace'], '±'))])}</table></div>",
        ),
        (
            "Spectral density",
            EXPLAIN["density"],
            _figure(out, "spectral_density", _density_caption(report)),
        ),
        (
            "GGN versus Hessian",
            EXPLAIN["gap"],
            f"<div class='scroll'><table>{_rows_html(_gap_rows(report))}</table></div>"
            + _figure(out, "diagonal_scatter", scatter_caption)
            + _figure(
                out,
                "diagonal_histogram",
                "Histogram over parameters, symmetric logarithmic axis.",
            ),
        ),
        (
            "Per-layer curvature",
            EXPLAIN["layers"],
            _layer_table(report)
            + '<p>The same table with full precision: <a href="layers.csv">layers.csv</a>.</p>'
            + _figure(
                out,
                "layers",
                "Trace with its 95 % confidence interval and top eigenvalue of each layer's Hessian block; symmetric logarithmic axis.",
            ),
        ),
    ]
    body = "".join(
        f"<section><h2>{i}. {html.escape(title)}</h2><p class='explain'>{text}</p>{content}</section>"
        for i, (title, text, content) in enumerate(sections, start=1)
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>hesse analyze report</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;"
        "line-height:1.45;color:#222}"
        ".scroll{overflow-x:auto}table{border-collapse:collapse;margin:0.8em 0 1.2em}th,td{border:1px solid #ccc;"
        "padding:3px 8px;text-align:left;vertical-align:top;font-size:0.92em}"
        "th{background:#f4f4f4;font-weight:600}.explain{color:#333;max-width:52em}"
        "figure{margin:1em 0 1.8em}img{width:100%;max-width:960px;height:auto;display:block}"
        "figcaption{font-size:0.88em;color:#444;margin-top:0.4em}.meta{color:#555}"
        "</style></head><body>"
        "<h1>hesse analyze report</h1>"
        f"<p class='meta'>{html.escape(report['model']['source'])} &middot; "
        f"{report['model']['num_parameters']:,} parameters &middot; {html.escape(p['dtype'])} on "
        f"{html.escape(p['device'])} &middot; hesse {html.escape(p['hesse'])} &middot; "
        f"{html.escape(p.get('started_utc', ''))}</p>"
        f"<h2>Summary</h2><div class='scroll'><table>{_rows_html(summary_rows(report))}</table></div>"
        f"{body}{warnings_html}"
        f"<h2>Provenance</h2><div class='scroll'><table>{_rows_html(provenance_rows(report))}</table></div>"
        f"<h2>Settings</h2><div class='scroll'><table>{_rows_html(_settings_rows(settings))}</table></div>"
        "<p>Every number, with the settings that produced it, is in "
        "<a href='report.json'>report.json</a>.</p></body></html>"
    )
