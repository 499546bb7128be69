"""The one chunk loop and its memory arithmetic."""

import warnings

import pytest
import torch

from hesse._chunking import (
    LoopFallbackWarning,
    allocated_bytes,
    chunk_size_for,
    format_bytes,
    map_chunks,
)


def test_map_chunks_covers_every_row_in_order() -> None:
    rows = torch.arange(10.0).reshape(10, 1)
    seen = []

    def batched(chunk):
        seen.append(chunk.shape[0])
        return chunk * 2

    out = map_chunks(batched, None, 10, lambda s, e: rows[s:e], chunk_size=4, call="t")
    torch.testing.assert_close(out, rows * 2)
    assert seen == [4, 4, 2]


def test_map_chunks_writes_into_preallocated_output() -> None:
    out = torch.empty(5, 2)
    res = map_chunks(
        lambda c: c + 1,
        None,
        5,
        lambda s, e: torch.zeros(e - s, 2),
        chunk_size=2,
        call="t",
        out=out,
    )
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, torch.ones(5, 2))


def test_map_chunks_falls_back_to_loop_with_one_warning() -> None:
    def batched(chunk):
        raise RuntimeError("vmap: cannot batch this")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = map_chunks(
            batched,
            lambda r: r * 3,
            7,
            lambda s, e: torch.ones(e - s, 2),
            chunk_size=2,
            call="hesse.test(f)",
        )
    torch.testing.assert_close(out, 3 * torch.ones(7, 2))
    msgs = [str(w.message) for w in caught if issubclass(w.category, LoopFallbackWarning)]
    assert len(msgs) == 1 and msgs[0].startswith(
        "hesse.test(f): the vectorised (vmap) path failed (RuntimeError: vmap: cannot batch this)"
    )


def test_map_chunks_reraises_without_single() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        map_chunks(
            lambda c: (_ for _ in ()).throw(RuntimeError("boom")),
            None,
            2,
            lambda s, e: torch.ones(e - s),
            chunk_size=1,
            call="t",
        )


def test_allocated_bytes_counts_outputs() -> None:
    x = torch.ones(1000, dtype=torch.float64)
    _, used = allocated_bytes(lambda: (x * 2) + 1)
    assert used == 2 * 8000


def test_chunk_size_for_and_format() -> None:
    assert chunk_size_for(rows=100, per_row_bytes=10, fixed_bytes=500, budget=1000) == 50
    assert chunk_size_for(rows=100, per_row_bytes=10, fixed_bytes=5000, budget=1000) == 1
    assert chunk_size_for(rows=30, per_row_bytes=1, fixed_bytes=0, budget=1000) == 30
    assert format_bytes(3 * 2**30) == "3.0 GiB" and format_bytes(12) == "12 B"


def test_saved_bytes_counts_intermediates_not_inputs() -> None:
    from hesse._chunking import saved_bytes

    x = torch.ones(100, dtype=torch.float64, requires_grad=True)
    w = torch.ones(100, dtype=torch.float64)
    _, used = saved_bytes(lambda: ((x * w).sin() * 2).sum(), x)
    assert used == 800  # sin saves its input x * w (an intermediate); mul saves the inputs x, w


def test_chunk_size_capped_for_cache() -> None:
    from hesse._chunking import EFFICIENT_CHUNK_BYTES

    assert (
        chunk_size_for(rows=10**9, per_row_bytes=1024, fixed_bytes=0, budget=10**15)
        == EFFICIENT_CHUNK_BYTES // 1024
    )


def test_saved_bytes_ignores_views_of_parameters() -> None:
    from hesse._chunking import saved_bytes

    w = torch.ones(50, 40, dtype=torch.float64, requires_grad=True)  # a parameter
    x = torch.ones(3, 50, dtype=torch.float64, requires_grad=True)
    b = torch.ones(40, dtype=torch.float64, requires_grad=True)
    _, used = saved_bytes(lambda: (torch.tanh(x @ w.T.T) * b.exp()).sum(), x)
    # tanh's output and the product's x-side factor; not w.T.T or b.exp(), which do not depend on x
    assert used == 2 * 3 * 40 * 8


