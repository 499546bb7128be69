"""The result type of every stochastic estimator: a value with its standard error."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate with its error bar.

    Attributes:
        value: the estimate (a scalar tensor for traces, a tensor shaped like the
            diagonal for diagonals).
        stderr: the estimated standard error of ``value`` (same shape), from the
            spread of the independent probes.
        num_matvecs: operator products spent.
    """

    value: torch.Tensor
    stderr: torch.Tensor
    num_matvecs: int

    def confidence_interval(self, z: float = 1.96) -> tuple[torch.Tensor, torch.Tensor]:
        """``value -+ z * stderr`` (a normal-approximation interval; z=1.96 for 95 %)."""
        return self.value - z * self.stderr, self.value + z * self.stderr
