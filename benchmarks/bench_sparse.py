"""Sparse Hessians: hesse's detect-colour-evaluate pipeline against asdex (JAX) and dense.

Workloads (issue 16), each at n in {1e3, 1e4, 1e5, 1e6}: extended Rosenbrock, a 2-D
5-point-stencil (Bratu) energy, the 2-D Brusselator as a Hessian (half the squared
residual of its reaction-diffusion right-hand side, periodic grid), and the CUTEst
problems ARWHEAD and BDQRTIC (a dense row and column). ``--quick``: n = 1e3 and 1e4.
Colouring alone (:func:`coloring_rows`, ``--coloring`` runs only these): hesse's
colourings against asdex's on patterns built directly, bands, stencils, arrowheads,
BDQRTIC and the Brusselator.

Methods, all float64 on the CPU, default threads, timed side by side:

- ``hesse detection``: ``hesse.hessian_sparsity`` from scratch (caches cleared).
- ``hesse one-shot``: ``hesse.sparse_hessian(f)(x)`` from scratch: trace, propagate,
  colour (acyclic, NOTE [colouring choice]), compressed HVPs, substitution; at
  256 <= n <= 4096 the cost model may take ``n`` dense products instead (NOTE [one-shot
  cost model]; the ``colors`` column still shows the colouring's count).
- ``hesse reuse (pattern=)``: the prepared transform ``sparse_hessian(f, pattern=P)``
  after its first call (NOTE [prepared reuse]), as in an optimisation loop.
- ``hesse reuse compiled``: the same with ``compile=True`` (NOTE [compiled reuse]),
  timed after its first call; the compilation time is in ``note``. Not in ``--quick``.
- ``torch.func.hessian (dense)`` for n <= 3,000.
- ``asdex detection`` (``asdex.hessian_sparsity``), ``asdex one-shot``
  (``asdex.hessian``, detection + colouring + evaluation, not jitted) and
  ``asdex jit (coloring reused)`` (``jax.jit(asdex.hessian_from_coloring)``, timed after
  compilation). Rows read "not installed" without ``jax``/``asdex``. asdex's set-up
  (colouring, jit compilation) and every first run are bounded by ``ASDEX_LIMIT_S``
  seconds (``SIGALRM``); a cell past it or crashing reads as an error with the reason.

Sparse Jacobians (:func:`run_jacobians`, n = 1e3 and 1e4): the Brusselator residual and
an arrowhead residual (dense first row and column), ``hesse.sparse_jacobian`` one-shot
and with ``pattern=`` (``coloring="auto"``: column, row or bidirectional, whichever needs
the fewest products; the note lists each one's products) against ``asdex.jacobian``
(column or row colouring) one-shot and jitted, and ``torch.func.jacrev``.

Columns: ``colors`` = HVPs per Hessian (hesse: the colouring its one-shot used; asdex:
its colouring), ``max_abs_err`` of hesse against the dense Hessian where one exists,
else against asdex's; peak memory as in NOTE [peak memory] (benchmarks/_measure.py).
"""

from __future__ import annotations

import contextlib
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

try:  # as a package (benchmarks.run) or as a script folder on sys.path
    from benchmarks._measure import measure, prepare_process
except ImportError:  # pragma: no cover
    from _measure import measure, prepare_process  # type: ignore[no-redef]

import hesse
import hesse.sparsity._sparse as _sparse
from hesse.sparsity._prepared import CompileFallbackWarning

DETECT = "hesse detection"
ONE_SHOT = "hesse one-shot"
REUSE = "hesse reuse (pattern=)"
COMPILED = "hesse reuse compiled"
DENSE = "torch.func.hessian (dense)"
ASDEX_DETECT = "asdex detection"
ASDEX_ONE_SHOT = "asdex one-shot"
ASDEX_JIT = "asdex jit (coloring reused)"
DENSE_LIMIT = 3000
ASDEX_LIMIT_S = 120


# -- workloads, written once for torch and JAX (xp: the array module) -----------------------
def _roll(xp, a, shift, axis):
    return torch.roll(a, shift, axis) if xp is torch else xp.roll(a, shift, axis)


