"""Dense Hessians: hesse.hessian against the ways people compute them in PyTorch today.

Workloads (issue 2):

- ``forum-mlp-input``: the Hessian with respect to the 784-dim input of
  ``nll(log_softmax(MLP(x)))`` (784 -> 128 -> 10, ReLU) - the classic forum question.
- ``mlp-params``: the dense Hessian with respect to the 4,810 parameters of a
  64 -> 64 -> 10 tanh MLP on a batch of 256 samples (also run with a 256 MiB memory
  budget, to compare hesse's peak with the unchunked peers').
- ``sum-sin``: ``sum(sin(x))`` at ``n = 2000``.

Methods: the N-call ``torch.autograd.grad`` loop, ``torch.autograd.functional.hessian``
with ``vectorize=False`` and ``True``, ``torch.func.hessian``,
``torch.func.jacrev(jacrev(f), chunk_size=256)`` and ``hesse.hessian`` (defaults).
Every method computes the full dense Hessian in float32 on the CPU; rows are checked
against ``hesse.hessian``'s result so that no method is timed on a wrong answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

try:  # as a package (benchmarks.run) or as a script folder on sys.path
    from benchmarks._measure import measure, prepare_process
except ImportError:  # pragma: no cover
    from _measure import measure, prepare_process  # type: ignore[no-redef]

MiB = 1024**2
JACREV_CHUNK = 256
BUDGET = 256 * MiB

Problem = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]


# -- workloads ---------------------------------------------------------------------
def forum_mlp_input(seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear's initialisation draws from the global RNG
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    model.requires_grad_(False)
    x = torch.rand(784, generator=gen)
    target = torch.tensor([3])

    def f(x: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(F.log_softmax(model(x.unsqueeze(0)), dim=-1), target)

    return f, (x,)


def mlp_params(seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach().clone() for p in model.parameters())
    X = torch.randn(256, 64, generator=gen)
    y = torch.randint(0, 10, (256,), generator=gen)

    def f(*params: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, dict(zip(names, params)), (X,)), y)

    return f, params


def sum_sin(seed: int = 0, n: int = 2000) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    return (lambda x: torch.sin(x).sum()), (x,)


WORKLOADS: dict[str, Callable[[], Problem]] = {
    "forum-mlp-input (n=784)": forum_mlp_input,
    "mlp-params (n=4810)": mlp_params,
    "sum-sin (n=2000)": sum_sin,
}


# -- methods -----------------------------------------------------------------------
def _argnums(args: tuple[torch.Tensor, ...]) -> int | tuple[int, ...]:
    return 0 if len(args) == 1 else tuple(range(len(args)))


def grad_loop(f: Callable, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The N-call loop: one ``torch.autograd.grad`` per Hessian row."""
    xs = [a.detach().requires_grad_(True) for a in args]
    gs = torch.autograd.grad(f(*xs), xs, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in gs])
    n = g.numel()
    H = torch.zeros(n, n, dtype=g.dtype)
    for i in range(n):
        if not g[i].requires_grad:
            continue
        row = torch.autograd.grad(g[i], xs, retain_graph=True, allow_unused=True)
        H[i] = torch.cat(
            [(torch.zeros_like(x) if r is None else r).reshape(-1) for r, x in zip(row, xs)]
        )
    return H


def autograd_functional(vectorize: bool) -> Callable:
    def method(f: Callable, args: tuple[torch.Tensor, ...]) -> Any:
        inputs = args[0] if len(args) == 1 else args
        return torch.autograd.functional.hessian(f, inputs, vectorize=vectorize)

    return method


def func_hessian(f: Callable, args: tuple[torch.Tensor, ...]) -> Any:
    return torch.func.hessian(f, _argnums(args))(*args)


def jacrev_jacrev(f: Callable, args: tuple[torch.Tensor, ...]) -> Any:
    argnums = _argnums(args)
    return jacrev(jacrev(f, argnums), argnums, chunk_size=JACREV_CHUNK)(*args)


def hesse_hessian(memory_budget: int | None = None) -> Callable:
    def method(f: Callable, args: tuple[torch.Tensor, ...]) -> Any:
        import hesse

        return hesse.hessian(f, _argnums(args), memory_budget=memory_budget)(*args)

    return method


METHODS: dict[str, Callable] = {
    "autograd.grad loop (N calls)": grad_loop,
    "autograd.functional.hessian(vectorize=False)": autograd_functional(False),
    "autograd.functional.hessian(vectorize=True)": autograd_functional(True),
    "torch.func.hessian": func_hessian,
    f"jacrev(jacrev(f), chunk_size={JACREV_CHUNK})": jacrev_jacrev,
    "hesse.hessian": hesse_hessian(),
}
HESSE = "hesse.hessian"
REFERENCE = "torch.func.hessian"
N_CALL_LOOPS = ("autograd.grad loop (N calls)", "autograd.functional.hessian(vectorize=False)")


