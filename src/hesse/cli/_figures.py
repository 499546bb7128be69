r"""The figures of ``hesse analyze``, sized for a printed page.

# NOTE [report figures]
Each figure is drawn once with matplotlib's Agg backend (no display needed) and
saved three ways: PNG at :data:`DPI` dots per inch for the HTML page and slides,
SVG (vector, editable text) for papers, and one page of ``figures.pdf`` (vector,
TrueType fonts embedded, one page per figure in the report's order: LaTeX takes
``\includegraphics[page=N]{figures.pdf}``). One PDF for all figures embeds the
fonts once; a PDF per figure would subset them five times, the slowest step. Figures are
:data:`WIDTH` inches wide, a page's text width, with 8-point text, so they can
be placed at 100 % without scaling the lettering. Legends sit to the right of
the axes, never over the data. No titles are drawn in the figures: the caption
belongs to the document they are placed in (the HTML page has one for each).
Vector files carry no creation date, so the same run gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: print resolution of the PNG files (dots per inch).
DPI = 300
#: figure size in inches (width: a page's text width).
WIDTH, HEIGHT = 6.5, 2.9
#: the per-layer chart grows with the number of layers up to this height (inches).
MAX_HEIGHT = 9.0
#: the scatter colours points by module type instead of by layer beyond this many layers.
MAX_LAYER_COLOURS = 8
#: diagonals with more points than this are rasterised inside the vector files.
MAX_VECTOR_POINTS = 5_000
#: digits as subscripts (plain Unicode text: mathtext would embed extra fonts in the PDF).
SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
#: file formats written for every figure (the PDF pages go into :data:`PDF`).
FORMATS = ("png", "svg")
#: the multi-page PDF of all figures.
PDF = "figures.pdf"

STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.fonttype": "none",
    "pdf.fonttype": 42,
}


def figures() -> dict[str, tuple[str, Callable[[Any, dict[str, Any]], None]]]:
    """File stem -> (caption title, drawing function): figure N of the page is page N of the PDF."""
    return {
        "eigenvalue_convergence": ("Top Hessian eigenvalues vs. products spent", _convergence),
        "spectral_density": ("Spectral density of the Hessian", _density),
        "diagonal_scatter": ("Exact GGN diagonal vs. estimated Hessian diagonal", _scatter),
        "diagonal_histogram": ("Distribution of the diagonal entries", _histogram),
        "layers": ("Per-layer curvature", _layers),
    }


def write(report: dict[str, Any], out: Path) -> list[Path]:
    """Draw every figure, save it as PNG and SVG and as a page of figures.pdf; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    paths = [out / PDF]
    with matplotlib.rc_context(STYLE), PdfPages(paths[0], metadata={"CreationDate": None}) as pdf:
        for stem, (_, draw) in figures().items():
            fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
            draw(ax, report)
            _place_axes(fig, ax)
            for fmt in FORMATS:
                path = out / f"{stem}.{fmt}"
                metadata = {"svg": {"Date": None}}.get(fmt)
                fig.savefig(path, format=fmt, dpi=DPI, metadata=metadata)
                paths.append(path)
            pdf.savefig(fig)
            plt.close(fig)
    return paths


def _place_axes(fig: Any, ax: Any) -> None:
    """Fixed margins for the labels; the right one sized to the legend, the left one to
    the tick labels of an axis without a title (the per-layer chart's layer names).

    A layout engine (constrained or tight layout) would lay the text out again on
    every save; measuring the legend and labels once keeps writing the files cheap.
    """
    width, height = fig.get_size_inches()
    renderer = fig.canvas.get_renderer()
    left, bottom, top, gap = 0.8, 0.5, 0.1, 0.15  # inches
    if not ax.get_ylabel():
        labels = [t.get_window_extent(renderer).width for t in ax.get_yticklabels()]
        left = max(labels or [0.0]) / fig.dpi + gap
    legend = ax.get_legend()
    right = 0.15
    if legend is not None:
        right = legend.get_window_extent(renderer).width / fig.dpi + gap + 0.1
    left, right = min(left, width / 2.5), min(right, width / 2.5)
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height
    )


def _legend_outside(ax: Any, **kw: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kw)


