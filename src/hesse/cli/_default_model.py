"""The model ``hesse analyze`` reports on when given none: a small MLP on the digits data.

scikit-learn ships the 8 x 8 digits data set (1,797 images, 10 classes) inside the
package, so nothing is downloaded. The MLP (64 -> 32 -> 10, tanh) is trained with
full-batch Adam for a fixed number of steps from a seeded initialisation, so the
same seed gives the same model, and hence the same report, on every run.

Start-up time matters for a command: the data file is read directly when it is
where scikit-learn keeps it (``sklearn.datasets.load_digits`` reads the same file
but first imports all of scikit-learn and SciPy's statistics, seconds on a busy
machine), and the Adam steps are written out here because ``torch.optim`` imports
the compiler stack on first use.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: Adam steps for the full and the ``--quick`` default model.
STEPS = 400
QUICK_STEPS = 60
#: samples used by ``--quick`` (the full run uses all 1,797).
QUICK_SAMPLES = 256
#: samples per batch (8 batches in a full run, 2 with ``--quick``: enough for 2+ ranks).
BATCH_SIZE = 256
QUICK_BATCH_SIZE = 128


def digits_mlp(
    *, seed: int = 0, quick: bool = False, dtype: torch.dtype = torch.float64
) -> tuple[nn.Module, nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Train the default model; return ``(model, loss_fn, data)`` like a user's factory.

    Args:
        seed: seeds the initialisation (nothing else is random: full-batch training).
        quick: a smaller model run (256 samples, 60 steps) for tests and smoke runs.
        dtype: floating-point type of the model and data.

    Returns:
        The trained model (in eval mode), ``nn.CrossEntropyLoss()`` and the data as
        a list of ``(inputs, targets)`` batches of 256 samples (128 with ``quick``).

    Cost: ``STEPS`` full-batch forward and backward passes (about a second on a CPU).

    Example:
        >>> model, loss_fn, data = digits_mlp(quick=True)
        >>> sum(p.numel() for p in model.parameters())
        2410
    """
    pixels, labels = _digits()
    X = torch.as_tensor(pixels, dtype=dtype) / 16.0
    y = torch.as_tensor(labels, dtype=torch.long)
    if quick:
        X, y = X[:QUICK_SAMPLES], y[:QUICK_SAMPLES]
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)
    with torch.no_grad():  # a seeded initialisation that does not touch the global RNG
        for layer in (model[0], model[2]):
            bound = layer.in_features**-0.5
            layer.weight.copy_(
                torch.rand(layer.weight.shape, generator=gen, dtype=dtype) * 2 * bound - bound
            )
            layer.bias.copy_(
                torch.rand(layer.bias.shape, generator=gen, dtype=dtype) * 2 * bound - bound
            )
    loss_fn = nn.CrossEntropyLoss()
    _adam(model, lambda: loss_fn(model(X), y), QUICK_STEPS if quick else STEPS)
    model.eval()
    size = QUICK_BATCH_SIZE if quick else BATCH_SIZE
    data: list[tuple[Any, Any]] = [
        (X[i : i + size], y[i : i + size]) for i in range(0, X.shape[0], size)
    ]
    return model, loss_fn, data


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits pixels ``(1797, 64)`` and labels ``(1797,)`` bundled with scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # the file moved: take the public route

    digits = load_digits()
    return digits.data, digits.target


def _adam(model: nn.Module, loss: Any, steps: int, lr: float = 1e-2) -> None:
    """``steps`` full-batch Adam updates (Kingma & Ba, 2015; default betas, eps 1e-8)."""
    params = [p for p in model.parameters() if p.requires_grad]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        grads = torch.autograd.grad(loss(), params)
        with torch.no_grad():
            for p, g, mi, vi in zip(params, grads, m, v):
                mi.mul_(b1).add_(g, alpha=1 - b1)
                vi.mul_(b2).addcmul_(g, g, value=1 - b2)
                step = lr / (1 - b1**t)
                p.addcdiv_(mi, (vi / (1 - b2**t)).sqrt_().add_(eps), value=-step)
