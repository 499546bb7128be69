"""Per-sample gradients of a model's loss, vectorised with ``torch.func``, in chunks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from hesse._chunking import map_chunks
from hesse._flat import Flat
from hesse._validation import fail


class PerSampleGradients:
    """``g_i = grad_theta loss_fn(model(x_i), y_i)`` of single points, flattened by ``layout``.

    ``loss_fn`` is applied to one point at a time (a batch of one), so for a
    mean-reduced loss ``g_i`` is the gradient of that point's loss and the
    dataset-mean loss is ``(1/N) sum_i loss_i`` (equal counts per point).
    """

    def __init__(
        self,
        call: str,
        model: nn.Module,
        loss_fn: Callable,
        layout: Flat,
        names: list[str],
        *,
        chunk_size: int,
    ) -> None:
        self.call, self.layout, self.names, self.chunk_size = call, layout, names, chunk_size
        chosen = set(names)
        params = dict(model.named_parameters())
        self._params = {k: params[k].detach() for k in names}
        fixed = {k: p.detach() for k, p in params.items() if k not in chosen}
        buffers = {k: b.detach() for k, b in model.named_buffers()}

        def loss_one(p: dict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, {**fixed, **buffers, **p}, (x.unsqueeze(0),))
            return loss_fn(out, t.unsqueeze(0))

        self._grad = grad(loss_one)
        self._batched = vmap(self._grad, in_dims=(None, 0, 0))

    def _flat(self, g: dict, rows: int | None) -> torch.Tensor:
        parts = [g[k].reshape(-1) if rows is None else g[k].reshape(rows, -1) for k in self.names]
        return torch.cat(parts, dim=-1)

    def map(
        self,
        X: torch.Tensor,
        y: torch.Tensor,
        then: Callable[[torch.Tensor], torch.Tensor],
        *,
        what: str,
    ) -> torch.Tensor:
        """``then(G_chunk)`` for chunks of per-sample gradients ``G`` (``(c, P)``), stacked.

        Raises ``ValueError`` naming the first point whose gradient is not finite.
        """

        bad: list[int] = []  # checked after the loop: an error inside it would trigger the fallback

        def checked(G: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            finite = torch.isfinite(G).all(dim=1)
            if not bad and not bool(finite.all()):
                bad.append(int(idx[(~finite).nonzero()[0, 0]]))
            return then(G)

        def batched(idx: torch.Tensor) -> torch.Tensor:
            return checked(self._flat(self._batched(self._params, X[idx], y[idx]), len(idx)), idx)

        def single(i: torch.Tensor) -> torch.Tensor:
            G = self._flat(self._grad(self._params, X[i], y[i]), None).unsqueeze(0)
            return checked(G, i.reshape(1))[0]

        out = map_chunks(
            batched,
            single,
            X.shape[0],
            lambda start, stop: torch.arange(start, stop, device=X.device),
            chunk_size=self.chunk_size,
            call=self.call,
        )
        if bad:
            fail(
                self.call,
                f"the gradient of the loss at {what} point {bad[0]} is not finite (inf or nan). "
                "Check that point's inputs and target, and the model's parameters.",
            )
        return out