def rosenbrock(x, xp=torch):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def stencil5(u, xp=torch):
    m = int(round(u.shape[0] ** 0.5))
    g = u.reshape(m, m)
    dx = g[1:, :] - g[:-1, :]
    dy = g[:, 1:] - g[:, :-1]
    return 0.5 * (dx**2).sum() + 0.5 * (dy**2).sum() - 0.1 * xp.exp(g).sum()


def brusselator_residual(w, xp=torch):
    """The 2-D Brusselator's right-hand side on a periodic grid:
    ``F_u = 1 + u^2 v - 4.4 u + a lap(u)``, ``F_v = 3.4 u - u^2 v + a lap(v)``."""
    m = int(round((w.shape[0] // 2) ** 0.5))
    u, v = w[: m * m].reshape(m, m), w[m * m :].reshape(m, m)
    a = 10.0 * (m - 1) ** 2 / 1e4

    def lap(z):
        return (
            _roll(xp, z, 1, 0) + _roll(xp, z, -1, 0) + _roll(xp, z, 1, 1) + _roll(xp, z, -1, 1)
        ) - 4 * z

    fu = 1 + u * u * v - 4.4 * u + a * lap(u)
    fv = 3.4 * u - u * u * v + a * lap(v)
    return _cat(xp, [fu.reshape(-1), fv.reshape(-1)])


def brusselator(w, xp=torch):
    """``0.5 |F(u, v)|^2`` of :func:`brusselator_residual`."""
    return 0.5 * (brusselator_residual(w, xp) ** 2).sum()


def arrow_residual(x, xp=torch):
    """``f_0 = sum x^2``, ``f_i = x_0 x_i + x_i^3``: an arrowhead Jacobian (dense first row
    and column, diagonal)."""
    return _cat(xp, [(x**2).sum()[None], x[0] * x[1:] + x[1:] ** 3])


def _cat(xp, parts):
    return torch.cat(parts) if xp is torch else xp.concatenate(parts)


def arwhead(x, xp=torch):
    return (-4 * x[:-1] + 3).sum() + ((x[:-1] ** 2 + x[-1] ** 2) ** 2).sum()


def bdqrtic(x, xp=torch):
    m = x.shape[0] - 4
    q = x[:m] ** 2 + 2 * x[1 : m + 1] ** 2 + 3 * x[2 : m + 2] ** 2 + 4 * x[3 : m + 3] ** 2
    return ((-4 * x[:m] + 3) ** 2).sum() + ((q + 5 * x[-1] ** 2) ** 2).sum()


PROBLEMS = {
    "rosenbrock": (rosenbrock, lambda n: n),
    "stencil-5": (stencil5, lambda n: int(round(n**0.5)) ** 2),
    "brusselator": (brusselator, lambda n: 2 * int(round((n / 2) ** 0.5)) ** 2),
    "arwhead": (arwhead, lambda n: n),
    "bdqrtic": (bdqrtic, lambda n: n),
}


def workloads(quick: bool) -> dict[str, dict[str, Any]]:
    sizes = (1_000, 10_000) if quick else (1_000, 10_000, 100_000, 1_000_000)
    out = {}
    for size in sizes:
        for name, (f, fit) in PROBLEMS.items():
            out[f"{name} (n={size:.0e})"] = {"f": f, "n": fit(size)}
    return out


# -- methods ----------------------------------------------------------------------------------
def _fresh(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with hesse's colouring and pattern caches emptied: a true one-shot."""

    def call():
        _sparse._CACHE.clear()
        _sparse._PATTERNS.clear()
        return fn()

    return call


def _hesse_calls(f, x, compiled: bool) -> tuple[dict[str, Callable[[], Any]], int, str]:
    pattern = hesse.hessian_sparsity(f)(x)
    reused = hesse.sparse_hessian(f, pattern=pattern)
    reused(x)  # prepares the plan, as an optimisation loop's first step would
    n = x.numel()
    P = _sparse.symmetric(_sparse._from_torch("bench", pattern, (n, n)))
    k = _sparse._plan(_sparse._kind("auto", P), P).coloring.num_colors  # cached above
    calls = {
        DETECT: _fresh(lambda: hesse.hessian_sparsity(f)(x)),
        ONE_SHOT: _fresh(lambda: hesse.sparse_hessian(f)(x)),
        REUSE: lambda: reused(x),
    }
    note = ""
    if compiled:
        fast = hesse.sparse_hessian(f, pattern=pattern, compile=True)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CompileFallbackWarning)
            fast(x)  # compiles (NOTE [compiled reuse])
        note = f"compile {time.perf_counter() - start:.1f} s"
        fell = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
        if fell:
            note = f"eager fallback: {str(fell[0].message)[:160]}"
        calls[COMPILED] = lambda: fast(x)
    return calls, k, note


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in Python code running past ``seconds`` (main thread, Unix)."""

    def stop(signum, frame):
        raise TimeoutError(f"took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _limited(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call():
        with _time_limit(ASDEX_LIMIT_S):
            return fn()

    return call


def _asdex_calls(f, x: np.ndarray) -> tuple[dict[str, Callable], int | None, str]:
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import asdex
        import jax.numpy as jnp
    except ImportError:
        return {}, None, "not installed"
    fj = lambda v: f(v, jnp)  # noqa: E731
    xj = jnp.asarray(x)
    calls = {
        ASDEX_DETECT: _limited(lambda: asdex.hessian_sparsity(fj, xj)),
        ASDEX_ONE_SHOT: _limited(lambda: _ready(asdex.hessian(fj, xj)(xj))),
    }
    try:
        with _time_limit(ASDEX_LIMIT_S):
            coloring = asdex.hessian_coloring(fj, xj)
            jitted = jax.jit(asdex.hessian_from_coloring(fj, coloring))
            jitted(xj).data.block_until_ready()  # compile outside the timing
    except (Exception, MemoryError) as err:  # noqa: BLE001 - reported as the jit cell's note
        return calls, None, f"asdex jit set-up: {type(err).__name__}: {str(err)[:100]}"
    colors = next(
        (int(getattr(coloring, a)) for a in ("num_colors", "n_colors") if hasattr(coloring, a)),
        None,
    )
    calls[ASDEX_JIT] = _limited(lambda: jitted(xj).data.block_until_ready())
    return calls, colors, ""


def _ready(H: Any) -> Any:
    """A JAX sparse result once its values are computed (JAX runs asynchronously)."""
    H.data.block_until_ready()
    return H


def _dense_of(result: Any) -> torch.Tensor | None:
    if isinstance(result, torch.Tensor):
        return result.to_dense() if result.layout == torch.sparse_csr else result
    data = getattr(result, "todense", None)
    if callable(data):  # a JAX BCOO matrix
        return torch.from_numpy(np.asarray(data()))
    return None


# -- sparse Jacobians ---------------------------------------------------------------------------
JAC_ONE_SHOT = "hesse sparse_jacobian one-shot"
JAC_REUSE = "hesse sparse_jacobian reuse (pattern=)"
JAC_DENSE = "torch.func.jacrev (dense)"
ASDEX_JAC_ONE_SHOT = "asdex jacobian one-shot"
ASDEX_JAC_JIT = "asdex jacobian jit (coloring reused)"

JACOBIANS = {
    "brusselator residual": (brusselator_residual, lambda n: 2 * int(round((n / 2) ** 0.5)) ** 2),
    "arrowhead residual": (arrow_residual, lambda n: n),
}


def _jacobian_colors(P) -> dict[str, int]:
    """Products of each colouring of ``P`` (column, row, bidirectional)."""
    kinds = ("column", "row", "bidirectional")
    return {k: _sparse._jacobian_plan(k, P).bicoloring.products for k in kinds}


def _asdex_jacobian_calls(f, x: np.ndarray) -> tuple[dict[str, Callable], int | None]:
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import asdex
        import jax.numpy as jnp
    except ImportError:
        return {}, None
    import warnings

    fj = lambda v: f(v, jnp)  # noqa: E731
    xj = jnp.asarray(x)
    with warnings.catch_warnings():  # an arrowhead: "no speedup over dense", as expected
        warnings.simplefilter("ignore", asdex.DenseColoringWarning)
        coloring = asdex.jacobian_coloring(fj, xj)  # fewer of column / row colours
    jitted = jax.jit(asdex.jacobian_from_coloring(fj, coloring))
    jitted(xj).data.block_until_ready()  # compile outside the timing
    calls = {
        ASDEX_JAC_ONE_SHOT: lambda: _ready(asdex.jacobian(fj, xj)(xj)),
        ASDEX_JAC_JIT: lambda: jitted(xj).data.block_until_ready(),
    }
    return calls, int(coloring.num_colors)


def _row(workload: str, method: str, st: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """One table row: a method's measured time, CPU time and peak memory, plus ``fields``."""
    return {
        "workload": workload,
        "method": method,
        "time_s": st["time_s"],
        "cpu_s": st["cpu_s"],
        "peak_mem_bytes": st["peak_mem_bytes"],
        **fields,
    }


def run_jacobians(quick: bool, only: str | None = None) -> list[dict[str, Any]]:
    """Sparse Jacobians (issue 16): hesse's column / row / bidirectional colouring
    (``coloring="auto"``) against asdex's (column or row) and dense ``jacrev``, at
    n = 1e3 and 1e4. ``colors``: products of the run's method; ``note``: each colouring's
    products and auto's choice."""
    rows: list[dict[str, Any]] = []
    for size in (1_000, 10_000):
        for name, (f, fit) in JACOBIANS.items():
            wname = f"jacobian: {name} (n={size:.0e})"
            if only is not None and only not in wname:
                continue
            n = fit(size)
            x = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            pattern = hesse.jacobian_sparsity(f)(x)
            reused = hesse.sparse_jacobian(f, pattern=pattern)
            reused(x)  # colours, plans and checks the pattern once
            P = _sparse._from_torch("bench", pattern, tuple(pattern.shape))
            P.sort_indices()
            counts = _jacobian_colors(P)
            auto = _sparse._jacobian_kind("auto", P)
            calls: dict[str, Callable[[], Any]] = {
                JAC_ONE_SHOT: _fresh(lambda f=f, x=x: hesse.sparse_jacobian(f)(x)),
                JAC_REUSE: lambda reused=reused, x=x: reused(x),
            }
            if n <= DENSE_LIMIT:
                calls[JAC_DENSE] = lambda f=f, x=x: torch.func.jacrev(f)(x)
            asdex_calls, asdex_colors = _asdex_jacobian_calls(f, x.numpy())
            calls.update(asdex_calls)
            keep = {JAC_ONE_SHOT, JAC_DENSE, ASDEX_JAC_ONE_SHOT}

            def summarize(name: str, result: Any, keep=keep) -> dict:
                return {"_dense": _dense_of(result) if name in keep else None}

            stats = measure(calls, repeats=3, max_seconds=20.0, summarize=summarize)
            ref = (stats.get(JAC_DENSE) or stats.get(ASDEX_JAC_ONE_SHOT) or {}).get("_dense")
            mine = stats[JAC_ONE_SHOT].get("_dense")
            err = None if ref is None or mine is None else (mine - ref).abs().max().item()
            note = ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; auto: {auto}"
            for method, st in stats.items():
                st.pop("_dense", None)
                colors = counts[auto] if method.startswith("hesse") else None
                rows.append(
                    _row(
                        wname,
                        method,
                        st,
                        colors=colors
                        if colors is not None
                        else asdex_colors
                        if "asdex" in method
                        else n,
                        max_abs_err=err if method == JAC_ONE_SHOT else None,
                        note=note if method == JAC_ONE_SHOT else "",
                        reference=method == JAC_ONE_SHOT,
                    )
                )
    return rows


def run(quick: bool, only: str | None = None) -> list[dict[str, Any]]:
    """All (workload, method) rows; see the module docstring."""
    prepare_process(threads=None)
    rows: list[dict[str, Any]] = run_jacobians(quick, only)
    for wname, spec in workloads(quick).items():
        if only is not None and only not in wname:
            continue
        f, n = spec["f"], spec["n"]
        x = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x = 0.5 + x
        try:
            calls, colors, compile_note = _hesse_calls(f, x, compiled=not quick)
        except (Exception, MemoryError) as err:  # noqa: BLE001 - reported as a row
            calls, colors, compile_note = {}, None, ""
            rows.append(
                {
                    "workload": wname,
                    "method": "hesse",
                    "time_s": None,
                    "peak_mem_bytes": None,
                    "note": f"set-up: {type(err).__name__}: {err}"[:200],
                }
            )
        if n <= DENSE_LIMIT:
            calls[DENSE] = lambda f=f, x=x: torch.func.hessian(f)(x)
        asdex_calls, asdex_colors, note = _asdex_calls(f, x.numpy())
        calls.update(asdex_calls)
        keep = {ONE_SHOT, DENSE, ASDEX_ONE_SHOT}

        def summarize(name: str, result: Any, keep=keep, n=n) -> dict:
            return {"_dense": _dense_of(result) if name in keep and n <= 20_000 else None}

        stats = measure(
            calls,
            repeats=3 if quick else 5,
            max_seconds=20.0 if quick else 60.0,
            summarize=summarize,
            tolerate_errors=True,
        )
        ref = (stats.get(DENSE) or stats.get(ASDEX_ONE_SHOT) or {}).get("_dense")
        mine = stats.get(ONE_SHOT, {}).get("_dense")  # None if the one-shot failed
        err = None if ref is None or mine is None else (mine - ref).abs().max().item()
        for name, st in stats.items():
            hesse_row = name.startswith("hesse")
            rows.append(
                _row(
                    wname,
                    name,
                    st,
                    colors=colors if hesse_row else asdex_colors if "asdex" in name else n,
                    max_abs_err=err if name == ONE_SHOT else None,
                    note=st.get("error") or (compile_note if name == COMPILED else ""),
                    reference=name == ONE_SHOT,
                )
            )
            st.pop("_dense", None)
        if note:
            rows.append(
                {
                    "workload": wname,
                    "method": "asdex",
                    "time_s": None,
                    "peak_mem_bytes": None,
                    "note": note,
                }
            )
    rows.extend(coloring_rows(quick, only=only))
    return rows


# -- colouring alone: hesse against asdex on the same patterns ---------------------------------
def _band(n: int, k: int):
    import scipy.sparse as sp

    A = sp.diags([np.ones(n - abs(d)) for d in range(-k, k + 1)], list(range(-k, k + 1)))
    return A.astype(bool)


def _stencil(n: int, nine: bool):
    import scipy.sparse as sp

    m = int(round(n**0.5))
    T, eye = _band(m, 1), sp.identity(m, dtype=bool)
    return sp.kron(T, T) if nine else sp.kron(eye, T) + sp.kron(T, eye)


def _arrow(n: int, hub: int):
    import scipy.sparse as sp

    A = sp.lil_matrix((n, n), dtype=bool)
    A.setdiag(True)
    A[hub, :] = True
    A[:, hub] = True
    return A


def _brusselator_pattern(n: int):
    """``J^T J`` for the Jacobian ``J`` of the Brusselator residual (as in
    :func:`brusselator`): each field's periodic 5-point Laplacian, ``u`` and ``v`` coupled
    at each grid point."""
    import scipy.sparse as sp

    m = int(round((n / 2) ** 0.5))
    ring = sp.diags([1, 1, 1, 1, 1], [-(m - 1), -1, 0, 1, m - 1], shape=(m, m))
    eye = sp.identity(m)
    L = (sp.kron(eye, ring) + sp.kron(ring, eye)).astype(bool).astype(float)
    Id = sp.identity(m * m)
    J = sp.bmat([[L, Id], [Id, L]]).tocsr()
    return (J.T @ J) != 0


COLORING_PATTERNS: dict[str, Callable[[int], Any]] = {
    **{f"band rho={2 * k}": (lambda n, k=k: _band(n, k)) for k in range(1, 6)},
    "stencil-5": lambda n: _stencil(n, nine=False),
    "stencil-9": lambda n: _stencil(n, nine=True),
    "arrowhead": lambda n: _arrow(n, 0),
    "arwhead": lambda n: _arrow(n, n - 1),
    "bdqrtic": lambda n: _band(n, 3) + _arrow(n, n - 1),
    "brusselator": _brusselator_pattern,
}

#: asdex's star colouring costs about ``(max row nnz)^2`` on a dense row (40 s for an
#: arrowhead at n = 1e5): beyond this many, its row reads "skipped".
ASDEX_DENSE_ROW_WORK = 2e9


def coloring_rows(quick: bool, only: str | None = None) -> list[dict[str, Any]]:
    """Colouring time and colours alone, on patterns built directly (no tracing): hesse's
    acyclic and star colourings, the colouring and recovery plan its one-shot computes
    (``coloring="auto"``), and asdex's star colouring (``hessian_coloring_from_sparsity``,
    LargestFirst order, with its star set for decompression), at n in {1e3, 1e4} (quick)
    or {1e3, 1e4, 1e5, 1e6}. Every compiled kernel is warmed up first."""
    import scipy.sparse as sp

    import hesse.sparsity._coloring as C

    try:
        from asdex import SparsityPattern, hessian_coloring_from_sparsity
    except ImportError:
        hessian_coloring_from_sparsity = None
    warm = sp.csr_matrix(_band(20_000, 3) + _arrow(20_000, 0))
    for fn in (C.acyclic_coloring, C.star_coloring, C.diagonal_coloring):
        fn(warm)
    if hessian_coloring_from_sparsity is not None:
        hessian_coloring_from_sparsity(SparsityPattern.from_coo(*warm.nonzero(), warm.shape))

    def auto(P):
        _sparse._CACHE.clear()
        return _sparse._plan(_sparse._kind("auto", P), P).coloring

    rows: list[dict[str, Any]] = []
    sizes = (1_000, 10_000) if quick else (1_000, 10_000, 100_000, 1_000_000)
    for size in sizes:
        for name, make in COLORING_PATTERNS.items():
            wname = f"colouring {name} (n={size:.0e})"
            if only is not None and only not in wname:
                continue
            P = sp.csr_matrix(make(size), dtype=bool)
            P.sort_indices()
            calls = {
                "hesse acyclic colouring": lambda P=P: C.acyclic_coloring(P),
                "hesse star colouring": lambda P=P: C.star_coloring(P),
                "hesse colouring + plan (auto)": lambda P=P: auto(P),
            }
            note = ""
            if hessian_coloring_from_sparsity is None:
                note = "asdex not installed"
            elif float(np.diff(P.indptr).max()) ** 2 > ASDEX_DENSE_ROW_WORK:
                note = "asdex skipped: quadratic in the dense row"
            else:
                pattern = SparsityPattern.from_coo(*P.nonzero(), P.shape)
                calls["asdex star colouring"] = lambda p=pattern: hessian_coloring_from_sparsity(p)
            stats = measure(
                calls,
                repeats=3 if quick else 5,
                max_seconds=20.0 if quick else 60.0,
                summarize=lambda _, got: {"colors": int(got.num_colors)},
            )
            for method, st in stats.items():
                rows.append(
                    _row(
                        wname,
                        method,
                        st,
                        colors=st["colors"],
                        note="",
                        reference=method == "hesse acyclic colouring",
                    )
                )
            if note:
                rows.append({"workload": wname, "method": "asdex", "time_s": None, "note": note})
    return rows


if __name__ == "__main__":  # pragma: no cover - one suite alone, rows as JSON lines
    import json
    import sys

    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), None)
    suite = coloring_rows if "--coloring" in sys.argv else run
    for r in suite("--quick" in sys.argv, only=only):
        print(json.dumps(r, default=str), flush=True)
