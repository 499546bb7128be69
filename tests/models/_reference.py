"""Plain-autograd references for real models, on a block of named parameters.

Everything here is reverse-over-reverse autograd, one row per call (no vmap, no
torch.func transforms: on torch 2.13 ``jvp`` over ``jacrev`` is wrong after Linear ->
LayerNorm). The reference model is evaluated as given; tests pass an eager-attention
twin where the operator's model uses ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
from torch.func import functional_call


class Block:
    """``loss_fn(model(inputs), targets)`` as a function of a flat vector of ``names``."""

    def __init__(self, model, loss_fn, inputs, targets, names):
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        named = dict(model.named_parameters())
        self.names = list(names)
        self.shapes = [named[k].shape for k in self.names]
        self.x = torch.cat([named[k].detach().reshape(-1) for k in self.names])

    def output(self, v, inputs=None):
        parts = torch.split(v, [s.numel() for s in self.shapes])
        state = {k: p.reshape(s) for k, p, s in zip(self.names, parts, self.shapes)}
        return functional_call(self.model, state, (self.inputs if inputs is None else inputs,))

    def loss(self, v, inputs=None, targets=None):
        out = self.output(v, inputs)
        return self.loss_fn(out, self.targets if targets is None else targets)

    def _gradient(self, f):
        x = self.x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        return x, g

    def hvp(self, V):
        """``H V`` for ``(n, k)`` ``V``: one double backward per column."""
        x, g = self._gradient(self.loss)
        cols = [torch.autograd.grad(g, x, V[:, j], retain_graph=True)[0] for j in range(V.shape[1])]
        return torch.stack(cols, 1)

    def hessian(self, f=None):
        """The dense ``(n, n)`` Hessian, one double backward per row."""
        x, g = self._gradient(f or self.loss)
        return torch.stack(
            [torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(x.numel())]
        )

    def per_sample_hessian_diagonals(self, scale, group=1):
        """``scale *`` the Hessian diagonal of each sample's loss: ``(B, n)``; sample ``b``
        owns target rows ``b * group`` to ``b * group + group - 1``."""
        rows = []
        for b in range(self.inputs.shape[0]):
            x, y = self.inputs[b : b + 1], self.targets[b * group : (b + 1) * group]
            one = lambda v, x=x, y=y: self.loss(v, x, y)  # noqa: E731
            rows.append(self.hessian(one).diagonal() * scale)
        return torch.stack(rows)

    def ggn(self):
        """``J^T H_out J`` with ``J`` the whole batch's Jacobian (one backward per output entry)."""
        x = self.x.detach().requires_grad_(True)
        out = self.output(x)
        flat = out.reshape(-1)
        J = torch.stack(
            [torch.autograd.grad(flat[i], x, retain_graph=True)[0] for i in range(flat.numel())]
        )
        o = out.detach().reshape(-1).requires_grad_(True)
        (g,) = torch.autograd.grad(
            self.loss_fn(o.reshape(out.shape), self.targets), o, create_graph=True
        )
        Ho = torch.stack(
            [torch.autograd.grad(g[i], o, retain_graph=True)[0] for i in range(o.numel())]
        )
        return J.T @ Ho @ J
