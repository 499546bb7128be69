"""Random probe vectors, drawn only from an explicit generator.

# NOTE [probes]
Every stochastic algorithm in hesse draws its vectors here. Probes come from the
caller's ``torch.Generator`` (a fixed-seed one when ``None`` is passed, never the
global RNG), are drawn on the generator's device and then moved to the operator's
device and dtype. So two processes holding identically seeded generators draw
identical probes, which is what distributed operators rely on.
"""

from __future__ import annotations

import torch

#: seed of the generator used when the caller passes ``generator=None``.
DEFAULT_SEED = 0


def resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator`` itself, or a fresh CPU generator seeded with :data:`DEFAULT_SEED`."""
    return torch.Generator().manual_seed(DEFAULT_SEED) if generator is None else generator


def rademacher(
    n: int, k: int, *, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(n, k)`` independent random signs (+1 or -1)."""
    # Drawn directly in a float dtype (the same bits as an int64 draw) and mapped to
    # +-1 in place: no n x k int64 temporaries on large operators.
    draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    signs = torch.randint(
        0, 2, (n, k), generator=generator, device=generator.device, dtype=draw_dtype
    )
    return signs.mul_(2).sub_(1).to(dtype=dtype, device=device)


def gaussian(
    n: int, k: int, *, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(n, k)`` independent standard normal entries."""
    draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    out = torch.randn((n, k), generator=generator, device=generator.device, dtype=draw_dtype)
    return out.to(dtype=dtype, device=device)


def stream_seed(generator: torch.Generator | None) -> int:
    """The key of a stream for :func:`keyed_generator`, drawn once from ``generator``
    (a generator seeded with 0 when ``None``, so results are reproducible by default)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))


def keyed_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """A generator for item ``index`` of a stream keyed by ``seed`` (e.g. one per batch).

    The same ``(seed, index)`` gives the same draws in every pass and on every rank,
    which makes sampled operators (MC Fisher, MC KFAC) fixed and data-parallel.
    """
    g = torch.Generator(device=device)
    g.manual_seed((seed + 1_000_003 * index) % 2**63)
    return g
