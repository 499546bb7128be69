"""Who am I, how many are we, and collectives that fail loudly instead of hanging.

# NOTE [failure]
A data-parallel computation is a sequence of *steps*: every rank computes a
local part, then the parts are combined by one collective. Two things can go
wrong, and neither may leave a rank waiting forever:

* **A rank raises** while computing its part (a bad batch, out of memory, a bug).
  Every step is guarded: the failing rank still joins the step's collective,
  contributing a failure flag in a slot of its own, and then re-raises its own
  exception. The other ranks see the flag and raise :class:`DistributedError`
  naming the failed rank(s), at once. Where the part's shape is known to every
  rank up front (the dense Hessian's column blocks) the flags travel in the same
  buffer as the data (:func:`gather_rows`); where it is not (a data pass, whose
  result shape only the per-batch function knows) a small status table goes
  first (:func:`exchange`) and the data follows (:func:`all_reduce_`).
* **A rank disappears or stalls** (killed, crashed outside hesse, stopped calling
  the same functions). Every collective waits at most ``timeout`` (the process
  group's own timeout unless one is given), then the waiting ranks raise
  :class:`DistributedError`; a crashed peer usually closes its connections and the
  error comes sooner.

Status tables also carry a checksum of the step's input vectors, so that every
rank can check that all passed the same ones (:func:`check_same`): a rank that
drew its random probes from an unseeded source would otherwise silently
corrupt the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hesse._validation import describe, fail


class DistributedError(RuntimeError):
    """Another rank failed, disappeared or disagreed; this rank stops too."""


@dataclass(frozen=True)
class Context:
    """The process group a distributed computation runs on.

    Attributes:
        group: the ``torch.distributed`` process group, or ``None`` when running
            alone (``torch.distributed`` not initialised): then every step is local.
        rank: this process's rank within ``group`` (0 when alone).
        world_size: the number of ranks (1 when alone).
        timeout: the most a collective may wait, or ``None`` for the group's own
            timeout (``torch.distributed.init_process_group(timeout=...)``).
        backend: ``"gloo"``, ``"nccl"``, ... (``"local"`` when alone).
    """

    group: Any
    rank: int
    world_size: int
    timeout: timedelta | None
    backend: str

    @property
    def alone(self) -> bool:
        return self.group is None

    def where(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def resolve(
    call: str,
    process_group: Any = None,
    timeout: float | timedelta | None = None,
) -> Context:
    """The context for ``process_group`` (default: the initialised default group).

    Without ``process_group`` and without an initialised ``torch.distributed`` the
    computation runs in this process alone.
    """
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float, timedelta)):
            fail(
                call,
                f"expected timeout in seconds (a number) or a timedelta, got {describe(timeout)}.",
                TypeError,
            )
        timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        if timeout.total_seconds() <= 0:
            fail(call, f"timeout should be positive, got {timeout.total_seconds()} s.")
    if not dist.is_available():
        if process_group is not None:
            fail(
                call,
                "this PyTorch build has no torch.distributed; pass process_group=None.",
                RuntimeError,
            )
        return Context(None, 0, 1, timeout, "local")
    if process_group is None:
        if not dist.is_initialized():
            return Context(None, 0, 1, timeout, "local")
        process_group = dist.group.WORLD
    elif not isinstance(process_group, dist.ProcessGroup):
        fail(
            call,
            f"expected process_group to be a torch.distributed.ProcessGroup or None, got "
            f"{describe(process_group)}. Create one with torch.distributed.new_group(...).",
            TypeError,
        )
    if not dist.is_initialized():
        fail(
            call,
            "torch.distributed is not initialised; call torch.distributed.init_process_group first.",
            RuntimeError,
        )
    rank = dist.get_rank(process_group)
    if rank < 0:
        fail(
            call,
            "this process is not a member of process_group; create the operator only on its members.",
        )
    world = dist.get_world_size(process_group)
    return Context(process_group, rank, world, timeout, str(dist.get_backend(process_group)))


def collective_device(ctx: Context, like: torch.device) -> torch.device:
    """The device collective buffers live on (CUDA for NCCL, else ``like``)."""
    if ctx.backend == "nccl" and like.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return like


# -- guarded collectives ------------------------------------------------------------
def _wait(ctx: Context, call: str, what: str, work: Any) -> None:
    try:
        if ctx.timeout is None:
            work.wait()
        else:
            work.wait(timeout=ctx.timeout)
    except Exception as err:  # noqa: BLE001 - every backend error means the same here
        _raise_lost(ctx, call, what, err)


def _raise_lost(ctx: Context, call: str, what: str, err: BaseException) -> None:
    limit = (
        f"{ctx.timeout.total_seconds():g} s"
        if ctx.timeout is not None
        else "the process group's timeout (torch.distributed.init_process_group(timeout=...))"
    )
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    raise DistributedError(
        f"{call}: the {what} across {ctx.world_size} ranks failed on {ctx.where()} "
        f"({type(err).__name__}: {first}). Another rank has probably crashed, exited, or "
        "stopped making the same hesse calls in the same order (every rank must); "
        f"collectives wait at most {limit}. Check the other ranks' logs."
    ) from err


def checksum(inputs: torch.Tensor | None) -> float:
    """A number that differs, almost surely, between different input tensors."""
    if inputs is None or inputs.numel() == 0:
        return 0.0
    flat = inputs.detach().reshape(-1).to(torch.float64)
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return float((flat * weights).sum())


def _raise_failed(ctx: Context, call: str, flags: torch.Tensor) -> None:
    failed = [r for r in range(ctx.world_size) if flags[r] != 0]
    if failed:
        who = ", ".join(str(r) for r in failed)
        raise DistributedError(
            f"{call}: rank(s) {who} of {ctx.world_size} raised an error during this step "
            f"(see their traceback); {ctx.where()} stops too, so that no rank waits for them."
        )


def exchange(
    ctx: Context, call: str, values: Sequence[float], *, failed: bool = False
) -> torch.Tensor:
    """Every rank's ``values`` as a ``(world_size, len(values))`` table: a status step.

    One all-reduce of a small table in which each rank fills its own row, plus a
    failure flag per rank (see NOTE [failure]). A rank whose local work raised
    calls it with ``failed=True`` (its ``values`` are ignored) and then re-raises
    its own exception; the others raise :class:`DistributedError` here.

    Raises:
        DistributedError: another rank failed, disappeared or stalled past the
            timeout (never raised with ``failed=True``: the caller's own error wins).
    """
    width = len(values) + 1
    if ctx.alone:
        return torch.tensor([list(values)], dtype=torch.float64)
    dev = collective_device(ctx, torch.device("cpu"))
    table = torch.zeros(ctx.world_size, width, dtype=torch.float64)
    table[ctx.rank, 0] = 1.0 if failed else 0.0
    if not failed:
        table[ctx.rank, 1:] = torch.tensor(list(values), dtype=torch.float64)
    table = table.to(dev)
    try:
        _wait(ctx, call, "status exchange", dist.all_reduce(table, group=ctx.group, async_op=True))
    except DistributedError:
        if failed:
            return table.new_zeros(ctx.world_size, width - 1)
        raise
    table = table.cpu()
    if not failed:
        _raise_failed(ctx, call, table[:, 0])
    return table[:, 1:]


def all_reduce_(ctx: Context, call: str, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (a bounded wait; see NOTE [failure])."""
    if ctx.alone:
        return tensor
    dev = collective_device(ctx, tensor.device)
    buf = tensor if dev == tensor.device and tensor.is_contiguous() else tensor.to(dev).contiguous()
    _wait(ctx, call, "sum", dist.all_reduce(buf, group=ctx.group, async_op=True))
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def check_same(ctx: Context, call: str, what: str, column: torch.Tensor) -> None:
    """Raise unless every rank's entry of ``column`` (from :func:`exchange`) agrees."""
    # A relative tolerance, not equality: devices of different kinds may round a checksum's
    # sum differently; genuinely different inputs differ in the leading digits.
    mine = float(column[ctx.rank])
    bad = [
        r
        for r in range(ctx.world_size)
        if abs(float(column[r]) - mine) > 1e-9 * max(abs(float(column[r])), abs(mine))
    ]
    if bad:
        raise DistributedError(
            f"{call}: the ranks disagree on {what} ({ctx.where()}: {column[ctx.rank].item():.17g}, "
            f"rank {bad[0]}: {column[bad[0]].item():.17g}). Every rank must make the same calls "
            "with the same arguments; draw random vectors from a torch.Generator seeded "
            "identically on every rank (e.g. torch.Generator().manual_seed(0)), never from the "
            "global RNG."
        )


def gather_rows(
    ctx: Context,
    call: str,
    compute: Callable[[], torch.Tensor],
    *,
    counts: list[int],
    width: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Stack every rank's ``(counts[rank], width)`` block in rank order, a guarded step.

    Returns the ``(sum(counts), width)`` result on every rank. Blocks are padded to
    the largest count for the collective; the padding never reaches the result.
    """
    if ctx.alone:
        return compute()
    most = max(counts)
    numel = most * width
    dev = collective_device(ctx, device)
    buf = torch.zeros(numel + 1, dtype=dtype, device=dev)
    error: BaseException | None = None
    try:
        part = compute()
        expected = (counts[ctx.rank], width)
        if tuple(part.shape) != expected:
            raise AssertionError(
                f"{call}: a local block of shape {tuple(part.shape)}, expected {expected}"
            )
        buf[: part.numel()] = part.reshape(-1)
    except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
        error = err
        buf.zero_()
        buf[numel] = 1
    bufs = [torch.empty_like(buf) for _ in range(ctx.world_size)]
    try:
        _wait(ctx, call, "gather", dist.all_gather(bufs, buf, group=ctx.group, async_op=True))
    except DistributedError:
        if error is not None:
            raise error from None
        raise
    if error is not None:
        raise error
    _raise_failed(ctx, call, torch.stack([b[numel] for b in bufs]).cpu())
    blocks = [b[: c * width].reshape(c, width) for b, c in zip(bufs, counts)]
    return torch.cat(blocks).to(device)


def agree(
    ctx: Context, call: str, what: str, values: Callable[[], Sequence[float]], *, width: int
) -> list[float]:
    """Check that every rank computes the same ``width`` numbers (a guarded step).

    ``values`` runs inside the step, so a rank whose setup raises there still
    releases the others. Returns this rank's values.
    """
    try:
        mine = [float(v) for v in values()]
        assert len(mine) == width, f"{call}: {len(mine)} values, expected {width}"
    except Exception:
        exchange(ctx, call, [0.0] * width, failed=True)
        raise
    table = exchange(ctx, call, mine)
    for j in range(width):
        check_same(ctx, call, what, table[:, j])
    return mine


def check_alive(ctx: Context, call: str) -> None:
    """Wait until every rank has arrived, or fail naming the ranks that did not.

    With gloo this is ``torch.distributed.monitored_barrier`` (which reports the
    missing ranks); with other backends a status exchange.
    """
    if ctx.alone:
        return
    if ctx.backend == "gloo":
        try:
            dist.monitored_barrier(group=ctx.group, timeout=ctx.timeout, wait_all_ranks=True)
        except Exception as err:  # noqa: BLE001 - reported as a DistributedError
            _raise_lost(ctx, call, "barrier", err)
        return
    exchange(ctx, call, [])
