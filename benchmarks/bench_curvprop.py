"""Curvature backpropagation: exact and Becker-LeCun Hessian diagonals of networks.

Workloads (issue 8), float64, one thread:

- ``mlp DiagHessian``: the exact parameter-Hessian diagonal of a 784-100-100-10
  tanh MLP, cross-entropy, batch 128: ``hesse.diagonal(HessianOperator, "exact")``
  (curvature backpropagation on the traced graph) against BackPACK ``DiagHessian``;
  ``error`` = largest absolute difference to hesse's diagonal. The Becker-LeCun
  row's ``error`` is its relative L2 error to the exact diagonal.
- ``mlp BatchDiagHessian``: per-sample diagonals (``hesse.per_sample_diagonal``)
  against BackPACK ``BatchDiagHessian``.
- ``cnn DiagHessian`` / ``cnn BatchDiagHessian``: the same on a small CNN
  (conv 1->4 3x3, tanh, max-pool 2, conv 4->8 3x3, tanh, linear 72->10; 12x12
  inputs).
- ``residual+LayerNorm`` and ``attention``: models BackPACK cannot handle; hesse's
  exact diagonal against the brute-force exact diagonal (``n`` Hessian-vector
  products with basis vectors, chunked and vectorised: the path
  ``hesse.diagonal`` takes when a model does not trace). Two single-head
  attention blocks: ``T=8, d=16`` (brute force timed in full) and ``T=4, d=128``
  (brute force timed on its first basis products and extrapolated linearly, a
  full run taking minutes). Curvature propagation carries about ``2 T d + 3 T^2``
  columns through attention (the exact bilinear curvature of ``q k^T`` and
  ``softmax(.) v``) against ``n ~ 4 d^2`` basis products, so its advantage grows
  with ``d / T``.

hesse's traces are cached per model (NOTE [trace cache] in ``hesse.curvprop._api``):
the first, untimed call (the peak-memory run) traces; ``note`` gives its time.
Peers are optional (the ``bench`` extra); a missing one gives a "not installed" row.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

import hesse

try:  # as a package (benchmarks.run) or as a script folder on sys.path
    from benchmarks._measure import measure, prepare_process
except ImportError:  # pragma: no cover
    from _measure import measure, prepare_process  # type: ignore[no-redef]

D = torch.float64


# -- models ------------------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(784, 100), nn.Tanh(), nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 10)
    ).to(D)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(72, 10),
    ).to(D)


class ResidualLayerNorm(nn.Module):
    def __init__(self, d_in: int = 16, d: int = 32, c: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.block = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.norm(h + torch.tanh(self.block(h))))


class AttentionBlock(nn.Module):
    """Single-head self-attention over ``T`` tokens, mean-pooled, linear read-out."""

    def __init__(self, d: int = 16, c: int = 10) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 1, batch_first=True)
        self.out = nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # need_weights=True: the explicit softmax(q k^T) v path. The fused CPU kernel
        # (need_weights=False) has no double backward, so brute force could not run.
        return self.out(self.attn(x, x, x, need_weights=True)[0].mean(1))


def _data(shape: tuple[int, ...], classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=D)
    y = torch.randint(0, classes, (shape[0],), generator=gen)
    return x, y


# -- rows --------------------------------------------------------------------------------
def _row(workload: str, method: str, m: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    row = {
        "workload": workload,
        "method": method,
        "time_s": None if m is None else m["time_s"],
        "ratio": None,
        "peak_mem_bytes": None if m is None else m["peak_mem_bytes"],
        "error": None,
        "note": "",
    }
    row.update(extra)
    return row


def _backpack(model: nn.Module, x, y, per_sample: bool):
    """A BackPACK (Batch)DiagHessian call on a copy of ``model``, or None if not installed."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchDiagHessian, DiagHessian
    except ImportError:
        return None
    import copy

    bp_model = extend(copy.deepcopy(model))
    bp_loss = extend(nn.CrossEntropyLoss())

    def call() -> torch.Tensor:
        bp_model.zero_grad()
        with backpack(BatchDiagHessian() if per_sample else DiagHessian()):
            bp_loss(bp_model(x), y).backward()
        if per_sample:
            return torch.cat(
                [p.diag_h_batch.reshape(x.shape[0], -1) for p in bp_model.parameters()], 1
            )
        return torch.cat([p.diag_h.reshape(-1) for p in bp_model.parameters()])

    return call


