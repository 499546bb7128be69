"""Run a function on N local processes joined by a process group (tests, benchmarks, trials).

This is a small stand-in for ``torchrun`` on one machine: it spawns the ranks,
sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``, initialises ``torch.distributed``
with a timeout (rendezvous through a file store in a fresh temporary directory, so
that concurrent launches, e.g. under pytest-xdist, never race for a TCP port),
runs ``fn(*args)`` on every rank and hands back what each rank returned or
raised. Production jobs use ``torchrun`` (see docs/distributed.md).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp


@dataclass(frozen=True)
class RankResult:
    """What one rank returned or raised.

    Attributes:
        rank: the rank.
        value: ``fn``'s return value (``None`` if it raised or exited).
        error: ``"TypeName: message"`` if ``fn`` raised, else ``None``.
        traceback: the formatted traceback if ``fn`` raised.
        exitcode: the process's exit code (``None`` if it was killed at the deadline).
        seconds: wall time of ``fn`` on that rank (``None`` without a result).
    """

    rank: int
    value: Any
    error: str | None
    traceback: str | None
    exitcode: int | None
    seconds: float | None


def _entry(
    rank: int,
    world_size: int,
    store: str,
    backend: str,
    timeout: float,
    num_threads: int | None,
    fn: Callable[..., Any],
    args: Sequence[Any],
    path: str,
) -> None:
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    out: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        start = time.perf_counter()
        out["value"] = fn(*args)
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc()
    out["seconds"] = time.perf_counter() - start
    with open(path, "wb") as fh:
        pickle.dump(out, fh)
    if "error" in out:
        # Do not wait in destroy_process_group for peers that may be gone.
        os._exit(1)
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout: float = 60.0,
    deadline: float = 300.0,
    num_threads: int | None = 1,
    check: bool = True,
) -> list[RankResult]:
    """Run ``fn(*args)`` on ``nprocs`` spawned ranks of one process group.

    Args:
        fn: a module-level (picklable) function; it may call ``torch.distributed``.
        nprocs: the number of ranks.
        args: positional arguments for ``fn`` (picklable).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per rank).
        timeout: the process group's collective timeout, in seconds.
        deadline: seconds after which ranks still running are killed.
        num_threads: ``torch.set_num_threads`` on each rank (``None``: leave it).
        check: raise ``RuntimeError`` (with the tracebacks) if any rank failed.

    Returns:
        One :class:`RankResult` per rank, in rank order.
    """
    # NOTE: a fork server imports torch once; each rank is then a cheap fork of a
    # process that never ran a parallel region (forking the caller, whose thread
    # pools may be running, is not safe; spawning re-imports torch for every rank).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "torch",
            "torch.distributed",
            "torch._dynamo",
            "torch._decomp.decompositions_for_jvp",
            "hesse",
        ]
    )
    with tempfile.TemporaryDirectory(prefix="hesse-launch-") as tmp:
        paths = [os.path.join(tmp, f"rank{r}.pkl") for r in range(nprocs)]
        procs = [
            ctx.Process(
                target=_entry,
                args=(
                    r,
                    nprocs,
                    os.path.join(tmp, "store"),
                    backend,
                    timeout,
                    num_threads,
                    fn,
                    tuple(args),
                    paths[r],
                ),
                daemon=True,
            )
            for r in range(nprocs)
        ]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r, (p, path) in enumerate(zip(procs, paths)):
            out: dict[str, Any] = {}
            if os.path.exists(path):
                with open(path, "rb") as fh:
                    out = pickle.load(fh)
            timed_out = p.exitcode is not None and p.exitcode < 0 and not out
            results.append(
                RankResult(
                    rank=r,
                    value=out.get("value"),
                    error=out.get("error")
                    or (None if out else f"no result (exit code {p.exitcode})"),
                    traceback=out.get("traceback"),
                    exitcode=None if timed_out else p.exitcode,
                    seconds=out.get("seconds"),
                )
            )
    if check and any(res.error for res in results):
        report = "\n".join(
            f"--- rank {res.rank}: {res.error}\n{res.traceback or ''}"
            for res in results
            if res.error
        )
        raise RuntimeError(
            f"hesse.distributed.launch: {sum(bool(r.error) for r in results)} rank(s) failed:\n{report}"
        )
    return results