def _dense(result: Any, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Any method's Hessian (a tensor or nested tuple of blocks) as one ``(n, n)`` matrix."""
    numels = [a.numel() for a in args]
    if isinstance(result, torch.Tensor):
        return result.reshape(sum(numels), sum(numels))
    return torch.cat(
        [
            torch.cat([b.reshape(numels[i], numels[j]) for j, b in enumerate(row)], 1)
            for i, row in enumerate(result)
        ],
        0,
    )


def run(quick: bool) -> list[dict[str, Any]]:
    """All (workload, method) rows; see the module docstring."""
    return run_selected(quick, WORKLOADS, METHODS)


def smoke() -> list[dict[str, Any]]:
    """Every method on two tiny workloads (seconds; for the runner's tests)."""
    tiny = {
        "sum-sin (n=50)": lambda: sum_sin(n=50),
        "tiny-mlp-params (n=41)": lambda: _tiny_mlp(),
    }
    return run_selected(True, tiny, METHODS, repeats=1)


def _tiny_mlp(seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    W1 = torch.randn(5, 4, generator=gen)
    b1 = torch.randn(5, generator=gen)
    W2 = torch.randn(3, 5, generator=gen)
    b2 = torch.randn(3, generator=gen)
    X = torch.randn(8, 4, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)

    def f(W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.tanh(X @ W1.T + b1) @ W2.T + b2, y)

    return f, (W1, b1, W2, b2)


def run_selected(
    quick: bool,
    workloads: dict[str, Callable[[], Problem]],
    methods: dict[str, Callable],
    *,
    repeats: int | None = None,
) -> list[dict[str, Any]]:
    """Rows for the given workloads and methods; every answer is checked (``max_abs_err``)."""
    prepare_process(threads=None)  # the runner (or the caller) sets the threads
    for f, args in (
        sum_sin(n=8),
        _tiny_mlp(),
    ):  # one-time set-up (imports, functorch) off the clock
        for method in methods.values():
            method(f, args)
    rows: list[dict[str, Any]] = []
    for wname, make in workloads.items():
        f, args = make()
        rows.extend(_run_workload(wname, f, args, methods, quick, repeats or (3 if quick else 7)))
    return rows


def _run_workload(
    wname: str,
    f: Callable[..., torch.Tensor],
    args: tuple[torch.Tensor, ...],
    methods: dict[str, Callable],
    quick: bool,
    repeats: int,
) -> list[dict[str, Any]]:
    n = sum(a.numel() for a in args)
    skipped = [name for name in methods if quick and n > 2000 and name in N_CALL_LOOPS]
    runs = {name: m for name, m in methods.items() if name not in skipped}
    budgeted = wname.startswith("mlp-params")
    if budgeted and HESSE in runs:
        runs[f"{HESSE}(memory_budget={BUDGET // MiB} MiB)"] = hesse_hessian(BUDGET)
    # The reference is torch.func.hessian's own first result (run first), or computed once.
    reference: list[torch.Tensor] = []
    if REFERENCE not in runs:
        reference.append(_dense(func_hessian(f, args), args))

    def summarize(name: str, result: Any) -> dict[str, Any]:
        dense = _dense(result, args)
        if not reference:
            assert name == REFERENCE, "the reference method runs first"
            reference.append(dense)
        return {"max_abs_err": (dense - reference[0]).abs().max().item()}

    order = sorted(runs, key=lambda name: name != REFERENCE)
    calls = {name: (lambda m=runs[name]: m(f, args)) for name in order}
    stats = measure(
        calls,
        repeats=repeats,
        max_seconds=4.0 if quick else 60.0,
        summarize=summarize,
    )
    rows = [
        {
            "workload": wname,
            "method": name,
            "time_s": None,
            "peak_mem_bytes": None,
            "note": f"skipped in --quick ({n} autograd calls)",
        }
        for name in skipped
    ]
    for name in runs:  # table order: as listed in METHODS
        row: dict[str, Any] = {"workload": wname, "method": name, **stats[name]}
        if budgeted and row["peak_mem_bytes"] is not None:
            fits = row["peak_mem_bytes"] <= BUDGET
            row["note"] = f"peak {'within' if fits else 'OVER'} {BUDGET // MiB} MiB"
        rows.append(row)
    return rows
