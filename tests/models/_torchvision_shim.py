"""Let a CUDA build of torchvision import next to a CPU build of torch.

torchvision's compiled ops fail to load against another torch build, and its Python
package then registers fake kernels for ``torchvision::nms`` (and ``qnms``), which
needs the op schemas to exist: ``operator torchvision::nms does not exist``. The
models (ResNet, ViT) are pure Python and never call these ops, so defining the
schemas (without kernels) before the first import is enough. ``transformers``
imports torchvision too. Nothing is defined where the compiled ops loaded.
"""

from __future__ import annotations

import sys

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY: list = []  # keeps the definitions alive


def install() -> None:
    """Define the missing ``torchvision::*`` schemas (idempotent; before importing torchvision)."""
    if _LIBRARY or "torchvision" in sys.modules:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - loaded by a matching torchvision build
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
    for schema in _SCHEMAS:
        lib.define(schema)
    _LIBRARY.append(lib)
