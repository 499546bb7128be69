"""The layers KFAC understands: how each one's weight is a matrix acting on input rows.

# NOTE [kfac layers]
Every supported layer computes, at each of its ``R`` shared positions ``r`` (a
sequence position, a convolution's output pixel), an output ``s_r = P a_r`` with
``P`` its parameters arranged as a ``(p, q)`` matrix and ``a_r`` a ``q``-vector of
inputs. Its weight gradient is then ``sum_r g_r a_r^T`` with ``g_r`` the gradient
with respect to ``s_r``. A :class:`LayerSpec` knows, for one module,

* ``rows(input)``: the ``(N, R, q)`` input rows ``a`` (a ``1`` appended when the
  bias is in the augmented input factor),
* ``grad_rows(grad_output)``: the ``(K, N, R, p)`` output-gradient rows ``g``,
* which selected parameters make up ``P`` and how to cut them out of a flat vector.

``nn.Linear`` (any leading dimensions: ``N`` the first, ``R`` the product of the
rest): ``P = [W | b]``. ``nn.Conv1d/2d/3d``: ``P = [W.reshape(out, -1) | b]`` on
the unfolded input patches (Grosse & Martens 2016), ``R`` the output pixels.
``nn.Embedding``: ``P = W^T`` (``p`` = embedding size, ``q`` = vocabulary) with
one-hot input rows, so the input factor is diagonal (token counts) and is kept
as a vector; rows holding ``padding_idx`` carry no gradient and are zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hesse._validation import fail

SUPPORTED = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding"


@dataclass
class Piece:
    """One selected parameter inside a block: its name, place in the flat vector, shape."""

    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]


@dataclass
class LayerSpec:
    """One Kronecker block: a supported module and the selected parameters forming ``P``.

    ``name`` is the block's name (the module's, or ``module.weight`` / ``module.bias``
    when the bias is a block of its own, with input factor ``[1]``).
    """

    name: str
    module_name: str
    module: nn.Module
    weight: Piece | None
    bias: Piece | None
    p: int = field(init=False)
    q_weight: int = field(init=False)

    def __post_init__(self) -> None:
        m = self.module
        if isinstance(m, nn.Embedding):
            self.p, self.q_weight = m.embedding_dim, m.num_embeddings
        elif isinstance(m, nn.Linear):
            self.p, self.q_weight = m.out_features, m.in_features
        else:
            w = m.weight
            self.p, self.q_weight = w.shape[0], w[0].numel()

    @property
    def diagonal_input(self) -> bool:
        """The input factor is diagonal (one-hot input rows): kept as a vector."""
        return isinstance(self.module, nn.Embedding) and self.weight is not None

    @property
    def q(self) -> int:
        return (self.q_weight if self.weight is not None else 0) + (self.bias is not None)

    # -- the matrix P of a batch of flat vectors -------------------------------------
    def pack(self, X: torch.Tensor) -> torch.Tensor:
        """``(k, p, q)``: the block's parameters of the columns of ``X`` (``(n, k)``) as ``P``."""
        k = X.shape[1]
        parts = []
        if self.weight is not None:
            w = X[self.weight.offset : self.weight.offset + self.weight.numel].T
            if isinstance(self.module, nn.Embedding):
                parts.append(w.reshape(k, self.q_weight, self.p).transpose(1, 2))
            else:
                parts.append(w.reshape(k, self.p, self.q_weight))
        if self.bias is not None:
            b = X[self.bias.offset : self.bias.offset + self.bias.numel].T
            parts.append(b.reshape(k, self.p, 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def unpack(self, P: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``P`` (``(k, p, q)``) into the block's rows of ``out`` (``(n, k)``)."""
        k = P.shape[0]
        if self.weight is not None:
            w = P[:, :, : self.q_weight]
            if isinstance(self.module, nn.Embedding):
                w = w.transpose(1, 2)
            out[self.weight.offset : self.weight.offset + self.weight.numel] = w.reshape(k, -1).T
        if self.bias is not None:
            out[self.bias.offset : self.bias.offset + self.bias.numel] = P[:, :, -1].T

    # -- input rows ------------------------------------------------------------------
    def rows(self, inputs: torch.Tensor, *, augment: bool = True) -> torch.Tensor:
        """``(N, R, q)`` input rows; for an embedding, the ``(N, R)`` token indices.

        ``augment=False`` leaves out the bias column of ones (and returns the weight's
        rows even if only the bias is selected): :func:`hesse.kfac._kronecker` adds its
        moments without materialising the concatenation.
        """
        m = self.module
        if isinstance(m, nn.Embedding):
            return inputs.reshape(inputs.shape[0], -1)
        if isinstance(m, nn.Linear):
            a = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        else:
            a = _patches(m, inputs)
        if not augment:
            return a
        parts = []
        if self.weight is not None:
            parts.append(a)
        if self.bias is not None:
            parts.append(a.new_ones(*a.shape[:2], 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def grad_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        """``(K, N, R, p)`` output-gradient rows from ``(K, *output.shape)``."""
        K, N = grad_output.shape[:2]
        if isinstance(self.module, (nn.Linear, nn.Embedding)):
            return grad_output.reshape(K, N, -1, self.p)
        # convolution: (K, N, out, *spatial) -> (K, N, L, out)
        return grad_output.reshape(K, N, self.p, -1).transpose(2, 3)

    def embedding_mask(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Rows that are not padding (``idx != padding_idx``), or ``None`` for all."""
        pad = self.module.padding_idx  # type: ignore[union-attr]
        return None if pad is None else idx != pad


def _patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, L, C_in * prod(kernel))`` unfolded input patches of a convolution.

    The column order is the order of ``weight.reshape(out, -1)``.
    """
    d = len(m.kernel_size)
    kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
    padding = _padding(m)
    if d <= 2:
        if d == 1:
            x = x.unsqueeze(2)
            kernel, stride, dilation, padding = (
                (1, *kernel),
                (1, *stride),
                (1, *dilation),
                (0, *padding),
            )
        cols = nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return cols.transpose(1, 2)
    # 3-D: torch has no unfold; a convolution with one-hot kernels extracts the patches.
    c = x.shape[1]
    k = c * int(torch.tensor(kernel).prod())
    eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, c, *kernel)
    cols = nn.functional.conv3d(x, eye, stride=stride, padding=padding, dilation=dilation)
    return cols.reshape(x.shape[0], k, -1).transpose(1, 2)


def _padding(m: nn.Module) -> tuple[int, ...]:
    padding = m.padding
    if padding == "valid":
        return (0,) * len(m.kernel_size)
    if padding == "same":
        out = []
        for k, dil in zip(m.kernel_size, m.dilation):
            total = dil * (k - 1)
            out.append(total // 2)  # checked symmetric in check_module
        return tuple(out)
    return tuple(padding)


def check_module(call: str, name: str, m: nn.Module, kfac_approx: str) -> None:
    """Refuse the options of a supported module that KFAC's factorisation does not cover."""
    where = f"module {name!r} ({type(m).__name__})"
    if isinstance(m, nn.Embedding):
        if m.max_norm is not None or m.scale_grad_by_freq:
            fail(
                call,
                f"{where} uses max_norm or scale_grad_by_freq, which KFAC does not model. "
                "Create the embedding without them, or leave its weight out with params=[...].",
                NotImplementedError,
            )
        if kfac_approx == "reduce":
            fail(
                call,
                f"{where}: kfac_approx='reduce' would make the embedding's input factor dense "
                "(vocabulary x vocabulary). Use kfac_approx='expand', or leave its weight out "
                "with params=[...].",
                NotImplementedError,
            )
    elif isinstance(m, nn.modules.conv._ConvNd):
        if m.transposed:  # pragma: no cover - ConvTranspose is not in SUPPORTED_TYPES
            fail(call, f"{where} is a transposed convolution.", NotImplementedError)
        if m.groups != 1:
            fail(
                call,
                f"{where} has groups={m.groups}; KFAC here supports groups=1 only. Leave its "
                "parameters out with params=[...].",
                NotImplementedError,
            )
        if m.padding_mode != "zeros":
            fail(
                call,
                f"{where} has padding_mode={m.padding_mode!r}; only 'zeros' is supported. "
                "Leave its parameters out with params=[...].",
                NotImplementedError,
            )
        if m.padding == "same" and any(
            dil * (k - 1) % 2 for k, dil in zip(m.kernel_size, m.dilation)
        ):
            fail(
                call,
                f"{where} has padding='same' with an even kernel extent (asymmetric padding). "
                "Pad explicitly with integers, or leave its parameters out with params=[...].",
                NotImplementedError,
            )


SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def find_blocks(
    call: str,
    model: nn.Module,
    offsets: dict[str, Piece],
    *,
    separate_bias: bool,
    kfac_approx: str,
) -> list[LayerSpec]:
    """The Kronecker blocks covering every selected parameter (``offsets``: name -> piece).

    Raises NotImplementedError for a selected parameter outside a supported layer
    (naming its module and the way out), a parameter shared by several modules
    (tied weights), or a model without any supported layer.
    """
    owners: dict[int, list[str]] = {}
    for full, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(full)
    modules = dict(model.named_modules())
    blocks: list[LayerSpec] = []
    covered: set[str] = set()
    any_supported = False
    for mod_name, m in modules.items():
        if not isinstance(m, SUPPORTED_TYPES):
            continue
        any_supported = True
        pieces: dict[str, Piece] = {}
        for local in ("weight", "bias"):
            param = getattr(m, local, None)
            if not isinstance(param, nn.Parameter):
                continue
            names = owners.get(id(param), [])
            canonical = next((n for n in names if n in offsets), None)
            if canonical is None:
                continue
            if len(names) > 1:
                fail(
                    call,
                    f"parameter {canonical!r} is shared by {names} (tied weights); KFAC needs "
                    "each parameter in one layer. Leave it out with params=[...].",
                    NotImplementedError,
                )
            pieces[local] = offsets[canonical]
        if not pieces:
            continue
        check_module(call, mod_name, m, kfac_approx)
        weight, bias = pieces.get("weight"), pieces.get("bias")
        prefix = f"{mod_name}." if mod_name else ""
        if separate_bias and weight is not None and bias is not None:
            blocks.append(LayerSpec(f"{prefix}weight", mod_name, m, weight, None))
            blocks.append(LayerSpec(f"{prefix}bias", mod_name, m, None, bias))
        else:
            blocks.append(LayerSpec(mod_name, mod_name, m, weight, bias))
        covered.update(piece.name for piece in pieces.values())
    if not any_supported:
        fail(
            call,
            f"the model has no layer KFAC supports ({SUPPORTED}). Use hesse.GGNOperator or "
            "hesse.FisherOperator for other models.",
            NotImplementedError,
        )
    uncovered = [name for name in offsets if name not in covered]
    if uncovered:
        name = uncovered[0]
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        kind = type(modules.get(owner, model)).__name__
        supported = [n for n in offsets if n in covered]
        fail(
            call,
            f"parameter {name!r} belongs to module {owner!r} ({kind}), which KFAC does not "
            f"support (supported: {SUPPORTED}); {len(uncovered)} selected parameter(s) are "
            f"outside supported layers: {uncovered}. Select only supported ones with "
            f"params={supported}, and treat the others with hesse.GGNOperator(..., "
            "params=[...]).",
            NotImplementedError,
        )
    return blocks


def apply_blocks(
    X: torch.Tensor,
    blocks: list[LayerSpec],
    fn: Callable[[LayerSpec, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``(n, k) -> (n, k)``: ``fn(block, P)`` on every block's ``(k, p, q)`` stack."""
    out = torch.zeros_like(X)
    for b in blocks:
        b.unpack(fn(b, b.pack(X)), out)
    return out