def _symlog(ax: Any, axis: str, values: list[float], most: int = 8) -> float:
    """A symmetric log scale on ``axis``, linear within 1e-4 of the largest magnitude.

    Ticks at 0 and at powers of ten beyond the linear region, thinned to at most
    ``most`` (the default locator crowds labels around 0). Returns the linear threshold.
    """
    top = max([abs(v) for v in values] or [1.0]) or 1.0
    lin = max(top * 1e-4, 1e-300)
    getattr(ax, f"set_{axis}scale")("symlog", linthresh=lin)
    low, high = min([*values, 0.0]), max([*values, 0.0])
    first = math.floor(math.log10(lin)) + 1
    pos = [10.0**e for e in range(first, math.floor(math.log10(max(high, lin))) + 2)]
    neg = [-(10.0**e) for e in range(first, math.floor(math.log10(max(-low, lin))) + 2)]
    pos = pos[: next((i + 1 for i, t in enumerate(pos) if t >= high), len(pos))]
    neg = neg[: next((i + 1 for i, t in enumerate(neg) if t <= low), len(neg))] if low < 0 else []
    ticks = sorted([*neg, 0.0, *pos])
    while len(ticks) > most:  # every other decade, counted from 0
        zero = ticks.index(0.0)
        ticks = [t for i, t in enumerate(ticks) if (i - zero) % 2 == 0]
    getattr(ax, f"set_{axis}ticks")(ticks)
    return lin


