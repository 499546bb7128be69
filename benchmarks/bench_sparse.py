"""Sparse Hessians: hesse's detect-colour-evaluate pipeline against dense and JAX peers.

Workloads (issue 3): extended Rosenbrock (n = 1e3 .. 1e6), ``sum(sin(x))`` at n = 1e6,
Broyden tridiagonal, a 2-D 5-point-stencil (Bratu) energy on a 256 x 256 grid, and
the per-sample input Hessians of a tanh MLP (B = 512 samples, D = 32 inputs).
``--quick`` shrinks every size.

Methods, all float64 on the CPU:

- ``hesse.sparse_hessian (one-shot)``: trace + propagate + colour + compressed HVPs +
  decompression, from scratch every call (the colouring cache is cleared).
- ``hesse.sparse_hessian (pattern reused)``: the pattern passed with ``pattern=``, as
  in an optimisation loop (its colouring is cached after the first call).
- ``torch.func.hessian (dense)`` where the dense matrix fits (small n), and
  ``vmap(torch.func.hessian)`` for the per-sample blocks.
- ``asdex.hessian (one-shot)`` (JAX, x64): detection + colouring + evaluation in one
  un-jitted call, and ``asdex (jit, coloring reused)``: ``jax.jit`` of
  ``hessian_from_coloring`` with a precomputed colouring, timed after compilation.
  asdex rows read "not installed" when ``jax``/``asdex`` cannot be imported
  (``pip install -c constraints.txt jax asdex``), and "skipped in --quick" in the
  quick run (JAX's compilation alone would take most of a minute).

Columns: ``colors`` = HVPs spent (star colours; for the per-sample dense baseline the
number of HVPs it spends), ``max_abs_err`` against the dense Hessian where one exists
(else against hesse's one-shot result), peak memory as in NOTE [peak memory]
(benchmarks/_measure.py: growth of this process's RSS high-water mark during the
first call, so JAX's and torch's allocations are measured the same way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

try:  # as a package (benchmarks.run) or as a script folder on sys.path
    from benchmarks._measure import measure, prepare_process
except ImportError:  # pragma: no cover
    from _measure import measure, prepare_process  # type: ignore[no-redef]

import hesse
import hesse.sparsity._sparse as _sparse
from hesse.sparsity._coloring import star_coloring

HESSE_ONE_SHOT = "hesse.sparse_hessian (one-shot)"
HESSE_REUSED = "hesse.sparse_hessian (pattern reused)"
DENSE = "torch.func.hessian (dense)"
VMAP_DENSE = "vmap(torch.func.hessian) per sample"
ASDEX_ONE_SHOT = "asdex.hessian (one-shot)"
ASDEX_JIT = "asdex (jit, coloring reused)"
DENSE_LIMIT = 3000  # largest n for the dense baseline


# -- workloads, written once for torch and once for JAX ------------------------------------
def rosenbrock(x, xp=torch):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def sum_sin(x, xp=torch):
    return xp.sin(x).sum()


def broyden(x, xp=torch):
    zero = xp.zeros(1, dtype=x.dtype)
    z = xp.concatenate([zero, x, zero]) if xp is not torch else torch.cat([zero, x, zero])
    r = (3 - 2 * x) * x - z[:-2] - 2 * z[2:] + 1
    return (r**2).sum()


def bratu(u, xp=torch):
    m = int(round(u.shape[0] ** 0.5))
    g = u.reshape(m, m)
    dx = g[1:, :] - g[:-1, :]
    dy = g[:, 1:] - g[:, :-1]
    return 0.5 * (dx**2).sum() + 0.5 * (dy**2).sum() - 0.1 * xp.exp(g).sum()


def _mlp_weights(D: int, H: int = 64, C: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((D, H)) / np.sqrt(D),
        rng.standard_normal(H) * 0.1,
        rng.standard_normal((H, C)) / np.sqrt(H),
    )


def per_sample_mlp(B: int, D: int):
    """``f(X) = sum_b CE(mlp(X[b]), y_b)``: the Hessian is block diagonal, B blocks of D x D."""
    W1, b1, W2 = _mlp_weights(D)
    y = np.random.default_rng(1).integers(0, W2.shape[1], B)
    tW1, tb1, tW2, ty = (torch.from_numpy(a) for a in (W1, b1, W2, y))

    def f(x):
        X = x.reshape(B, D)
        return F.cross_entropy(torch.tanh(X @ tW1 + tb1) @ tW2, ty, reduction="sum")

    def sample(x, label):  # one sample's loss, for vmap(torch.func.hessian)
        logits = torch.tanh(x @ tW1 + tb1) @ tW2
        return F.cross_entropy(logits[None], label[None], reduction="sum")

    def f_jax(x):
        import jax
        import jax.numpy as jnp

        X = x.reshape(B, D)
        logits = jnp.tanh(X @ W1 + b1) @ W2
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, jnp.asarray(y)[:, None], axis=1).sum()

    return f, sample, ty, f_jax


def workloads(quick: bool) -> dict[str, dict[str, Any]]:
    ros = (1_000,) if quick else (1_000, 10_000, 100_000, 1_000_000)
    out: dict[str, dict[str, Any]] = {}
    for n in ros:
        out[f"rosenbrock (n={n:.0e})"] = {"f": rosenbrock, "n": n}
    out[f"sum-sin (n={10_000 if quick else 1_000_000:.0e})"] = {
        "f": sum_sin,
        "n": 10_000 if quick else 1_000_000,
    }
    out[f"broyden-tridiagonal (n={1_000 if quick else 100_000:.0e})"] = {
        "f": broyden,
        "n": 1_000 if quick else 100_000,
    }
    m = 32 if quick else 256
    out[f"bratu-5-point ({m}x{m})"] = {"f": bratu, "n": m * m}
    B, D = (128, 32) if quick else (512, 32)
    f, sample, labels, f_jax = per_sample_mlp(B, D)
    out[f"per-sample-mlp (B={B}, D={D})"] = {
        "f": f,
        "n": B * D,
        "per_sample": (sample, labels, B, D),
        "jax": f_jax,
    }
    return out


# -- methods ----------------------------------------------------------------------------------
def _hesse_calls(f, x) -> dict[str, Callable[[], Any]]:
    def one_shot():
        saved = dict(_sparse._CACHE)  # a true one-shot: no colouring from an earlier call
        _sparse._CACHE.clear()
        try:
            return hesse.sparse_hessian(f)(x)
        finally:
            _sparse._CACHE.clear()
            _sparse._CACHE.update(saved)

    pattern = hesse.hessian_sparsity(f)(x)
    reused = hesse.sparse_hessian(f, pattern=pattern)
    reused(x)  # colours the pattern once (cached), as an optimisation loop would
    return {HESSE_ONE_SHOT: one_shot, HESSE_REUSED: lambda: reused(x)}


def _jax_fn(spec: dict[str, Any]):
    if "jax" in spec:
        return spec["jax"]
    import jax.numpy as jnp

    f = spec["f"]
    return lambda x: f(x, jnp)


def _asdex_calls(
    spec: dict[str, Any], x: np.ndarray
) -> tuple[dict[str, Callable], int | None, str]:
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import asdex
        import jax.numpy as jnp
    except ImportError:
        return {}, None, "not installed"
    fj = _jax_fn(spec)
    xj = jnp.asarray(x)
    coloring = asdex.hessian_coloring(fj, xj)
    colors = None
    for attr in ("num_colors", "n_colors", "ncolors"):
        if hasattr(coloring, attr):
            colors = int(getattr(coloring, attr))
            break
    jitted = jax.jit(asdex.hessian_from_coloring(fj, coloring))
    jitted(xj).data.block_until_ready()  # compile outside the timing

    def one_shot():
        return asdex.hessian(fj, xj)(xj).data.block_until_ready()

    def reused():
        return jitted(xj).data.block_until_ready()

    return {ASDEX_ONE_SHOT: one_shot, ASDEX_JIT: reused}, colors, ""


def _dense_calls(spec: dict[str, Any], x: torch.Tensor) -> dict[str, Callable]:
    if "per_sample" in spec:
        sample, labels, B, D = spec["per_sample"]
        X = x.reshape(B, D)
        per = torch.vmap(torch.func.hessian(sample))
        return {VMAP_DENSE: lambda: per(X, labels)}
    if spec["n"] <= DENSE_LIMIT:
        return {DENSE: lambda: torch.func.hessian(spec["f"])(x)}
    return {}


def _as_dense(result: Any, n: int, blocks: tuple[int, int] | None) -> torch.Tensor | None:
    """The result as a dense matrix, or as its ``(B, D, D)`` diagonal blocks (per-sample)."""
    if not isinstance(result, torch.Tensor):
        return None  # JAX rows are checked by asdex itself
    if blocks is not None:
        B, D = blocks
        if result.dim() == 3:
            return result
        coo = result.to_sparse_coo().coalesce()
        r, c = coo.indices()
        out = torch.zeros(B, D, D, dtype=result.dtype)
        inside = r // D == c // D
        assert bool((coo.values()[~inside] == 0).all()), "entries outside the blocks"
        out[r[inside] // D, r[inside] % D, c[inside] % D] = coo.values()[inside]
        return out
    if result.layout == torch.sparse_csr:
        return result.to_dense()
    return result.reshape(n, n)


def _colors(method: str, hesse_colors: int, asdex_colors: int | None, n: int) -> int | None:
    """HVPs spent: colours for the sparse methods, ``n`` for the dense ones."""
    if method.startswith("hesse"):
        return hesse_colors
    if method.startswith("asdex"):
        return asdex_colors
    return n


def run(quick: bool, only: str | None = None) -> list[dict[str, Any]]:
    """All (workload, method) rows; see the module docstring.

    ``only``: run just the workloads whose name contains this text.
    """
    prepare_process(threads=None)
    rows: list[dict[str, Any]] = []
    repeats = 3 if quick else 5
    for wname, spec in workloads(quick).items():
        if only is not None and only not in wname:
            continue
        n = spec["n"]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, generator=gen, dtype=torch.float64) * 0.5
        f = spec["f"]
        calls = _hesse_calls(f, x)
        calls.update(_dense_calls(spec, x))
        if quick:  # JAX compiles every one-shot call: most of a minute over the workloads
            asdex_calls, asdex_colors, asdex_note = {}, None, "skipped in --quick"
        else:
            asdex_calls, asdex_colors, asdex_note = _asdex_calls(spec, x.numpy())
        calls.update(asdex_calls)
        colors = star_coloring(
            _sparse._from_torch("bench", hesse.hessian_sparsity(f)(x), (n, n))
        ).num_colors
        checkable = n <= DENSE_LIMIT or "per_sample" in spec
        blocks = spec["per_sample"][2:] if "per_sample" in spec else None

        def summarize(_name: str, result: Any, n=n, ok=checkable, blocks=blocks) -> dict:
            return {"_dense": _as_dense(result, n, blocks) if ok else None}

        stats = measure(
            calls, repeats=repeats, max_seconds=1.5 if quick else 60.0, summarize=summarize
        )
        # the reference answer: the dense baseline's where it ran, else hesse's one-shot
        base = stats.get(DENSE) or stats.get(VMAP_DENSE) or stats.get(HESSE_ONE_SHOT) or {}
        ref = base.get("_dense")
        for name, st in stats.items():
            dense = st.get("_dense")
            err = None if ref is None or dense is None else (dense - ref).abs().max().item()
            row = {
                "workload": wname,
                "method": name,
                "time_s": st["time_s"],
                "cpu_s": st["cpu_s"],
                "peak_mem_bytes": st["peak_mem_bytes"],
                "colors": _colors(name, colors, asdex_colors, n),
                "max_abs_err": err,
                "note": "",
                "reference": name == HESSE_ONE_SHOT,
            }
            rows.append(row)
        for st in stats.values():
            st.pop("_dense", None)
        if asdex_note:
            rows.append(
                {
                    "workload": wname,
                    "method": "asdex",
                    "time_s": None,
                    "peak_mem_bytes": None,
                    "note": asdex_note,
                }
            )
    return rows


if __name__ == "__main__":  # pragma: no cover - one suite alone, rows as JSON lines
    import json
    import sys

    torch.set_num_threads(1)
    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), None)
    for r in run("--quick" in sys.argv, only=only):
        print(json.dumps(r, default=str), flush=True)
