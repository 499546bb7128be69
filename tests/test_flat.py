"""Flattening pytrees of tensors to one vector and back."""

import torch

from hesse._flat import Flat


def test_round_trip_dict_and_blocks() -> None:
    tree = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0, 8.0])}
    flat = Flat.of(tree)
    v = flat.flatten(tree)
    assert flat.n == 8 and v.tolist() == [0, 1, 2, 3, 4, 5, 7, 8]
    back = flat.unflatten(v)
    assert back["a"].shape == (2, 3) and torch.equal(back["b"], tree["b"])
    batched = flat.unflatten(torch.stack([v, 2 * v]))
    assert batched["a"].shape == (2, 2, 3)
    torch.testing.assert_close(flat.flatten_batched(batched), torch.stack([v, 2 * v]))
    M = torch.arange(64.0).reshape(8, 8)
    blocks = flat.unflatten_blocks(M)
    assert blocks["a"]["b"].shape == (2, 3, 2) and blocks["b"]["a"].shape == (2, 2, 3)
    torch.testing.assert_close(blocks["b"]["b"], M[6:, 6:])
    torch.testing.assert_close(blocks["a"]["b"].reshape(6, 2), M[:6, 6:])
