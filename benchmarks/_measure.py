"""Time and peak memory of one call, measured the same way for every method.

# NOTE [peak memory]
Peak memory is the growth of the process's resident set during the first call:
Linux's RSS high-water mark (``VmHWM`` in ``/proc/self/status``) is reset to the
current RSS just before the call (``/proc/self/clear_refs``) and read just after,
minus the RSS at the reset. Everything the call touches counts (tensors, autograd
graphs, vmap batches, Python objects). To make freed memory leave the RSS between
methods, glibc serves every allocation of 64 KiB or more with its own ``mmap``
(returned to the system on free) during that first call, and ``malloc_trim(0)``
hands back the free pages inside the heap just before it, so that a method cannot
hide its allocations in memory an earlier method left resident.

The timed repeats run with the allocator as a warmed-up process has it: glibc's
dynamic mmap threshold grows to at most 32 MiB (its ``DEFAULT_MMAP_THRESHOLD_MAX``
on 64-bit) with a trim threshold twice that, and :func:`prepare_process` fixes those
values. Timing under the 64 KiB setting would make every large tensor a fresh
``mmap`` with its page faults (measured: Rosenbrock n=2000 float32 Hessian 225 ms
there against 45-57 ms with the default allocator), a cost users do not pay.
Where ``/proc`` is missing (not Linux) the peak reads ``None``
and the table prints ``n/a``.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_prepared = False
_libc: Any = None


def prepare_process(threads: int | None = 1) -> None:
    """Set glibc's allocator thresholds for timing (NOTE [peak memory]) and torch's threads."""
    global _prepared, _libc
    if not _prepared:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _allocator(measuring_memory=False)
        except (OSError, AttributeError):
            _libc = None
        _prepared = True
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _allocator(*, measuring_memory: bool) -> None:
    """glibc's thresholds for a memory measurement or for timing (NOTE [peak memory])."""
    mmap = 64 * 1024 if measuring_memory else 32 * 1024 * 1024
    _libc.mallopt(_M_MMAP_THRESHOLD, mmap)
    _libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> int | None:
    """Reset the RSS high-water mark; return the current RSS in bytes (or ``None``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def peak_memory(fn: Callable[[], Any]) -> tuple[Any, float, float, int | None]:
    """Run ``fn()`` once; return its result, wall and CPU time, and peak RSS growth (bytes)."""
    gc.collect()
    if _libc is not None:
        _allocator(measuring_memory=True)
        _libc.malloc_trim(0)
    base = _reset_peak()
    try:
        result, wall, cpu = timed(fn)
        hwm = _status_kib("VmHWM")
    finally:
        if _libc is not None:
            _allocator(measuring_memory=False)
    peak = None if base is None or hwm is None else max(0, hwm * 1024 - base)
    return result, wall, cpu, peak


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall time and the CPU time this process spent in it."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure(
    calls: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    max_seconds: float,
    summarize: Callable[[str, Any], dict[str, Any]] | None = None,
    tolerate_errors: bool = False,
) -> dict[str, dict[str, Any]]:
    """Median wall time and peak memory of each call, timed side by side.

    Each call first runs once alone to measure its peak memory (NOTE [peak memory])
    and to warm caches. Then up to ``repeats`` rounds time every call once per
    round, interleaved, so that load from other processes falls on all methods
    alike; a call whose first run took more than ``max_seconds / repeats`` is not
    repeated and its first run is its time (slow baselines are timed once).

    With ``tolerate_errors``, a call whose first run raises (a crash, running out
    of memory) is not repeated; its entry is ``{"time_s": None, "error": "Type:
    message"}``.

    Returns:
        ``{name: {"time_s", "peak_mem_bytes", "cpu_s", "repeats", **summarize(name, first result)}}``:
        medians of wall time and of this process's CPU time (the CPU time is the
        steadier of the two on a machine shared with other work).
    """
    first: dict[str, tuple[float, float]] = {}
    peaks: dict[str, int | None] = {}
    extra: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for name, fn in calls.items():
        try:
            result, wall, cpu, peaks[name] = peak_memory(fn)
        except (Exception, MemoryError) as err:  # noqa: BLE001 - reported, never dropped
            if not tolerate_errors:
                raise
            text = str(err).strip().splitlines()
            failed[name] = f"{type(err).__name__}: {text[0][:120] if text else ''}"
            gc.collect()
            continue
        first[name] = (wall, cpu)
        extra[name] = summarize(name, result) if summarize is not None else {}
        del result
    calls = {name: fn for name, fn in calls.items() if name not in failed}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    slow = {name for name, (wall, _) in first.items() if wall * repeats > max_seconds}
    for _ in range(repeats):
        for name, fn in calls.items():
            if name in slow:
                continue
            gc.collect()
            result, wall, cpu = timed(fn)
            samples[name].append((wall, cpu))
            del result
    out = {}
    for name in calls:
        taken = samples[name] or [first[name]]
        out[name] = {
            "time_s": statistics.median(w for w, _ in taken),
            "peak_mem_bytes": peaks[name],
            "cpu_s": statistics.median(c for _, c in taken),
            "repeats": len(taken),
            **extra[name],
        }
    for name, reason in failed.items():
        out[name] = {"time_s": None, "peak_mem_bytes": None, "cpu_s": None, "error": reason}
    return out
