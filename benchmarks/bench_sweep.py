"""Sweeps: every benchmark family over a grid, one ratio per cell (``hesse bench --sweep``).

A cell is one workload at one size, dtype and thread count. Its ratio is hesse's
median time over the best peer's median time, timed side by side (interleaved
repeats in one process, :func:`benchmarks._measure.measure`): below 1.0 hesse
wins. Every cell runs at one thread and at PyTorch's default thread count. Every
answer is checked against the first peer that ran (``max_abs_err``); a peer that
crashes or runs out of memory is reported in the cell (``note``), never dropped.

Each method runs once untimed first (except the dense parameter Hessians, seconds to
minutes a call), so that one-time costs (tracing, functorch's first ``vmap``) never
count; calls slower than ``max_seconds / repeats`` are timed once. ``--match TEXT``
reruns the cells whose name contains ``TEXT``.

Families (issue 11); ``--quick`` runs the cells marked ``quick`` (under 3 minutes on
a quiet machine):

- ``dense input Hessian``: NLL of ``log_softmax(MLP n-h-10)`` w.r.t. the input (the
  forum question), ``n`` in {64, 784, 3072} x ``h`` in {32, 128, 512};
  ``sum(sin(x))`` and Rosenbrock, ``n`` in {100, 2000}; float32 and float64.
  Peers: ``torch.func.hessian``, ``jacrev(jacrev)``,
  ``torch.autograd.functional.hessian(vectorize=True)``.
- ``per-sample input Hessian``: the forum MLP (784-128-10) on a batch of ``B`` in
  {1, 16, 256} inputs, one Hessian per sample: ``vmap(hesse.hessian(f))`` against
  ``vmap(torch.func.hessian(f))`` and ``vmap(jacrev(jacrev(f)))``.
- ``dense parameter Hessian``: tanh MLPs with ``n`` ~ 1k, 5k, 20k parameters, batch
  256, float32. Peers: ``torch.func.hessian``, ``jacrev(jacrev, chunk_size=256)``
  (the only peer run at 20k: the others take minutes).
- ``diagonals``: exact Hessian diagonal, exact and MC GGN diagonal, and the
  per-sample forms, against BackPACK (``DiagHessian``, ``BatchDiagHessian``,
  ``DiagGGNExact``, ``BatchDiagGGNExact``, ``DiagGGNMC``) on a tanh MLP
  784-100-100-10, a ReLU MLP of the same shape and a CNN BackPACK supports, ``B``
  in {1, 8, 32, 128, 512}, float32 and float64; the exact diagonal of a
  residual+LayerNorm and of an attention block against brute force (basis HVPs).
- ``operator matvec``: ``HessianOperator`` / ``GGNOperator`` products against
  curvlinops on the MLP and the CNN, ``B`` in {32, 128}; ``x_grad`` is hesse's
  time in gradients of the same loss.
"""

from __future__ import annotations

import copy
import gc
import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

import hesse

try:  # as a package (benchmarks.run) or as a script folder on sys.path
    from benchmarks._measure import measure, prepare_process
    from benchmarks.bench_curvprop import AttentionBlock, ResidualLayerNorm
except ImportError:  # pragma: no cover
    from _measure import measure, prepare_process  # type: ignore[no-redef]
    from bench_curvprop import AttentionBlock, ResidualLayerNorm  # type: ignore[no-redef]

HESSE = "hesse"
DTYPES = {"f32": torch.float32, "f64": torch.float64}
JACREV_CHUNK = 256


@dataclass
class Cell:
    """One grid point: the calls to time (hesse first) and how to compare their answers."""

    family: str
    name: str
    calls: Callable[[], dict[str, Callable[[], Any]]]  # built lazily (models, data)
    quick: bool = False
    dense: Callable[[Any], torch.Tensor] = lambda r: r  # any answer -> one comparable tensor
    check: bool = True  # MC estimates are random: no agreement check
    # One untimed call per method first: one-time costs (hesse traces a new model once
    # per architecture, NOTE [trace cache]; functorch's first vmap of a function) would
    # otherwise count in slow cells, which are timed on a single run.
    warm: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


