"""KFAC / EKFAC: factor construction, eigenvalue corrections, and preconditioned CG (issue 12).

Workloads, each on three models (float32, default threads of the runner):

- ``digits MLP``: the 64-32-10 tanh MLP of ``hesse analyze`` on the digits data
  (1,797 samples in batches of 256);
- ``CNN``: two conv + pool layers and a linear head on 28 x 28 inputs (batch 128,
  the CNN of ``bench_operators``);
- ``transformer``: a 2-block pre-norm transformer (embedding 32 -> 32, attention
  from explicit linear layers, MLP 32-64-32, head to 32 classes; 8 sequences of
  16 tokens; logits flattened to ``(B*T, 32)``); KFAC covers every linear layer
  (the embedding is left to hesse only: curvlinops has no embedding support, and
  LayerNorm is no KFAC layer).

Rows:

- ``KFAC factors (<fisher_type>)``: constructing the factors, ``x_grad`` = time
  over one gradient of the loss over the same data in the same run; hesse against
  curvlinops' ``KFACLinearOperator.compute_kronecker_factors``.
- ``EKFAC corrections``: the whole EKFAC construction (factors, eigenbases,
  corrections) against curvlinops' ``EKFACLinearOperator``.
- ``CG (GGN + lambda I) x = b``: ``hesse.solve(..., method="cg", rtol=1e-6)`` with
  no preconditioner, Jacobi (the exact GGN diagonal, where ``hesse.diagonal`` can
  compute it) and the KFAC inverse (``exact_damping=True``), on one batch;
  ``lambda`` = 1e-3 times the largest diagonal entry; float64 (in float32 CG
  stalls near ``cond * eps``, above the target); ``matvecs`` = products with the GGN (the preconditioner's
  construction is not timed: it is shared across solves).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import hesse

try:  # as a package (benchmarks.run) or as a script folder on sys.path
    from benchmarks._measure import measure, prepare_process
    from benchmarks.bench_operators import _missing, _row, cnn
except ImportError:  # pragma: no cover
    from _measure import measure, prepare_process  # type: ignore[no-redef]
    from bench_operators import _missing, _row, cnn  # type: ignore[no-redef]


# -- models ------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.ln1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, T, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(B, T, d))
        return x + self.down(torch.tanh(self.up(self.ln2(x))))


class _Transformer(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 32, T: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(T, d))
        self.blocks = nn.Sequential(*(_Block(d, 4) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(idx) + self.pos)
        return self.head(self.ln(h)).reshape(-1, self.head.out_features)


def _models(quick: bool) -> dict[str, tuple[nn.Module, list, list[str] | None]]:
    """name -> (model, data, KFAC parameter names or None for all)."""
    from hesse.cli._default_model import digits_mlp

    mlp, _, data = digits_mlp(dtype=torch.float32, quick=quick)
    out: dict[str, tuple[nn.Module, list, list[str] | None]] = {"digits MLP": (mlp, data, None)}
    model, X, y = cnn(torch.float32, batch=128)
    out["CNN"] = (model, [(X, y)], None)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tf = _Transformer()
    idx = torch.randint(0, 32, (8, 16), generator=gen)
    tgt = torch.randint(0, 32, (8 * 16,), generator=gen)
    linear = [
        n
        for n, m in tf.named_modules()
        if isinstance(m, nn.Linear)
        for n in (f"{n}.weight", f"{n}.bias")
    ]
    out["transformer"] = (tf, [(idx, tgt)], linear)
    return out


def _gradient(model: nn.Module, data: list, loss_fn: nn.Module) -> Callable[[], Any]:
    params = [p for p in model.parameters() if p.requires_grad]

    def grad() -> Any:
        total = None
        for X, y in data:
            g = torch.autograd.grad(loss_fn(model(X), y), params)
            total = g if total is None else [a + b for a, b in zip(total, g)]
        return total

    return grad


# -- factors ------------------------------------------------------------------------------
def _factor_rows(name: str, model: nn.Module, data: list, names: Any, quick: bool) -> list:
    loss_fn = nn.CrossEntropyLoss()
    try:
        import curvlinops as cl
    except ImportError:
        cl = None
    plist = None
    if names is not None:
        named = dict(model.named_parameters())
        plist = [named[n] for n in names]
    else:
        plist = list(model.parameters())
    rows = []
    repeats = 3 if quick else 9
    for fisher_type in ("mc", "type-2"):
        workload = f"KFAC factors ({fisher_type}), {name}"
        calls: dict[str, Callable[[], Any]] = {
            "one gradient (torch.autograd.grad)": _gradient(model, data, loss_fn),
            "hesse.KFACOperator": lambda ft=fisher_type: hesse.KFACOperator(
                model, loss_fn, data, fisher_type=ft, params=names
            ),
        }
        if cl is not None:

            def peer(ft: str = fisher_type) -> Any:
                op = cl.KFACLinearOperator(
                    model, loss_fn, plist, data, fisher_type=ft, check_deterministic=False,
                    separate_weight_and_bias=False, num_data=sum(len(X) for X, _ in data),
                )  # fmt: skip
                op.compute_kronecker_factors()
                return op

            calls["curvlinops KFACLinearOperator"] = peer
        rows += _rows(workload, calls, repeats, "hesse.KFACOperator")
        if cl is None:
            rows.append(_missing(workload, "curvlinops KFACLinearOperator"))
    workload = f"EKFAC (factors + corrections, type-2), {name}"
    calls = {
        "one gradient (torch.autograd.grad)": _gradient(model, data, loss_fn),
        "hesse.EKFACOperator": lambda: hesse.EKFACOperator(model, loss_fn, data, params=names),
    }
    if cl is not None:

        def ekfac_peer() -> Any:
            op = cl.EKFACLinearOperator(
                model, loss_fn, plist, data, fisher_type="type-2", check_deterministic=False,
                separate_weight_and_bias=False, num_data=sum(len(X) for X, _ in data),
            )  # fmt: skip
            op.compute_kronecker_factors()
            op.compute_eigenvalue_correction()
            return op

        if name != "transformer":  # curvlinops' EKFAC takes 2-D outputs only
            calls["curvlinops EKFACLinearOperator"] = ekfac_peer
    rows += _rows(workload, calls, repeats, "hesse.EKFACOperator")
    return rows


def _rows(workload: str, calls: dict, repeats: int, reference: str) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = measure(calls, repeats=repeats, max_seconds=30)
    grad_t = res["one gradient (torch.autograd.grad)"]["time_s"]
    return [
        _row(
            workload,
            method,
            m,
            x_grad=m["time_s"] / grad_t,
            reference=method == reference,
            note=f"{m['time_s'] / grad_t:.2f} gradients",
        )
        for method, m in res.items()
    ]


# -- preconditioned CG ----------------------------------------------------------------------
def _cg_rows(name: str, model: nn.Module, data: list, names: Any, quick: bool) -> list:
    loss_fn = nn.CrossEntropyLoss()
    # float64: a float32 CG stalls near cond * eps, above rtol 1e-6.
    model = copy.deepcopy(model).double()
    batch = [(X.double() if X.is_floating_point() else X, y) for X, y in data[:1]]
    G = hesse.GGNOperator(model, loss_fn, batch, params=names)
    K = hesse.KFACOperator(model, loss_fn, batch, params=names)
    jacobi_note = ""
    try:
        d = hesse.diagonal(G, method="exact")
    except Exception as err:  # noqa: BLE001 - reported in the table
        d, jacobi_note = None, f"exact diagonal failed: {type(err).__name__}"
    lam = 1e-3 * float((d if d is not None else K.diagonal()).max())
    preconditioners = {
        "hesse.solve(cg), no preconditioner": None,
        "hesse.solve(cg), KFAC inverse (exact damping)": K.inverse(lam, exact_damping=True),
    }
    if d is not None:
        preconditioners["hesse.solve(cg), Jacobi (exact GGN diagonal)"] = hesse.solvers.jacobi(
            d, damping=lam
        )
    b = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(1), dtype=G.dtype)
    budget = 400 if quick else 2000
    calls = {
        method: lambda M=M: hesse.solve(
            G,
            b,
            method="cg",
            damping=lam,
            preconditioner=M,
            rtol=1e-6,
            max_matvecs=budget,
            on_failure="warn",
        )  # fmt: skip
        for method, M in preconditioners.items()
    }

    def summarize(method: str, result: Any) -> dict[str, Any]:
        return {
            "matvecs": result.num_matvecs,
            "converged": bool(result.converged.all()),
        }

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = measure(calls, repeats=1 if quick else 3, max_seconds=60, summarize=summarize)
    workload = f"CG (GGN + lambda I) x = b, rtol 1e-6, {name}"
    rows = [
        _row(
            workload,
            method,
            m,
            matvecs=m["matvecs"],
            converged=m["converged"],
            reference=method.endswith("no preconditioner"),
            note=f"lambda = {lam:.2g}; float64",
        )
        for method, m in res.items()
    ]
    if d is None:
        rows.append(
            {
                **_missing(workload, "hesse.solve(cg), Jacobi (exact GGN diagonal)"),
                "note": jacobi_note,
            }
        )
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    prepare_process(threads=None)
    rows: list[dict[str, Any]] = []
    for name, (model, data, names) in _models(quick).items():
        rows += _factor_rows(name, model, data, names, quick)
        rows += _cg_rows(name, model, data, names, quick)
    return rows


if __name__ == "__main__":  # pragma: no cover
    from benchmarks.run import format_table

    print(format_table(run(quick=True)))
