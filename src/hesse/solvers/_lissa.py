"""LiSSA: the Neumann recursion with a sampled operator per step (Agarwal et al., 2017).

# NOTE [lissa stochasticity]
LiSSA replaces ``A`` in the Neumann recursion (NOTE [neumann]) by an unbiased
sample ``A_j`` drawn afresh at every step, typically the curvature of one
mini-batch:

.. math:: h_0 = b, \\quad h_{j+1} = b + \\Big(I - \\frac{A_j + \\lambda I}{s}\\Big) h_j,
          \\quad x = h_J / s.

Because the samples are independent, ``E[x]`` is exactly the depth-``J`` Neumann
partial sum. The caller provides the stochasticity explicitly: ``samples`` is a
sequence of operators (each an unbiased estimate of ``A``, e.g. one
``GGNOperator`` per mini-batch of equal size) and every step draws one uniformly
with ``generator``. ``repeats`` independent recursions are averaged, and their
spread gives the standard error of every entry of ``x`` (``result.stderr``). The
remaining error is the truncation bias ``|| (I - C/s)^{J+1} C^{-1} b ||``, which
``depth`` controls. Without ``samples`` the recursion uses ``A`` itself and is
deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hesse.operators._base import LinearOperator
from hesse.solvers._neumann import DIVERGED, diverging
from hesse.solvers._system import Outcome, System, column_norms, exhausted


def lissa(
    system: System,
    B: torch.Tensor,
    *,
    scale: float,
    depth: int,
    repeats: int,
    samples: Sequence[LinearOperator] | None,
    generator: torch.Generator | None,
) -> Outcome:
    """``repeats`` stochastic Neumann recursions of ``depth`` steps, averaged."""
    k = B.shape[1]
    bnorms = column_norms(B)
    estimates = []
    for _ in range(repeats):
        H = B.clone()
        for step in range(depth):
            if not system.affords(k):
                return Outcome(_mean(estimates, H) / scale, step, exhausted(system))
            if samples is None:
                CH = system(H)
            else:
                pick = int(torch.randint(len(samples), (1,), generator=generator))
                CH = samples[pick]._matmat(H) + system.damping * H
                system.num_matvecs += k
            H = B + H - CH / scale
            norms = column_norms(H)
            if not bool(torch.isfinite(norms).all()) or bool(
                (norms > DIVERGED * depth * bnorms).any()
            ):
                return Outcome(H / scale, step + 1, diverging(scale))
        estimates.append(H)
    stack = torch.stack(estimates) / scale
    stderr = stack.std(0) / repeats**0.5 if repeats > 1 else None
    return Outcome(stack.mean(0), depth * repeats, stderr=stderr, estimates=stack)


def _mean(done: list[torch.Tensor], current: torch.Tensor) -> torch.Tensor:
    return torch.stack(done).mean(0) if done else current
