"""``hesse analyze --model`` on models nobody here wrote: a HuggingFace causal LM and a
torchvision ResNet (the example factories in ``examples/``), run as a command."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesse

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL_BUDGETS = (
    "--quick",
    "--num-eigenvalues", "2",
    "--eig-matvecs", "20",
    "--trace-matvecs", "8",
    "--diag-matvecs", "4",
    "--density-probes", "2",
    "--lanczos-steps", "6",
    "--layer-matvecs", "4",
    "--no-progress",
)  # fmt: skip


def _require(package: str) -> None:
    # (not importorskip: a CUDA torchvision wheel next to a CPU torch raises RuntimeError
    # on import; the example factories handle that themselves)
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")


def _wrapper(tmp_path: Path, module: str, kwargs: str) -> Path:
    """A factory file calling ``examples/<module>.factory(**kwargs)`` (small sizes)."""
    path = tmp_path / f"small_{module}.py"
    path.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(EXAMPLES)!r})
            from {module} import factory as example

            def factory():
                return example({kwargs})
            """
        )
    )
    return path


def _load(path: Path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        namespace: dict = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        return namespace["factory"]()
    finally:
        sys.path.remove(str(EXAMPLES))


def _analyze(factory: Path, out: Path) -> subprocess.CompletedProcess:
    code = "import sys; from hesse.cli import main; raise SystemExit(main(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = ["analyze", "--model", f"{factory}:factory", "--out", str(out), *SMALL_BUDGETS]
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out.parent,
        env=env,
    )


def _check_report(factory: Path, out: Path) -> None:
    """The report's loss and top eigenvalue against plain-torch references."""
    report = json.loads((out / "report.json").read_text())
    model, loss_fn, data = _load(factory)
    params = dict(model.named_parameters())
    theta = [p.detach().clone().requires_grad_(True) for p in params.values()]

    def mean_loss(ps):
        state = dict(zip(params, ps))
        total, count = 0.0, 0
        for inputs, targets in data:
            out_ = torch.func.functional_call(model, state, (inputs,))
            total = total + loss_fn(out_, targets) * targets.numel()
            count += targets.numel()
        return total / count

    # The math kernel of scaled_dot_product_attention has a double backward.
    with sdpa_kernel(SDPBackend.MATH):
        _check_eigenvalues(report, mean_loss, theta)
    # The Becker-LeCun check: its measured error, as the library computes it directly.
    bl = report["diagonal"]["becker_lecun"]
    H = hesse.HessianOperator(model, loss_fn, data)
    exact = hesse.diagonal(H, method="exact").double()
    approx = hesse.diagonal(H, method="becker-lecun").double()
    expected = float((approx - exact).norm() / exact.norm())
    assert bl["relative_error"] == pytest.approx(expected, rel=1e-4)
    assert bl["num_parameters"] == H.shape[0]


def _check_eigenvalues(report, mean_loss, theta) -> None:
    loss = mean_loss(theta)
    assert report["loss"] == pytest.approx(float(loss), rel=1e-5)
    eig = report["hessian_eigenvalues"]
    assert len(eig["eigenvalues"]) == 2
    # Rayleigh quotients of random directions (plain double backward) lie below the
    # largest Ritz value (itself the largest Rayleigh quotient over a Krylov space).
    grads = torch.autograd.grad(loss, theta, create_graph=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = [torch.randn(t.shape, generator=g) for t in theta]
        hv = torch.autograd.grad(grads, theta, v, retain_graph=True)
        quotient = sum((a * b).sum() for a, b in zip(v, hv)) / sum((a * a).sum() for a in v)
        assert float(quotient) <= eig["eigenvalues"][0] * (1 + 1e-4) + 1e-7


@pytest.mark.parametrize(
    ("library", "example", "options"),
    [
        ("torchvision", "resnet_factory", "width=2, batches=1, batch_size=2, size=8"),
        # The library's default attention (scaled_dot_product_attention) and logits
        # flattened to (B*T, V): cross-entropy averages over every token.
        ("transformers", "gpt2_factory", "batches=1, batch_size=2, context=4"),
    ],
    ids=["torchvision-resnet", "huggingface-causal-lm"],
)
def test_example_factory(tmp_path, library, example, options):
    _require(library)
    factory = _wrapper(tmp_path, example, options)
    out = tmp_path / "report"
    proc = _analyze(factory, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_report(factory, out)
