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
