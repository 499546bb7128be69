"""Scale: real models (issue 15): a small GPT-2 and a ResNet-18 block, default threads.

Rows:

- ``gpt2/diag-exact``: the exact Hessian diagonal of a small random-init GPT-2
  (HuggingFace ``transformers``, logits flattened to ``(B*T, V)``, cross-entropy over
  tokens). hesse: ``hesse.diagonal(HessianOperator, "exact")`` (curvature
  backpropagation); brute force: one double backward per parameter, batched
  (``is_grads_batched``) over rows of the identity. ``error`` = max abs difference.
- ``gpt2/product``: one Hessian-vector product. hesse: ``HessianOperator @ v``
  (rebuilds the gradient graph: forward + backward + double backward), hesse with
  ``cache_graphs=True`` (the kept graph: one double backward), and the cached
  autograd product (``torch.autograd.grad`` through a graph built once, outside the
  timing).
- ``resnet18-block/eigsh-top5``: ``hesse.eigsh(H, 5)`` on the Hessian of one
  ResNet-18 block (torchvision, random init, eval mode, random 32x32 images), with
  the time split between operator products and Lanczos's linear algebra
  (``EigshResult.product_seconds`` / ``total_seconds``). Full run: ``layer4.1``
  (4.7M parameters); ``--quick``: ``layer3.1`` (1.2M) and a smaller budget.
- ``resnet18-block/diag-exact``: the exact Hessian diagonal over ResNet-18's
  ``layer1.0`` (74k parameters, float64, batch 8; ``--quick``: 2): hesse against the
  brute force, time-capped (its first entries, time scaled to all ``n``).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hesse
import hesse.testing

try:  # as a package (benchmarks.run) or as a script folder on sys.path
    from benchmarks._measure import measure
except ImportError:  # pragma: no cover
    from _measure import measure  # type: ignore[no-redef]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _examples() -> None:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))


# -- GPT-2 --------------------------------------------------------------------------
def gpt2(quick: bool, attention: str | None = None) -> tuple[nn.Module, nn.Module, list]:
    _examples()
    from gpt2_factory import factory

    return factory(
        width=16 if quick else 32,
        context=8,
        batches=1,
        batch_size=4,
        attention=attention,
    )


def _gpt2_operator(quick: bool, **kwargs: Any) -> tuple[hesse.HessianOperator, str]:
    """The GPT-2 Hessian with HuggingFace's default attention, or eager if that fails."""
    for attention in (None, "eager"):
        model, loss_fn, data = gpt2(quick, attention)
        model = model.double()
        params = [k for k, _ in model.named_parameters() if ".h.0." in k] if quick else None
        H = hesse.HessianOperator(model, loss_fn, data, params=params, **kwargs)
        try:
            H @ torch.zeros(H.shape[0], dtype=H.dtype)
            return H, attention or "default (sdpa)"
        except RuntimeError:
            if attention is not None:
                raise
    raise AssertionError("unreachable")


def _brute_force_diagonal(
    H: hesse.HessianOperator, chunk: int = 256, stop: int | None = None
) -> torch.Tensor:
    """One double backward per parameter, ``chunk`` rows of the identity at a time.

    ``stop``: only the first ``stop`` diagonal entries (a time-capped baseline).
    """
    x = H._x.detach().requires_grad_(True)
    (inputs, targets) = H._unpack(next(iter(H.data)))
    with torch.enable_grad():
        loss = H.loss_fn(H._forward(x, inputs), targets)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
    n = x.numel()
    last = n if stop is None else min(n, stop)
    out = torch.empty(last, dtype=x.dtype)
    for start in range(0, last, chunk):
        stop = min(last, start + chunk)
        E = torch.zeros(stop - start, n, dtype=x.dtype)
        E[torch.arange(stop - start), torch.arange(start, stop)] = 1
        (rows,) = torch.autograd.grad(g, x, E, retain_graph=True, is_grads_batched=True)
        out[start:stop] = rows[torch.arange(stop - start), torch.arange(start, stop)]
    return out


def gpt2_rows(quick: bool) -> list[dict[str, Any]]:
    H, attention = _gpt2_operator(quick)
    rows: list[dict[str, Any]] = []
    results: dict[str, torch.Tensor] = {}
    workload = f"gpt2/diag-exact (n={H.shape[0]}, attention {attention})"
    try:
        hesse.diagonal(H, method="exact")
    except Exception as err:  # noqa: BLE001 - report the failure as a row, go on
        rows.append(
            {
                "workload": workload,
                "method": "hesse diagonal(exact)",
                "note": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}",
            }
        )
        return rows + _product_rows(quick, H)

    def keep(name: str, value: torch.Tensor) -> dict[str, Any]:
        results[name] = value
        return {}

    timings = measure(
        {
            "hesse diagonal(exact)": lambda: hesse.diagonal(H, method="exact"),
            "brute force (n double backwards)": lambda: _brute_force_diagonal(H),
        },
        repeats=1 if quick else 3,
        max_seconds=60,
        summarize=keep,
    )
    ref = results["brute force (n double backwards)"]
    for name, t in timings.items():
        rows.append(
            {
                "workload": workload,
                "method": name,
                **t,
                "error": float((results[name] - ref).abs().max()),
                "reference": name.startswith("hesse"),
            }
        )

    return rows + _product_rows(quick, H)