# -- dense input Hessians -------------------------------------------------------------------
def forum_mlp(n: int, h: int, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)  # nn.Linear's initialisation draws from the global RNG
    model = nn.Sequential(nn.Linear(n, h), nn.ReLU(), nn.Linear(h, 10)).to(dtype)
    return model.requires_grad_(False)


def _input_calls(f: Callable, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    return {
        HESSE: lambda: hesse.hessian(f)(x),
        "torch.func.hessian": lambda: hessian(f)(x),
        "jacrev(jacrev)": lambda: jacrev(jacrev(f))(x),
        "autograd.functional.hessian(vectorize=True)": lambda: torch.autograd.functional.hessian(
            f, x, vectorize=True
        ),
    }


def _forum(n: int, h: int, dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    model = forum_mlp(n, h, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, generator=gen, dtype=dtype)
    target = torch.tensor([3])

    def f(x: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(F.log_softmax(model(x[None]), dim=-1), target)

    return _input_calls(f, x)


def _sum_sin(n: int, dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return _input_calls(lambda x: torch.sin(x).sum(), x)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def _rosenbrock(n: int, dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return _input_calls(rosenbrock, x)


def dense_input_cells() -> Iterator[Cell]:
    fam = "dense input Hessian"
    for (n, h), (dn, dt) in itertools.product(
        itertools.product((64, 784, 3072), (32, 128, 512)), DTYPES.items()
    ):
        quick = dn == "f32" and (n, h) in ((64, 32), (784, 32), (784, 128))
        yield Cell(fam, f"forum MLP n={n} h={h} {dn}", lambda n=n, h=h, dt=dt: _forum(n, h, dt),
                   quick=quick)  # fmt: skip
    for n, (dn, dt) in itertools.product((100, 2000), DTYPES.items()):
        yield Cell(fam, f"sum(sin) n={n} {dn}", lambda n=n, dt=dt: _sum_sin(n, dt),
                   quick=(n, dn) == (2000, "f32"))  # fmt: skip
        yield Cell(fam, f"Rosenbrock n={n} {dn}", lambda n=n, dt=dt: _rosenbrock(n, dt),
                   quick=(n, dn) == (2000, "f64"))  # fmt: skip


def _per_sample(b: int, dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    model = forum_mlp(784, 128, dtype)
    gen = torch.Generator().manual_seed(1)
    X = torch.rand(b, 784, generator=gen, dtype=dtype)
    T = torch.randint(0, 10, (b,), generator=gen)

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(F.log_softmax(model(x[None]), dim=-1), t[None])

    return {
        HESSE: lambda: vmap(hesse.hessian(f))(X, T),
        "vmap(torch.func.hessian)": lambda: vmap(hessian(f))(X, T),
        "vmap(jacrev(jacrev))": lambda: vmap(jacrev(jacrev(f)))(X, T),
    }


def per_sample_cells() -> Iterator[Cell]:
    for b, (dn, dt) in itertools.product((1, 16, 256), DTYPES.items()):
        yield Cell("per-sample input Hessian", f"forum MLP 784-128 B={b} {dn}",
                   lambda b=b, dt=dt: _per_sample(b, dt), quick=(b, dn) == (16, "f32"))  # fmt: skip


# -- dense parameter Hessians ---------------------------------------------------------------
PARAM_MLPS = {1_000: (32, 24), 5_000: (64, 64), 20_000: (128, 128)}  # n ~ in*h + h*10


def _param_hessian(size: int) -> dict[str, Callable[[], Any]]:
    d_in, h = PARAM_MLPS[size]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Linear(h, 10))
    names = [k for k, _ in model.named_parameters()]
    params = tuple(p.detach().clone() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(256, d_in, generator=gen)
    y = torch.randint(0, 10, (256,), generator=gen)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, dict(zip(names, ps)), (X,)), y)

    argnums = tuple(range(len(params)))
    calls = {
        HESSE: lambda: hesse.hessian(f, argnums)(*params),
        f"jacrev(jacrev, chunk_size={JACREV_CHUNK})": lambda: jacrev(
            jacrev(f, argnums), argnums, chunk_size=JACREV_CHUNK
        )(*params),
    }
    if size < 20_000:
        calls["torch.func.hessian"] = lambda: hessian(f, argnums)(*params)
    return calls


def _blocks_to_dense(result: Any) -> torch.Tensor:
    """A tensor, or ``torch.func.hessian``'s nested blocks, as one flat tensor of entries."""
    if isinstance(result, torch.Tensor):
        return result.reshape(-1)
    rows = []
    for row in result:
        n_i = row[0].shape[: row[0].dim() // 2].numel() if row[0].dim() else 1
        rows.append(torch.cat([b.reshape(n_i, -1) for b in row], 1))
    return torch.cat(rows, 0).reshape(-1)


def param_cells() -> Iterator[Cell]:
    for size in PARAM_MLPS:
        n = sum(a * b + b for a, b in (PARAM_MLPS[size], (PARAM_MLPS[size][1], 10)))
        yield Cell("dense parameter Hessian", f"tanh MLP n={n} f32",
                   lambda s=size: _param_hessian(s), quick=size == 1_000,
                   dense=_blocks_to_dense, warm=False)  # seconds to minutes a call  # fmt: skip


# -- diagonals against BackPACK ------------------------------------------------------------
def _mlp(act: type[nn.Module], dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 100), act(), nn.Linear(100, 100), act(), nn.Linear(100, 10)
    ).to(dtype)


def _cnn(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.Tanh(),
        nn.Flatten(), nn.Linear(72, 10),
    ).to(dtype)  # fmt: skip


MODELS = {
    "tanh MLP": (lambda dt: _mlp(nn.Tanh, dt), (784,)),
    "ReLU MLP": (lambda dt: _mlp(nn.ReLU, dt), (784,)),
    "CNN": (_cnn, (1, 12, 12)),
}
KINDS = {  # kind: (BackPACK extension, attribute, per-sample)
    "DiagHessian": ("DiagHessian", "diag_h", False),
    "BatchDiagHessian": ("BatchDiagHessian", "diag_h_batch", True),
    "DiagGGNExact": ("DiagGGNExact", "diag_ggn_exact", False),
    "BatchDiagGGNExact": ("BatchDiagGGNExact", "diag_ggn_exact_batch", True),
    "DiagGGNMC": ("DiagGGNMC", "diag_ggn_mc", False),
}


def _data(shape: tuple[int, ...], b: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(b, *shape, generator=gen, dtype=dtype), torch.randint(
        0, 10, (b,), generator=gen
    )


def _hesse_diagonal(kind: str, model: nn.Module, X, y) -> Callable[[], Any] | None:
    loss = nn.CrossEntropyLoss()
    if kind == "DiagHessian":
        op = hesse.HessianOperator(model, loss, [(X, y)])
        return lambda: hesse.diagonal(op, method="exact")
    if kind == "BatchDiagHessian":

        def per_sample() -> torch.Tensor:
            d = hesse.per_sample_diagonal(model, loss, X, y)
            return torch.cat([v.reshape(X.shape[0], -1) for v in d.values()], 1)

        return per_sample
    if kind in ("DiagGGNExact", "DiagGGNMC"):
        G = hesse.GGNOperator(model, loss, [(X, y)])
        if kind == "DiagGGNExact":
            return lambda: hesse.diagonal(G, method="exact")
        gen = torch.Generator().manual_seed(0)
        return lambda: hesse.diagonal(G, method="mc", generator=gen).value
    return None  # BatchDiagGGNExact: hesse has no per-sample GGN diagonal


def _backpack(kind: str, model: nn.Module, X, y) -> Callable[[], Any] | None:
    try:
        import backpack
        from backpack import extensions
    except ImportError:
        return None
    name, attr, per_sample = KINDS[kind]
    bmodel = backpack.extend(copy.deepcopy(model))  # hooks in place: a copy
    bloss = backpack.extend(nn.CrossEntropyLoss())

    def call() -> torch.Tensor:
        bmodel.zero_grad()
        with backpack.backpack(getattr(extensions, name)()):
            bloss(bmodel(X), y).backward()
        if per_sample:
            return torch.cat(
                [getattr(p, attr).reshape(X.shape[0], -1) for p in bmodel.parameters()], 1
            )
        return torch.cat([getattr(p, attr).reshape(-1) for p in bmodel.parameters()])

    return call


def _diagonal_calls(kind: str, mname: str, b: int, dtype: torch.dtype):
    build, shape = MODELS[mname]
    model = build(dtype)
    X, y = _data(shape, b, dtype)
    calls = {}
    mine = _hesse_diagonal(kind, model, X, y)
    if mine is not None:
        calls[HESSE] = mine
    peer = _backpack(kind, model, X, y)
    if peer is not None:
        calls[f"BackPACK {kind}"] = peer
    return calls


def _brute_diagonal(model: nn.Module, X, y) -> Callable[[], Any]:
    from hesse._chunking import map_chunks
    from hesse._hvp import basis_rows

    op = hesse.HessianOperator(model, nn.CrossEntropyLoss(), [(X, y)])
    n = op.shape[0]
    like = torch.empty(0, dtype=op.dtype)
    return lambda: map_chunks(
        lambda R: (op._matmat(R.T).T * R).sum(1), None, n, basis_rows(n, like),
        chunk_size=op.chunk_size, call="sweep brute force",
    )  # fmt: skip


def _structured_calls(which: str, b: int) -> dict[str, Callable[[], Any]]:
    torch.manual_seed(0)
    if which == "residual+LayerNorm":
        model, shape = ResidualLayerNorm().to(torch.float64), (16,)
    else:
        model, shape = AttentionBlock(16).to(torch.float64), (8, 16)
    X, y = _data(shape, b, torch.float64)
    op = hesse.HessianOperator(model, nn.CrossEntropyLoss(), [(X, y)])
    return {
        HESSE: lambda: hesse.diagonal(op, method="exact"),
        "brute force (basis HVPs)": _brute_diagonal(model, X, y),
    }


def diagonal_cells() -> Iterator[Cell]:
    for kind, mname, b, (dn, dt) in itertools.product(
        KINDS, MODELS, (1, 8, 32, 128, 512), DTYPES.items()
    ):
        quick = mname == "tanh MLP" and dn == "f64" and b in (8, 128)
        quick = quick and (kind != "BatchDiagGGNExact" or b == 8)  # no hesse method: one row
        quick = quick or (mname == "CNN" and b == 32 and dn == "f32" and kind == "DiagHessian")
        yield Cell("diagonals", f"{kind} {mname} B={b} {dn}",
                   lambda k=kind, m=mname, b=b, dt=dt: _diagonal_calls(k, m, b, dt),
                   quick=quick, check=kind != "DiagGGNMC")  # fmt: skip
    for which, b in itertools.product(("residual+LayerNorm", "attention T=8 d=16"), (8, 32)):
        yield Cell("diagonals", f"exact Hessian diagonal {which} B={b} f64",
                   lambda w=which, b=b: _structured_calls(w, b),
                   quick=b == 8 and which == "residual+LayerNorm")  # fmt: skip


# -- operator products against curvlinops --------------------------------------------------
def _matvec_calls(kind: str, mname: str, b: int) -> dict[str, Callable[[], Any]]:
    build, shape = MODELS[mname]
    model = build(torch.float32)
    X, y = _data(shape, b, torch.float32)
    loss = nn.CrossEntropyLoss()
    data = [(X, y)]
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(2))
    mine = (hesse.HessianOperator if kind == "Hessian" else hesse.GGNOperator)(model, loss, data)
    calls: dict[str, Callable[[], Any]] = {HESSE: lambda: mine @ v}
    try:
        import curvlinops

        cls = (
            curvlinops.HessianLinearOperator if kind == "Hessian" else curvlinops.GGNLinearOperator
        )
        theirs = cls(model, loss, list(model.parameters()), data, check_deterministic=False)
        calls[f"curvlinops {cls.__name__}"] = lambda: torch.as_tensor(theirs @ v)
    except ImportError:
        pass
    return calls


def matvec_cells() -> Iterator[Cell]:
    for kind, mname, b in itertools.product(("Hessian", "GGN"), ("tanh MLP", "CNN"), (32, 128)):
        yield Cell("operator matvec", f"{kind}Operator @ v {mname} B={b} f32",
                   lambda k=kind, m=mname, b=b: _matvec_calls(k, m, b),
                   quick=mname == "tanh MLP" and b == 128)  # fmt: skip


FAMILIES: dict[str, Callable[[], Iterator[Cell]]] = {
    "dense input Hessian": dense_input_cells,
    "per-sample input Hessian": per_sample_cells,
    "dense parameter Hessian": param_cells,
    "diagonals": diagonal_cells,
    "operator matvec": matvec_cells,
}


# -- running --------------------------------------------------------------------------------
def run_cell(cell: Cell, threads: int, *, repeats: int, max_seconds: float) -> dict[str, Any]:
    """One row: hesse's time, the best peer's, their ratio, peak memory, crashes."""
    torch.set_num_threads(threads)
    row: dict[str, Any] = {"workload": cell.name, "method": f"threads={threads}"}
    try:
        calls = cell.calls()
    except Exception as err:  # noqa: BLE001 - a cell that cannot be built is reported
        return {**row, "time_s": None, "note": f"set-up failed: {type(err).__name__}: {err}"}
    reference: list[torch.Tensor] = []

    def summarize(name: str, result: Any) -> dict[str, Any]:
        if not cell.check:
            return {}
        dense = cell.dense(result).detach()
        if not reference:
            reference.append(dense)
            return {}
        return {"err": float((dense - reference[0]).abs().max())}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPACK's hook notices, fallback notices
        if cell.warm:
            for fn in calls.values():
                try:
                    fn()
                except (Exception, MemoryError):  # noqa: BLE001 - measure reports it
                    pass
        res = measure(
            calls, repeats=repeats, max_seconds=max_seconds, summarize=summarize,
            tolerate_errors=True,
        )  # fmt: skip
    del calls
    gc.collect()
    mine = res.get(HESSE)
    peers = {k: v for k, v in res.items() if k != HESSE}
    ran = {k: v for k, v in peers.items() if v["time_s"] is not None}
    notes = [f"{k} failed ({v['error']})" for k, v in peers.items() if v["time_s"] is None]
    errs = [v.get("err") for v in res.values() if v.get("err") is not None]
    best = min(ran, key=lambda k: ran[k]["time_s"]) if ran else None
    row.update(
        time_s=None if mine is None else mine["time_s"],
        peak_mem_bytes=None if mine is None else mine["peak_mem_bytes"],
        best_peer=best or "-",
        peer_time_s=None if best is None else ran[best]["time_s"],
        peer_mem_bytes=None if best is None else ran[best]["peak_mem_bytes"],
        max_abs_err=max(errs) if errs else None,
    )
    if mine is None:
        notes.insert(0, "no hesse method for this cell")
    elif mine["time_s"] is None:
        notes.insert(0, f"hesse failed ({mine['error']})")
    elif best is not None:
        row["ratio"] = mine["time_s"] / ran[best]["time_s"]
        # CPU time of this process: steadier than wall time on a shared machine.
        row["cpu_ratio"] = mine["cpu_s"] / max(ran[best]["cpu_s"], 1e-9)
    row["note"] = "; ".join(notes)
    return row


def run_sweep(
    quick: bool,
    threads: list[int],
    families: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    match: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Rows per family: every cell (whose name contains ``match``) at every thread count."""
    prepare_process(threads=None)
    _warm_up()
    out: dict[str, list[dict[str, Any]]] = {}
    repeats = 3 if quick else 5  # slow calls are timed once (max_seconds)
    for fam in families or list(FAMILIES):
        rows = out.setdefault(fam, [])
        for cell in FAMILIES[fam]():
            if (quick and not cell.quick) or (match is not None and match not in cell.name):
                continue
            for t in threads:
                if progress is not None:
                    progress(f"{fam}: {cell.name}, threads={t}")
                rows.append(run_cell(cell, t, repeats=repeats, max_seconds=4 if quick else 6))
    return out


def _warm_up() -> None:
    """Imports and first-call set-up (functorch, dispatch tables) off the clock."""
    calls = _forum(8, 4, torch.float64)
    for fn in calls.values():
        fn()