def _kept(calls: dict, results: dict) -> dict:
    """Wrap every call so that its latest result stays in ``results`` (no extra runs)."""

    def keep(name, fn):
        def call():
            results[name] = fn()
            return results[name]

        return call

    return {name: keep(name, fn) for name, fn in calls.items()}


def _timed_first(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _flat_rows(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(v.shape[0], -1) for v in d.values()], dim=1)


def _versus_backpack(
    name: str, model: nn.Module, x, y, *, repeats: int, max_seconds: float
) -> list[dict[str, Any]]:
    import warnings

    rows: list[dict[str, Any]] = []
    loss = nn.CrossEntropyLoss()
    op = hesse.HessianOperator(model, loss, [(x, y)])
    exact, first = _timed_first(lambda: hesse.diagonal(op, method="exact"))
    calls = {
        "hesse exact": lambda: hesse.diagonal(op, method="exact"),
        "hesse becker-lecun": lambda: hesse.diagonal(op, method="becker-lecun"),
    }
    bp = _backpack(model, x, y, per_sample=False)
    if bp is not None:
        calls["BackPACK DiagHessian"] = bp
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = measure(_kept(calls, out), repeats=repeats, max_seconds=max_seconds)
    bl, bp_val = out["hesse becker-lecun"], out.get("BackPACK DiagHessian")
    workload = f"{name} DiagHessian"
    rows.append(
        _row(
            workload,
            "hesse exact",
            res["hesse exact"],
            reference=True,
            note=f"first call incl. tracing {first:.3f} s",
        )  # fmt: skip
    )
    rel = ((bl - exact).norm() / exact.norm()).item()
    rows.append(
        _row(
            workload,
            "hesse becker-lecun",
            res["hesse becker-lecun"],
            error=rel,
            note="error: relative L2 error to the exact diagonal",
        )  # fmt: skip
    )
    if bp_val is not None:
        err = (bp_val - exact).abs().max().item()
        rows.append(_row(workload, "BackPACK DiagHessian", res["BackPACK DiagHessian"], error=err,
                         note="error: max |BackPACK - hesse|"))  # fmt: skip
    else:
        rows.append(_row(workload, "BackPACK DiagHessian", None, note="not installed"))

    # per-sample diagonals
    workload = f"{name} BatchDiagHessian"
    per = lambda: _flat_rows(hesse.per_sample_diagonal(model, loss, x, y))  # noqa: E731
    calls = {"hesse per_sample_diagonal": per}
    bpb = _backpack(model, x, y, per_sample=True)
    if bpb is not None:
        calls["BackPACK BatchDiagHessian"] = bpb
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = measure(_kept(calls, out), repeats=repeats, max_seconds=max_seconds)
    mine, theirs = out["hesse per_sample_diagonal"], out.get("BackPACK BatchDiagHessian")
    rows.append(_row(workload, "hesse per_sample_diagonal", res["hesse per_sample_diagonal"],
                     reference=True, error=(mine.sum(0) - exact).abs().max().item(),
                     note="error: max |sum of per-sample - exact diagonal|"))  # fmt: skip
    if theirs is not None:
        rows.append(_row(workload, "BackPACK BatchDiagHessian", res["BackPACK BatchDiagHessian"],
                         error=(theirs - mine).abs().max().item(),
                         note="error: max |BackPACK - hesse|"))  # fmt: skip
    else:
        rows.append(_row(workload, "BackPACK BatchDiagHessian", None, note="not installed"))
    return rows