def test_chunk_size_for_without_split_fills_the_budget() -> None:
    from hesse._chunking import EFFICIENT_CHUNK_BYTES, splitting_pays

    rows = 4 * EFFICIENT_CHUNK_BYTES // 1024
    assert chunk_size_for(rows=rows, per_row_bytes=1024, fixed_bytes=0, budget=10**15, split=False)
    assert (
        chunk_size_for(rows=rows, per_row_bytes=1024, fixed_bytes=0, budget=10**15, split=False)
        == rows
    )
    assert (
        chunk_size_for(rows=100, per_row_bytes=10, fixed_bytes=500, budget=1000, split=False) == 50
    )
    # NOTE [when to split]: intermediates of 2 output rows (sum(sin)) do not pay, 45 (MLP) do
    assert not splitting_pays(2 * 800, 800) and splitting_pays(45 * 800, 800)


def test_saved_bytes_upper_bound_only_below_at_most() -> None:
    from hesse._chunking import saved_bytes

    w = torch.ones(50, 40, dtype=torch.float64, requires_grad=True)
    x = torch.ones(3, 50, dtype=torch.float64, requires_grad=True)
    b = torch.ones(40, dtype=torch.float64, requires_grad=True)

    def f():
        return (torch.tanh(x @ w.T.T) * b.exp()).sum()

    exact = 2 * 3 * 40 * 8
    _, bound = saved_bytes(f, x, at_most=10**9)
    # w.T.T (saved by the matmul) and b.exp() (saved by exp and by the product): not from x
    assert bound == exact + 50 * 40 * 8 + 2 * 40 * 8
    assert saved_bytes(f, x, at_most=bound - 1)[1] == exact
    assert saved_bytes(f, x)[1] == exact


def test_map_chunks_one_chunk_returns_its_result_unless_it_aliases_the_rows() -> None:
    made = []

    def batched(chunk):
        made.append(chunk * 2)
        return made[-1]

    buffer = torch.arange(6.0).reshape(3, 2)
    out = map_chunks(batched, None, 3, lambda s, e: buffer[s:e], chunk_size=3, call="t")
    assert out.data_ptr() == made[0].data_ptr()  # no copy
    same = map_chunks(lambda c: c, None, 3, lambda s, e: buffer[s:e], chunk_size=3, call="t")
    assert same.data_ptr() != buffer.data_ptr()  # the rows' buffer may be reused: a copy
    torch.testing.assert_close(same, buffer)


def test_default_memory_budget_small_jobs_skip_the_precise_reading() -> None:
    from hesse._chunking import default_memory_budget

    with open("/proc/meminfo") as fh:
        info = dict(line.split(":", 1) for line in fh)
    total = int(info["MemTotal"].split()[0]) * 1024
    small = default_memory_budget(torch.device("cpu"), needed=1)
    assert 1 <= small <= total // 2
    precise = default_memory_budget(torch.device("cpu"), needed=total)  # more than half: exact
    available = int(info["MemAvailable"].split()[0]) * 1024 // 2
    assert abs(precise - available) <= 0.2 * available
    assert default_memory_budget(torch.device("cpu"), needed=total) < total


def test_math_attention_restores_the_callers_switches() -> None:
    from hesse._attention import math_attention

    before = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
    torch.backends.cuda.enable_math_sdp(False)
    try:
        with pytest.raises(KeyError), math_attention():
            assert torch.backends.cuda.math_sdp_enabled()
            assert not torch.backends.cuda.flash_sdp_enabled()
            assert not torch.backends.cuda.mem_efficient_sdp_enabled()
            raise KeyError("restored on errors too")
        assert not torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() == before[0]
    finally:
        torch.backends.cuda.enable_math_sdp(before[1])
