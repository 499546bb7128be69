"""Import torchvision's pure-Python models when its compiled ops cannot load.

The torchvision wheel on PyPI is a CUDA build; next to a CPU-only torch its
compiled extension fails to load, and importing it then fails while registering
fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` ("operator
torchvision::nms does not exist"). The models themselves are plain PyTorch, so
declaring those two operator schemas (without kernels) is enough to import them.
Nothing changes when the extension loads: the schemas are then already there.
``transformers`` imports torchvision when it is installed, so a language-model
factory needs this too.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import torch

_LIBRARY: list[torch.library.Library] = []  # keeps the schema definitions alive


def import_torchvision() -> ModuleType | None:
    """``torchvision``, imported with the detection-op schemas declared if they are missing
    (``None`` if it is not installed)."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        name = schema.split("(")[0]
        if not hasattr(torch.ops.torchvision, name):
            lib.define(schema)
    _LIBRARY.append(lib)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import left partial modules behind
    return importlib.import_module("torchvision")