def _brute_force(op, k: int | None, call: str):
    """The brute-force exact diagonal (``hesse.diagonal``'s path for models that do not
    trace): basis products in chunks. With ``k``, only the first ``k`` entries."""
    from hesse._chunking import map_chunks
    from hesse._hvp import basis_rows

    n = op.shape[0]
    like = torch.empty(0, dtype=op.dtype, device=op.device)
    return map_chunks(
        lambda R: (op._matmat(R.T).T * R).sum(1),
        None,
        n if k is None else min(k, n),
        basis_rows(n, like),
        chunk_size=op.chunk_size,
        call=call,
    )


def _versus_brute_force(
    name: str, model: nn.Module, x, y, *, repeats: int, prefix: int | None = None
) -> list[dict]:
    """hesse against brute force; with ``prefix``, brute force is timed on its first
    ``prefix`` basis products and extrapolated linearly to all ``n``."""
    import warnings

    loss = nn.CrossEntropyLoss()
    op = hesse.HessianOperator(model, loss, [(x, y)])
    n = op.shape[0]
    exact, first = _timed_first(lambda: hesse.diagonal(op, method="exact"))
    call = f"bench {name}"
    brute_name = f"brute force ({n} HVPs)"
    calls = {
        "hesse exact": lambda: hesse.diagonal(op, method="exact"),
        "hesse becker-lecun": lambda: hesse.diagonal(op, method="becker-lecun"),
        brute_name: lambda: _brute_force(op, prefix, call),
    }
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = measure(_kept(calls, out), repeats=repeats, max_seconds=30.0)
    brute, bl = out[brute_name], out["hesse becker-lecun"]
    k = brute.shape[0]
    note = "hesse.diagonal's path for models that do not trace"
    if k < n:
        res[brute_name] = dict(res[brute_name], time_s=res[brute_name]["time_s"] * n / k)
        note = f"time extrapolated from the first {k} of {n} basis products; " + note
    workload = f"{name} (n={n})"
    return [
        _row(workload, "hesse exact", res["hesse exact"], reference=True,
             error=(exact[:k] - brute).abs().max().item(),
             note=f"error: max |hesse - brute force| (on {k} entries); first call incl. "
             f"tracing {first:.3f} s"),
        _row(workload, "hesse becker-lecun", res["hesse becker-lecun"],
             error=((bl - exact).norm() / exact.norm()).item(),
             note="error: relative L2 error to the exact diagonal"),
        _row(workload, brute_name, res[brute_name], note=note),
    ]  # fmt: skip


def run(quick: bool) -> list[dict[str, Any]]:
    """All rows; see the module docstring. ``quick``: smaller batches, fewer repeats."""
    prepare_process(threads=None)
    repeats = 2 if quick else 7
    rows: list[dict[str, Any]] = []
    b = 32 if quick else 128
    x, y = _data((b, 784), 10)
    rows += _versus_backpack("mlp 784-100-100-10", mlp(), x, y, repeats=repeats, max_seconds=10)
    x, y = _data((8 if quick else 32, 1, 12, 12), 10)
    rows += _versus_backpack("cnn", cnn(), x, y, repeats=repeats, max_seconds=10)
    x, y = _data((16 if quick else 64, 16), 10)
    rows += _versus_brute_force("residual+LayerNorm", ResidualLayerNorm().to(D), x, y,
                                repeats=repeats)  # fmt: skip
    torch.manual_seed(0)
    x, y = _data((4 if quick else 16, 8, 16), 10)
    rows += _versus_brute_force("attention T=8 d=16", AttentionBlock(16).to(D), x, y,
                                repeats=repeats)  # fmt: skip
    torch.manual_seed(0)
    x, y = _data((4 if quick else 8, 4, 128), 10)
    rows += _versus_brute_force("attention T=4 d=128", AttentionBlock(128).to(D), x, y,
                                repeats=1 if quick else 3, prefix=64 if quick else 512)  # fmt: skip
    return rows  # ratios against the reference row: benchmarks.run.add_ratios


if __name__ == "__main__":  # pragma: no cover
    import sys

    torch.set_num_threads(1)
    for r in run("--quick" in sys.argv):
        print(r)
