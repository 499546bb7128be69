"""Sums of squared per-sample VJPs, the core of exact and MC GGN/Fisher diagonals.

For one batch with output factor ``S`` (``(N, D, K)``) this computes
``sum_n sum_k (J_n^T s_nk)^2`` for every selected parameter, in two ways:

# NOTE [linear fast path]
A parameter of an ``nn.Linear`` that is called once per forward pass on ``(N, in)``
inputs has per-sample VJPs ``delta_nk a_n^T`` (weight) and ``delta_nk`` (bias),
with ``a_n`` the module's input and ``delta_nk`` the VJP at its output. Their
squares sum to ``(sum_k delta_nk^2)^T a_n^2``: one matrix product, never a
per-sample gradient in memory. An ``nn.Conv2d`` (``groups=1``) is the same with
``a_n`` replaced by its unfolded patches, ``delta_nk U_n^T`` per sample (formed
one column ``k`` at a time). The ``delta``s of all such layers come from one
backward pass batched over the ``K`` columns (:func:`hesse._hvp.batched_grad`). Layers are
found with forward hooks, so the model's structure is free (residual branches,
functional code around the modules). Because a weight could also be used outside
its module (tied or functional use), the first batch checks, for a random
combination of the columns, that the layer rule's gradient equals the true
gradient; layers that fail the check, are called more than once, or see inputs of
another rank, go to the generic path.

Every other parameter takes the generic path: per-sample VJPs
(``torch.func.vjp`` of the model on one sample, vmapped over the ``K`` columns
and over groups of samples) with respect to those parameters only.

Both paths assume that output row ``n`` is a function of input sample ``n`` alone.

# NOTE [coupled rows]
Output row ``n`` need not belong to one sample. Outputs flattened to tokens,
``(B*T, V)``: rows ``b*T .. b*T + T - 1`` all depend on sample ``b`` (through
attention, say), so ``J_n`` is the Jacobian of that row of sample ``b``'s output;
the generic path then runs per sample with ``T * K`` columns, column ``(t, k)``
being ``s_{bT+t,k}`` in row ``t`` and zero elsewhere. BatchNorm in train mode
(batch statistics couple all samples) or any other mixing of samples: ``J_n`` is
the Jacobian of row ``n`` of the *whole batch*, and ``J_n^T s_nk`` is one VJP of
the batch output with cotangent ``s_nk`` in row ``n``; these ``N * K`` VJPs go
through one graph of the batch in batched backward passes (``is_grads_batched``),
a few rows at a time. The first batch decides the path: rows group by sample if
the output has ``R`` rows per input sample and running the first and last
samples alone reproduces their rows; otherwise they are coupled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from hesse._chunking import EFFICIENT_CHUNK_BYTES, map_chunks
from hesse._hvp import batched_grad

Factor = Callable[[int, torch.Tensor, Any], torch.Tensor]


def _rule(mod: nn.Module) -> _Rule | None:
    if type(mod) is nn.Linear:
        return _LINEAR
    if (
        type(mod) is nn.Conv2d
        and mod.groups == 1
        and mod.padding_mode == "zeros"
        and not isinstance(mod.padding, str)
    ):
        return _CONV2D
    return None


def _linear_candidates(op: Any) -> dict[str, nn.Module]:
    """Layers with a rule owning selected parameters that are not shared with other modules."""
    selected = set(op.param_names)
    uses: dict[int, int] = {}
    for mod in op.model.modules():
        for p in mod.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    out = {}
    for name, mod in op.model.named_modules():
        if _rule(mod) is None:
            continue
        owned = [p for p in (mod.weight, mod.bias) if p is not None]
        if any(uses[id(p)] > 1 for p in owned):
            continue
        prefix = f"{name}." if name else ""
        if f"{prefix}weight" in selected or f"{prefix}bias" in selected:
            out[prefix] = mod
    return out


def _rows_per_sample(op: Any, inputs: Any, out: torch.Tensor) -> int:
    """NOTE [coupled rows]: ``R`` if output rows ``b*R .. b*R + R - 1`` depend on input
    sample ``b`` alone (``R = 1``: one row per sample), 0 if rows are coupled."""
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    if not leaves or any(t.dim() == 0 for t in leaves):
        return 0
    b, n = leaves[0].shape[0], out.shape[0]
    if any(t.shape[0] != b for t in leaves) or n % b:
        return 0
    if any(
        isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training
        for mod in op.model.modules()
    ):
        return 0
    r = n // b
    for i in sorted({0, b - 1}):
        try:
            with torch.no_grad():
                alone = op._forward(op._x, tree_map(lambda t, i=i: t[i : i + 1], inputs))
        except Exception:  # noqa: BLE001 - a model that cannot run one sample couples them
            return 0
        rows = out[i * r : (i + 1) * r].detach()
        if alone.shape != rows.shape or not torch.allclose(
            alone, rows, rtol=1e-5, atol=1e-6 * float(out.detach().abs().max())
        ):
            return 0
    return r


def _group_rows(S: torch.Tensor, r: int) -> torch.Tensor:
    """``(N, D, K)`` row factors as ``(N / r, r * D, r * K)`` per-sample factors: column
    ``(t, k)`` of sample ``b`` is ``s_{b r + t, k}`` in row ``t`` and zero elsewhere."""
    N, D, K = S.shape
    grouped = S.new_zeros(N // r, r, D, r, K)
    t = torch.arange(r, device=S.device)
    grouped[:, t, :, t, :] = S.reshape(N // r, r, D, K).transpose(0, 1)
    return grouped.reshape(N // r, r * D, r * K)


def same_gradient(value: torch.Tensor, true: torch.Tensor, sizes: torch.Tensor, terms: int) -> bool:
    """Whether a layer rule's gradient ``value`` is autograd's ``true`` up to rounding.

    # NOTE [verification tolerance]
    Each entry of a layer's gradient is a sum of ``terms`` products (rows times output
    positions); two summation orders (the rule's and autograd's) differ by rounding
    of order ``eps sqrt(terms)`` times the sum of the products' magnitudes, ``sizes``
    (the rule's gradient of ``|a|`` and ``|d|``). A tolerance relative to the largest
    entry alone was exceeded in float32 at ``terms = 51,200`` (a convolution over 512
    samples of 10x10 outputs, at two threads) and sent the layer to the generic path
    for no reason. A use of the weight outside its module adds its own term to an
    entry; only a term below that rounding (about 1e-4 of ``sizes`` in float32 at
    51,200 terms, 1e-13 in float64) would pass, and float32 cannot resolve it in
    such a sum anyway.
    """
    scale = true.abs().max().clamp_min(torch.finfo(true.dtype).tiny)
    slack = 4 * torch.finfo(true.dtype).eps * math.sqrt(terms)
    tol = 1e-5 * true.abs() + 1e-6 * scale + slack * sizes
    return bool(((value - true).abs() <= tol).all())


class _BatchPass:
    """One batch's forward pass, output factor ``S`` and VJPs at the fast layers' outputs.

    ``coupled``: NOTE [coupled rows] holds and only ``out``, ``x``, ``S`` are set.
    ``rows > 1``: output rows are grouped ``rows`` per sample and ``S`` is the
    per-sample factor of :func:`_group_rows` (``rows * K`` columns).
    Otherwise ``fast`` maps a layer prefix to its input ``a`` and the VJPs ``d``
    (``(K, *output)``) of all ``K`` columns at its output, and ``rest`` lists the
    selected parameters left to the generic path.
    """

    def __init__(
        self, op: Any, factor: Factor, index: int, inputs: Any, targets: Any, verify: bool
    ):
        self.op, self.inputs = op, inputs
        self.offsets = dict(zip(op.param_names, op.layout.offsets))
        self.numels = dict(zip(op.param_names, op.layout.numels))
        candidates = op._linear_plan if op._linear_plan is not None else _linear_candidates(op)
        # One forward pass with hooks recording each candidate's input and output.
        records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {p: [] for p in candidates}
        handles = [
            mod.register_forward_hook(lambda m, i, o, p=p: records[p].append((i[0], o)))
            for p, mod in candidates.items()
        ]
        self.x = x = op._x.detach().requires_grad_(True)
        try:
            with torch.enable_grad():
                out = self.out = op._forward(x, inputs)
        finally:
            for h in handles:
                h.remove()
        self.S = S = factor(index, out.detach(), targets).detach()
        N, _, K = S.shape
        if op._rows_per_sample is None:  # decided on the first batch: NOTE [coupled rows]
            op._rows_per_sample = _rows_per_sample(op, inputs, out)
        self.rows = op._rows_per_sample
        self.coupled = not self.rows
        if self.coupled:
            return
        if self.rows > 1:  # rows grouped by sample (tokens): the generic path, r * K columns
            self.S = _group_rows(S, self.rows)
            self.fast, self.rest, self.out = {}, list(op.param_names), None
            return
        cot = S.permute(2, 0, 1).reshape(K, *out.shape)
        self.rules = rules = {p: _rule(mod) for p, mod in candidates.items()}
        self.modules = candidates
        fast = {
            p: rec[0]
            for p, rec in records.items()
            if len(rec) == 1
            and rec[0][1].requires_grad
            and rec[0][0].shape[:1] == (N,)
            and rules[p].accepts(candidates[p], *rec[0])
        }
        if fast and verify:
            self._verify(fast, cot)
            op._linear_plan = {p: candidates[p] for p in fast}
        self.fast: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if fast:
            outs = [o for _, o in fast.values()]
            if K == 1:
                deltas = [d.unsqueeze(0) for d in _grads(out, outs, cot[0], batched=False)]
            else:
                deltas = _grads(out, outs, cot, batched=True)
            for (p, (a, _)), d in zip(fast.items(), deltas):
                self.fast[p] = (a.detach(), d.detach())
        covered = {
            p + suffix
            for p in self.fast
            for suffix in ("weight", "bias")
            if p + suffix in self.offsets
        }
        self.rest = [name for name in op.param_names if name not in covered]
        self.out = None  # free the graph: the generic path re-runs the model per sample

    def _verify(self, fast: dict, cot: torch.Tensor) -> None:
        """Drop from ``fast`` the layers whose rule's gradient is not the true one."""
        # A random combination of all K columns, so that no use of a weight outside
        # its module can hide in a column that happens not to reach it.
        gen = torch.Generator(device=cot.device).manual_seed(0)
        r = torch.randn(cot.shape[0], generator=gen, device=cot.device, dtype=cot.dtype)
        c = torch.tensordot(r, cot, dims=1)
        (g0,) = torch.autograd.grad(self.out, self.x, c, retain_graph=True)
        outs0 = [o for _, o in fast.values()]
        deltas0 = _grads(self.out, outs0, c, batched=False)
        for (p, (a, _)), d in zip(list(fast.items()), deltas0):
            a = a.detach()
            grads = self.rules[p].gradient(self.modules[p], a, d)
            sizes = self.rules[p].gradient(self.modules[p], a.abs(), d.abs())
            for suffix, value in grads.items():
                name = p + suffix
                if name not in self.offsets:
                    continue
                o = self.offsets[name]
                true = g0[o : o + self.numels[name]].reshape(value.shape)
                if not same_gradient(value, true, sizes[suffix], d.numel() // d.shape[1]):
                    del fast[p]  # used outside its module: generic path
                    break

    def rest_index(self) -> torch.Tensor:
        """The flat entries of the parameters on the generic path."""
        dev = self.op.device
        return torch.cat(
            [
                torch.arange(self.offsets[k], self.offsets[k] + self.numels[k], device=dev)
                for k in self.rest
            ]
        )


def batch_factor_squares(
    op: Any,
    factor: Factor,
    index: int,
    inputs: Any,
    targets: Any,
    *,
    chunk_size: int | None,
    keep: str,
    verify: bool,
) -> torch.Tensor:
    """One batch's ``(J_n^T s_nk)^2``, summed over what ``keep`` does not keep.

    ``keep``: ``"total"`` sums over rows ``n`` and columns ``k`` (``(n,)``),
    ``"column"`` keeps the columns (``(K, n)``), ``"sample"`` keeps the output rows
    (``(N, n)``: per-sample squares, NOTE [coupled rows] for what a row is).
    """
    assert keep in ("total", "column", "sample"), f"unknown keep={keep!r}"
    call = f"hesse.diagonal({op._title})"
    bp = _BatchPass(op, factor, index, inputs, targets, verify)
    if bp.coupled:
        return _coupled(bp.out, bp.x, bp.S, chunk_size=chunk_size, keep=keep, call=call)
    N, _, K = bp.S.shape
    lead = {"total": (), "column": (K,), "sample": (N,)}[keep]
    result = bp.x.new_empty((*lead, op.shape[0]))  # every entry is written: fast + rest
    for p, (a, d) in bp.fast.items():
        dest = {
            suffix: result[..., bp.offsets[p + suffix] :][..., : bp.numels[p + suffix]]
            for suffix in ("weight", "bias")
            if p + suffix in bp.offsets
        }
        parts = bp.rules[p].squares(bp.modules[p], a, d, keep, dest)
        for suffix, value in parts.items():
            name = p + suffix
            if name in bp.offsets:
                o = bp.offsets[name]
                result[..., o : o + bp.numels[name]] = value.reshape(*lead, -1)
    if bp.rest:
        idx = bp.rest_index()
        result[..., idx] = _generic(
            op, inputs, bp.S, idx, chunk_size=chunk_size, keep=keep, call=call
        )
    if keep == "column" and bp.rows > 1:  # columns (t, k) back to the loss's K columns
        result = result.reshape(bp.rows, -1, op.shape[0]).sum(0)
    return result


def batch_factor_gram(
    op: Any,
    factor: Factor,
    index: int,
    inputs: Any,
    targets: Any,
    *,
    columns: torch.Tensor | None,
    chunk_size: int | None,
    verify: bool,
) -> torch.Tensor | None:
    """One batch's ``sum_{n,k} (J_n^T s_nk)(J_n^T s_nk)^T``, restricted to ``columns``.

    ``None`` where rows are coupled and ``N * K`` exceeds ``n``: the ``N * K``
    whole-batch VJPs would cost more than ``n`` operator products.

    # NOTE [factor Gram]
    The dense GGN / Fisher of a batch is the Gram matrix ``M^T M`` of the ``N * K``
    per-sample VJPs ``J_n^T s_nk`` (the rows of ``M``; ``K`` the columns of the
    output factor). They come from the same pass as the exact diagonal (NOTE
    [linear fast path], NOTE [coupled rows]): the layer rules write their per-sample
    gradients (``d_nk a_n^T`` for a linear weight) straight into ``M``, the generic
    path adds vmapped per-sample VJPs. Rows go in groups (``chunk_size`` samples, or
    as many as keep one group's ``M`` near ``EFFICIENT_CHUNK_BYTES``) through
    :func:`hesse._chunking.map_chunks`, each group one GEMM into the sum: ``N * K``
    VJPs and ``O(N K m^2)`` flops for ``m`` columns, instead of ``m`` operator products.

    Between two fast-path linear layers (weights with their biases, input
    ``a'_n = [a_n; 1]``) the block needs no ``M``: entry ``((o, i), (p, j))`` is
    ``sum_n B_n[o, p] A_n[i, j]`` with ``B_n = sum_k d_nko d'_nkp`` and
    ``A_n = a'_n a'_n^T``, one GEMM over the ``N`` samples of the flattened ``B_n``
    and ``A_n`` and a permutation: ``K`` times fewer flops (used when ``K > 1``).
    """
    call = f"{op._title}.to_dense()"
    bp = _BatchPass(op, factor, index, inputs, targets, verify)
    S = bp.S
    N, D, K = S.shape
    n = op.shape[0]
    per_sample = K * (n + (bp.out.numel() // N if bp.coupled else 0)) * bp.x.element_size()
    group = chunk_size or max(1, min(N, EFFICIENT_CHUNK_BYTES // max(1, 3 * per_sample)))
    num_groups = -(-N // group)

    def select(M: torch.Tensor) -> torch.Tensor:
        return M if columns is None else M[:, columns]

    def gram(M: torch.Tensor) -> torch.Tensor:
        M = select(M.reshape(-1, n))
        return M.T @ M

    def bounds(gid: torch.Tensor) -> tuple[int, int]:
        lo = int(gid) * group
        return lo, min(N, lo + group)

    if bp.coupled:
        if N * K > n:  # N * K whole-batch VJPs would cost more than n products
            return None
        flat_out = bp.out.reshape(N, D)

        def coupled(ids: torch.Tensor) -> torch.Tensor:
            lo, hi = bounds(ids[0])
            r = torch.arange(hi - lo, device=S.device)
            C = S.new_zeros(hi - lo, K, N, D)
            C[r, :, lo + r] = S[lo:hi].transpose(1, 2)  # (rows, K, D) into row lo + r
            (G,) = batched_grad(flat_out, [bp.x], C.reshape(-1, N, D))
            return gram(G)

        return map_chunks(coupled, None, num_groups, _ids, chunk_size=1, call=call, total=True)

    kron = {} if columns is not None or K == 1 else _kron_layers(bp)
    in_kron = torch.zeros(n, dtype=torch.bool, device=op.device)
    for flat, _ in kron.values():
        in_kron[flat] = True
    other = (~in_kron).nonzero().reshape(-1)  # columns that need the rows M
    idx = bp.rest_index() if bp.rest else None
    sample_vjps = _sample_vjps(op, idx) if bp.rest else None
    pairs = [(p, q) for i, p in enumerate(kron) for q in list(kron)[i:]]
    per_sample = (
        K * n * (other.numel() > 0)
        + sum(kron[p][1].shape[1] * kron[q][1].shape[1] for p, q in pairs)
        + sum(bp.fast[p][1].shape[2] * bp.fast[q][1].shape[2] for p, q in pairs)
    ) * bp.x.element_size()
    group = chunk_size or max(1, min(N, EFFICIENT_CHUNK_BYTES // max(1, 3 * per_sample)))
    num_groups = -(-N // group)

    def rows(lo: int, hi: int, generic: torch.Tensor | None) -> torch.Tensor:
        M = bp.x.new_zeros(K, hi - lo, n)
        for p, (a, d) in bp.fast.items():
            parts = bp.rules[p].per_sample(bp.modules[p], a[lo:hi], d[:, lo:hi])
            for suffix, value in parts.items():
                name = p + suffix
                if name in bp.offsets:
                    o = bp.offsets[name]
                    M[:, :, o : o + bp.numels[name]] = value.reshape(K, hi - lo, -1)
        if generic is not None:
            M[:, :, idx] = generic
        return M

    def group_gram(lo: int, hi: int, generic: Callable[[], torch.Tensor | None]) -> torch.Tensor:
        if not kron:
            return gram(rows(lo, hi, generic()))
        G = bp.x.new_zeros(n, n)
        for p, q in pairs:  # the linear-linear blocks, without M
            (fp, ap), (fq, aq) = kron[p], kron[q]
            dp, dq = bp.fast[p][1][:, lo:hi], bp.fast[q][1][:, lo:hi]
            B = torch.einsum("kno,knp->nop", dp, dq).reshape(hi - lo, -1)
            A = torch.einsum("ni,nj->nij", ap[lo:hi], aq[lo:hi]).reshape(hi - lo, -1)
            shape = (dp.shape[2], dq.shape[2], ap.shape[1], aq.shape[1])
            T = (B.T @ A).reshape(shape).permute(0, 2, 1, 3).reshape(fp.numel(), fq.numel())
            G[fp.unsqueeze(1), fq] = T
            if p != q:
                G[fq.unsqueeze(1), fp] = T.T
        if other.numel():
            M = rows(lo, hi, generic()).reshape(-1, n)
            Mo = M[:, other]
            G[other.unsqueeze(1), other] = Mo.T @ Mo
            lin = in_kron.nonzero().reshape(-1)
            cross = M[:, lin].T @ Mo
            G[lin.unsqueeze(1), other] = cross
            G[other.unsqueeze(1), lin] = cross.T
        return G

    def batched(ids: torch.Tensor) -> torch.Tensor:
        lo, hi = bounds(ids[0])

        def generic() -> torch.Tensor | None:
            if sample_vjps is None:
                return None
            chunk = tree_map(lambda t: t[lo:hi], inputs)
            return vmap(sample_vjps)(chunk, S[lo:hi]).transpose(0, 1)  # (K, g, idx)

        return group_gram(lo, hi, generic)

    def single(gid: torch.Tensor) -> torch.Tensor:
        lo, hi = bounds(gid)

        def generic() -> torch.Tensor | None:
            if sample_vjps is None:
                return None
            vjps = [sample_vjps(tree_map(lambda t, i=i: t[i], inputs), S[i]) for i in range(lo, hi)]
            return torch.stack(vjps, 1)

        return group_gram(lo, hi, generic)

    return map_chunks(batched, single, num_groups, _ids, chunk_size=1, call=call, total=True)


def _kron_layers(bp: _BatchPass) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fast-path linear layers with a selected weight: their flat entries ``(out, in')``
    (weight columns, then the bias if selected) and inputs ``a'`` (``(N, in')``)."""
    layers = {}
    for p, (a, _) in bp.fast.items():
        if not isinstance(bp.rules[p], _LinearRule) or p + "weight" not in bp.offsets:
            continue
        out, inp = bp.modules[p].weight.shape
        o = bp.offsets[p + "weight"]
        flat = torch.arange(o, o + out * inp, device=a.device).reshape(out, inp)
        if p + "bias" in bp.offsets:
            b = bp.offsets[p + "bias"]
            flat = torch.cat([flat, torch.arange(b, b + out, device=a.device).unsqueeze(1)], 1)
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        layers[p] = (flat.reshape(-1), a)
    return layers


def _ids(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop)


def _sample_vjps(op: Any, idx: torch.Tensor) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """``(inputs_n, S_n) -> (K, len(idx))``: one sample's VJPs w.r.t. the flat entries ``idx``."""
    x0 = op._x
    xr0 = x0[idx]

    def sample(inp: Any, s: torch.Tensor) -> torch.Tensor:
        def fn(xr: torch.Tensor) -> torch.Tensor:
            x = x0.index_put((idx,), xr)
            return op._forward(x, tree_map(lambda t: t.unsqueeze(0), inp)).reshape(-1)

        _, vjp_fn = vjp(fn, xr0)
        return vmap(vjp_fn)(s.T)[0]

    return sample


class _Rule:
    """Per-sample gradients of one layer type, from its input ``a`` and output VJP ``d``."""

    def accepts(self, mod: nn.Module, a: torch.Tensor, z: torch.Tensor) -> bool:
        raise NotImplementedError

    def gradient(self, mod: nn.Module, a: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch gradient for one cotangent (``d`` shaped like the output)."""
        raise NotImplementedError

    def squares(
        self,
        mod: nn.Module,
        a: torch.Tensor,
        d: torch.Tensor,
        keep: str,
        dest: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Squared per-sample gradients (``d``: ``(K, *output)``) summed over ``n`` and ``k``.

        ``keep="column"`` keeps ``k`` (``(K, *param)``), ``"sample"`` keeps ``n``
        (``(N, *param)``). A rule may write a result straight into its flat
        destination ``dest[suffix]`` (``(..., numel)``) and leave it out of the
        returned dict (saving a copy of a batch-sized block).
        """
        raise NotImplementedError

    def per_sample(
        self, mod: nn.Module, a: torch.Tensor, d: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The per-sample gradients, ``(K, N, *param)`` (``d``: ``(K, *output)``)."""
        raise NotImplementedError


class _LinearRule(_Rule):
    """Per-sample gradients ``d_n a_n^T`` and ``d_n``: squares sum to ``(d^2)^T a^2``."""

    def accepts(self, mod, a, z):
        return a.dim() == 2 and z.dim() == 2

    def gradient(self, mod, a, d):
        return {"weight": d.T @ a, "bias": d.sum(0)}

    def squares(self, mod, a, d, keep, dest):
        d2, a2 = d.square(), a.square()  # (K, N, out), (N, in)
        if keep == "column":
            return {"weight": torch.einsum("kno,ni->koi", d2, a2), "bias": d2.sum(1)}
        if keep == "sample":
            s2 = d2.sum(0)  # (N, out)
            if "weight" not in dest:
                return {"bias": s2}
            w = dest["weight"].view(*s2.shape, a2.shape[1])
            torch.mul(s2.unsqueeze(2), a2.unsqueeze(1), out=w)
            return {"bias": s2}
        return {"weight": d2.sum(0).T @ a2, "bias": d2.sum((0, 1))}

    def per_sample(self, mod, a, d):
        return {"weight": d.unsqueeze(3) * a.unsqueeze(0).unsqueeze(2), "bias": d}


class _Conv2dRule(_Rule):
    """Per-sample gradients ``d_n U_n^T`` with ``U_n`` the unfolded input patches."""

    def accepts(self, mod, a, z):
        return a.dim() == 4 and z.dim() == 4

    def _unfold(self, mod: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.unfold(
            a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride
        )  # (N, C * kh * kw, P)

    def gradient(self, mod, a, d):
        U = self._unfold(mod, a)
        dp = d.reshape(d.shape[0], d.shape[1], -1)  # (N, O, P)
        return {"weight": torch.einsum("nop,ncp->oc", dp, U), "bias": dp.sum((0, 2))}

    def squares(self, mod, a, d, keep, dest):
        U = self._unfold(mod, a).transpose(1, 2)  # (N, P, C * kh * kw)
        dp = d.reshape(*d.shape[:3], -1)  # (K, N, O, P)
        if keep == "sample":  # sum over k, one (N, O, C * kh * kw) block at a time
            w = sum(torch.bmm(dp[k], U).square() for k in range(d.shape[0]))
            return {"weight": w, "bias": dp.sum(3).square().sum(0)}
        weight, bias = [], []
        for k in range(d.shape[0]):  # one (N, O, C * kh * kw) block of per-sample gradients
            weight.append(torch.bmm(dp[k], U).square().sum(0))
            bias.append(dp[k].sum(2).square().sum(0))
        w, b = torch.stack(weight), torch.stack(bias)
        if keep == "column":
            return {"weight": w, "bias": b}
        return {"weight": w.sum(0), "bias": b.sum(0)}

    def per_sample(self, mod, a, d):
        U = self._unfold(mod, a)  # (N, C * kh * kw, P)
        dp = d.reshape(*d.shape[:3], -1)  # (K, N, O, P)
        return {"weight": torch.einsum("knop,ncp->knoc", dp, U), "bias": dp.sum(3)}


_LINEAR, _CONV2D = _LinearRule(), _Conv2dRule()


def _grads(
    out: torch.Tensor, wrt: list[torch.Tensor], cot: torch.Tensor, *, batched: bool
) -> list[torch.Tensor]:
    """VJPs at the recorded module outputs; zeros for outputs that do not reach ``out``.

    The VJP at the model output itself (a last linear layer) is the cotangent: no pass.
    """
    inner = [w for w in wrt if w is not out]
    if not inner:
        grads: list[torch.Tensor] = []
    elif batched:  # NOTE [batched backward] in hesse/_hvp.py
        grads = batched_grad(out, inner, cot)
    else:
        found = torch.autograd.grad(out, inner, cot, retain_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(w) for g, w in zip(found, inner)]
    it = iter(grads)
    return [cot if w is out else next(it) for w in wrt]


def _row_bounds(ids: torch.Tensor) -> tuple[int, int]:
    """The ``[lo, hi)`` range of a chunk of consecutive row indices."""
    return int(ids[0]), int(ids[-1]) + 1


def _coupled(
    out: torch.Tensor,
    x: torch.Tensor,
    S: torch.Tensor,
    *,
    chunk_size: int | None,
    keep: str,
    call: str,
) -> torch.Tensor:
    """NOTE [coupled rows]: ``(J_n^T s_nk)^2`` from whole-batch VJPs, reduced as ``keep`` says.

    ``N * K`` VJPs, batched over groups of rows (all ``K`` columns of a row in one
    pass); memory: one group's cotangents and gradients, ``O(rows * K * (n + out))``.
    """
    N, D, K = S.shape
    n = x.numel()
    per_row = K * (n + out.numel()) * x.element_size()
    group = chunk_size or max(1, min(N, (256 * 2**20) // max(1, per_row)))
    flat_out = out.reshape(N, D)

    def cotangents(lo: int, hi: int) -> torch.Tensor:
        rows = hi - lo
        C = S.new_zeros(rows, K, N, D)
        r = torch.arange(rows, device=S.device)
        C[r, :, lo + r] = S[lo:hi].transpose(1, 2)  # (rows, K, D) into row lo + r
        return C.reshape(rows * K, *out.shape)

    def squares(ids: torch.Tensor) -> torch.Tensor:
        lo, hi = _row_bounds(ids)
        C = cotangents(lo, hi)
        if C.shape[0] == 1:
            (G,) = torch.autograd.grad(flat_out, x, C[0].reshape(N, D), retain_graph=True)
        else:
            (G,) = torch.autograd.grad(
                flat_out, x, C.reshape(-1, N, D), retain_graph=True, is_grads_batched=True
            )
        G = G.square().reshape(hi - lo, K, n)
        if keep == "sample":
            return G.sum(1)
        G = G.sum(0)  # (K, n)
        return G if keep == "column" else G.sum(0)

    return map_chunks(squares, None, N, _ids, chunk_size=group, call=call, total=keep != "sample")


def _generic(
    op: Any,
    inputs: Any,
    S: torch.Tensor,
    idx: torch.Tensor,
    *,
    chunk_size: int | None,
    keep: str,
    call: str,
) -> torch.Tensor:
    """Per-sample VJPs with respect to the flat entries ``idx``; squared, reduced by ``keep``."""
    N, _, K = S.shape
    m = idx.numel()
    group = chunk_size or max(1, min(N, (256 * 2**20) // max(1, 3 * K * m * op._x.element_size())))
    vjps = _sample_vjps(op, idx)

    def sample(inp: Any, s: torch.Tensor) -> torch.Tensor:
        return vjps(inp, s).square()  # (K, m)

    def reduce(G: torch.Tensor) -> torch.Tensor:  # (rows, K, m)
        return {"sample": G.sum(1), "column": G.sum(0), "total": G.sum((0, 1))}[keep]

    def batched(ids: torch.Tensor) -> torch.Tensor:
        lo, hi = _row_bounds(ids)
        chunk = tree_map(lambda t: t[lo:hi], inputs)
        return reduce(vmap(sample)(chunk, S[lo:hi]))

    def single(i: torch.Tensor) -> torch.Tensor:
        i = int(i)
        r = reduce(sample(tree_map(lambda t: t[i], inputs), S[i]).unsqueeze(0))
        return r[0] if keep == "sample" else r

    return map_chunks(batched, single, N, _ids, chunk_size=group, call=call, total=keep != "sample")