def _product_rows(quick: bool, H: hesse.HessianOperator) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cached, _ = _gpt2_operator(quick, cache_graphs=True)
    v = torch.randn(H.shape[0], dtype=H.dtype, generator=torch.Generator().manual_seed(0))
    cached @ v  # keeps the graph
    x = H._x.detach().requires_grad_(True)
    inputs, targets = H._unpack(next(iter(H.data)))
    with torch.enable_grad():
        (g,) = torch.autograd.grad(H.loss_fn(H._forward(x, inputs), targets), x, create_graph=True)

    def autograd_product() -> torch.Tensor:
        return torch.autograd.grad(g, x, v, retain_graph=True)[0]

    timings = measure(
        {
            "hesse HessianOperator @ v": lambda: H @ v,
            "hesse HessianOperator(cache_graphs=True) @ v": lambda: cached @ v,
            "cached autograd product": autograd_product,
        },
        repeats=5 if quick else 20,
        max_seconds=30,
    )
    ref_v = autograd_product()
    for name, t in timings.items():
        value = {
            "hesse HessianOperator @ v": H,
            "hesse HessianOperator(cache_graphs=True) @ v": cached,
        }
        got = value[name] @ v if name in value else ref_v
        rows.append(
            {
                "workload": f"gpt2/product (n={H.shape[0]})",
                "method": name,
                **t,
                "error": float((got - ref_v).abs().max()),
                "reference": name == "hesse HessianOperator @ v",
            }
        )
    return rows


# -- ResNet-18 block ----------------------------------------------------------------
def _resnet18() -> nn.Module | None:
    """A random-init torchvision ResNet-18 (10 classes, eval mode), or None without it."""
    hesse.testing.torchvision_cpu_shim()
    try:
        import torchvision as tv
    except ImportError:
        return None
    torch.manual_seed(0)
    return tv.models.resnet18(num_classes=10).eval()


def resnet_rows(quick: bool) -> list[dict[str, Any]]:
    model = _resnet18()
    if model is None:
        return [
            {"workload": "resnet18-block/eigsh-top5", "method": "hesse", "note": "no torchvision"}
        ]
    block = "layer3.1" if quick else "layer4.1"
    names = [k for k, _ in model.named_parameters() if k.startswith(block + ".conv")]
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))]
    H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), data, params=names)
    budget = 40 if quick else 150
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a capped budget may leave pairs unconverged
        result = hesse.eigsh(H, 5, max_matvecs=budget, generator=torch.Generator().manual_seed(0))
    wall = time.perf_counter() - start
    linalg = result.total_seconds - result.product_seconds
    return [
        {
            "workload": f"resnet18-block/eigsh-top5 ({block}, n={H.shape[0]})",
            "method": "hesse eigsh",
            "time_s": wall,
            "peak_mem_bytes": None,
            "matvecs": result.num_matvecs,
            "converged": int(result.converged.sum()),
            "product_s": round(result.product_seconds, 3),
            "linalg_s": round(linalg, 3),
            "linalg_share": round(linalg / result.total_seconds, 3),
            "reference": True,
        }
    ]


def resnet_diagonal_rows(quick: bool) -> list[dict[str, Any]]:
    """``resnet18-block/diag-exact``: the exact Hessian diagonal over ``layer1.0``.

    hesse: ``hesse.diagonal(HessianOperator, "exact")``. Brute force: one double
    backward per parameter, time-capped: the first ``m`` entries are computed and
    the time is scaled by ``n / m`` (``extrapolated``); ``error`` compares those
    entries.
    """
    model = _resnet18()
    if model is None:
        return [
            {"workload": "resnet18-block/diag-exact", "method": "hesse", "note": "no torchvision"}
        ]
    model = model.double()
    names = [k for k, _ in model.named_parameters() if k.startswith("layer1.0")]
    g = torch.Generator().manual_seed(0)
    b = 2 if quick else 8
    x = torch.randn(b, 3, 32, 32, generator=g, dtype=torch.float64)
    data = [(x, torch.randint(0, 10, (b,), generator=g))]
    H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), data, params=names)
    n, m = H.shape[0], 32 if quick else 256
    results: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> dict[str, Any]:
        results[name] = value
        return {}

    timings = measure(
        {
            "hesse diagonal(exact)": lambda: hesse.diagonal(H, method="exact"),
            f"brute force ({m} of n double backwards)": lambda: _brute_force_diagonal(
                H, chunk=32, stop=m
            ),
        },
        repeats=1 if quick else 3,
        max_seconds=120,
        summarize=keep,
    )
    brute = f"brute force ({m} of n double backwards)"
    ref = results[brute]
    error = float((results["hesse diagonal(exact)"][:m] - ref).abs().max())
    workload = f"resnet18-block/diag-exact (layer1.0, n={n}, batch {b})"
    hesse_row = {"workload": workload, "method": "hesse diagonal(exact)"}
    hesse_row.update(timings["hesse diagonal(exact)"], error=error, reference=True)
    scaled = {
        k: v * n / m if k in ("time_s", "cpu_s") and v else v for k, v in timings[brute].items()
    }
    brute_row = {"workload": workload, "method": "brute force (n double backwards)"}
    brute_row.update(scaled, extrapolated=f"from {m} of {n}", error=0.0)
    return [hesse_row, brute_row]


def run(quick: bool) -> list[dict[str, Any]]:
    # Default threads (the issue's setting), unlike the other suites' one thread.
    return gpt2_rows(quick) + resnet_rows(quick) + resnet_diagonal_rows(quick)


if __name__ == "__main__":  # pragma: no cover
    for row in run("--quick" in sys.argv):
        print(row, flush=True)