def _message(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


# -- the figures ---------------------------------------------------------------------
def _convergence(ax: Any, report: dict[str, Any]) -> None:
    history = report["hessian_eigenvalues"].get("history") or []
    if not history:
        _message(ax, "one parameter: no iteration to show")
        return
    k = len(history[-1]["eigenvalues"])
    for i in range(k):
        xs = [p["num_matvecs"] for p in history if len(p["eigenvalues"]) > i]
        ys = [p["eigenvalues"][i] for p in history if len(p["eigenvalues"]) > i]
        ax.plot(
            xs,
            ys,
            marker="o",
            markersize=3,
            linewidth=1,
            label="λ" + str(i + 1).translate(SUBSCRIPT),
        )
    ax.set_xlabel("Hessian-vector products (Lanczos stopped at that budget)")
    ax.set_ylabel("eigenvalue estimate")
    _legend_outside(ax)


def _density(ax: Any, report: dict[str, Any]) -> None:
    """Linear eigenvalue axis, log density (as in Ghorbani et al., 2019); NOTE [density support]."""
    from matplotlib.transforms import blended_transform_factory

    sd = report["spectral_density"]
    grid, density = sd["grid"], sd["density"]
    ax.plot(grid, density, color="C0", linewidth=1, label=f"SLQ density, σ = {sd['sigma']:.2g}")
    ax.fill_between(grid, density, alpha=0.2, color="C0", linewidth=0)
    positive = [d for d in density if d > 0]
    if positive:
        ax.set_yscale("log")
        ax.set_ylim(max(min(positive), max(positive) * 1e-7), max(positive) * 3)
    # Ritz values as a rug along the bottom edge (x in data, y in axes coordinates).
    rug = blended_transform_factory(ax.transData, ax.transAxes)
    ax.plot(
        sd["nodes"],
        [0.02] * len(sd["nodes"]),
        linestyle="none",
        marker="|",
        markersize=8,
        color="0.25",
        alpha=0.6,
        transform=rug,
        clip_on=False,
        label=f"Ritz values ({sd['num_probes']} probes × {sd['lanczos_steps']} steps)",
    )
    tops = report["hessian_eigenvalues"]["eigenvalues"]
    for i, value in enumerate(tops):
        ax.axvline(
            value,
            color="C3",
            linestyle="--",
            linewidth=0.8,
            label=f"top {len(tops)} eigenvalues (Lanczos)" if i == 0 else None,
        )
    ax.set_xlim(sd["support"][0], sd["support"][1])
    ax.margins(x=0.01)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (integrates to 1)")
    _legend_outside(ax)


def _layers(ax: Any, report: dict[str, Any]) -> None:
    """Horizontal bars, one pair per layer (the names stay readable for deep models)."""
    layers = report["layers"]
    ax.figure.set_size_inches(WIDTH, min(max(HEIGHT, 0.9 + 0.3 * len(layers)), MAX_HEIGHT))
    names = [f"{lay['layer']} ({lay['type']}, {lay['num_parameters']:,})" for lay in layers]
    y = list(range(len(layers)))
    traces = [lay["trace"]["value"] for lay in layers]
    below = [lay["trace"]["value"] - lay["trace"]["ci95"][0] for lay in layers]
    above = [lay["trace"]["ci95"][1] - lay["trace"]["value"] for lay in layers]
    tops = [lay["top_eigenvalue"] for lay in layers]
    height = 0.38
    ax.barh(
        [i - height / 2 for i in y],
        traces,
        height,
        xerr=[below, above],
        capsize=2,
        error_kw={"linewidth": 0.8},
        label="trace (95 % CI)",
    )
    ax.barh([i + height / 2 for i in y], tops, height, label="top eigenvalue")
    ax.set_yticks(y, names)
    ax.set_ylim(len(layers) - 0.5, -0.5)  # first layer on top
    _symlog(ax, "x", [*traces, *tops, *(t + a for t, a in zip(traces, above))])
    ax.axvline(0.0, color="0.5", linewidth=0.5)
    ax.set_xlabel("curvature of the layer's block of the Hessian (symmetric log scale)")
    _legend_outside(ax)


def _layer_slices(report: dict[str, Any]) -> list[tuple[str, int, int]]:
    """``(label, start, stop)`` of each layer in the flat parameter vector.

    The label is the layer (``0 (Linear)``), or its module type when there are more
    than :data:`MAX_LAYER_COLOURS` layers (a legend of 50 colours says nothing).
    """
    sizes = {name: math.prod(shape) for name, shape in report["model"]["parameters"].items()}
    offsets, start = {}, 0
    for name, size in sizes.items():
        offsets[name] = (start, start + size)
        start += size
    out = []
    by_type = len(report["layers"]) > MAX_LAYER_COLOURS
    for lay in report["layers"]:
        label = f"{lay['type']} layers" if by_type else f"{lay['layer']} ({lay['type']})"
        for name in lay["parameters"]:
            a, b = offsets[name]
            out.append((label, a, b))
    return out


def _scatter(ax: Any, report: dict[str, Any]) -> None:
    diag = report["diagonal"]
    ggn, hess = diag["ggn_exact"].get("values"), diag["hessian_hutchinson"].get("values")
    if not ggn or not hess:
        reason = diag["ggn_exact"].get("reason") or "diagonal too long to list"
        _message(ax, f"no scatter: {reason}")
        return
    raster = len(ggn) > MAX_VECTOR_POINTS
    colours: dict[str, str] = {}  # one colour per layer, in the layers' order
    for label, a, b in _layer_slices(report):
        first = label not in colours
        colour = colours.setdefault(label, f"C{len(colours) % 10}")
        ax.scatter(
            ggn[a:b],
            hess[a:b],
            s=3,
            alpha=0.5,
            linewidths=0,
            color=colour,
            label=label if first else None,
            rasterized=raster,
        )
    ends = [min(ggn), max(*ggn, *hess)]  # y = x over the GGN's range (it is never negative)
    ax.plot(ends, ends, color="0.3", linewidth=0.8, linestyle="--", label="y = x")
    _symlog(ax, "x", [*ggn, ends[1]])
    _symlog(ax, "y", [*ggn, *hess])
    ax.set_xlabel("GGN diagonal entry (exact; symmetric log scale)")
    ax.set_ylabel(
        f"Hessian diagonal entry\n(Hutchinson, {diag['hessian_hutchinson']['num_matvecs']} products)"
    )
    _legend_outside(ax, markerscale=3)


def _histogram(ax: Any, report: dict[str, Any]) -> None:
    diag = report["diagonal"]
    series = []
    if diag["ggn_exact"].get("values"):
        series.append(("GGN (exact)", diag["ggn_exact"]["values"]))
    if diag["hessian_hutchinson"].get("values"):
        series.append(("Hessian (Hutchinson)", diag["hessian_hutchinson"]["values"]))
    if not series:
        _message(ax, "diagonal too long to list")
        return
    everything = [v for _, vals in series for v in vals]
    lin = _symlog(ax, "x", everything)
    edges = _symlog_edges(min(everything), max(everything), lin)
    for label, vals in series:
        ax.hist(vals, bins=edges, alpha=0.55, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("diagonal entry (symmetric log scale)")
    ax.set_ylabel("number of parameters")
    _legend_outside(ax)


def _symlog_edges(low: float, high: float, lin: float, bins: int = 60) -> list[float]:
    """Bin edges evenly spaced in ``asinh(x / lin)``, the scale of a symlog axis."""
    a, b = math.asinh(low / lin), math.asinh(high / lin)
    if b <= a:
        b = a + 1.0
    return [lin * math.sinh(a + (b - a) * i / bins) for i in range(bins + 1)]
