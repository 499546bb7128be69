"""The laplace-torch versions this integration is tested with, and the check."""

from __future__ import annotations

import importlib.metadata
import re

#: the supported laplace-torch versions: ``>= 0.3, < 0.4`` (tested with 0.3).
SUPPORTED = ((0, 3), (0, 4))
_RANGE = "laplace-torch >= 0.3, < 0.4"


def _release(version: str) -> tuple[int, ...]:
    numbers = re.match(r"(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in numbers.group(1).split(".")) if numbers else ()


def check_version(version: str | None = None) -> str:
    """Raise ``ImportError`` unless laplace-torch (or ``version``) is in :data:`SUPPORTED`.

    Args:
        version: a version string to check; default: the installed laplace-torch.

    Returns:
        The checked version.

    Raises:
        ImportError: laplace-torch is missing or outside the supported range.
    """
    call = "hesse.integrations.laplace"
    if version is None:
        try:
            version = importlib.metadata.version("laplace-torch")
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(
                f"{call}: laplace-torch is not installed; this integration supports {_RANGE}. "
                'Install it with pip install "hesse[laplace]".'
            ) from None
    low, high = SUPPORTED
    if not low <= _release(version)[:2] < high:
        raise ImportError(
            f"{call}: expected {_RANGE}, got laplace-torch {version}. Its curvature interface "
            f'differs between releases: install a supported one with pip install "hesse[laplace]".'
        )
    return version
