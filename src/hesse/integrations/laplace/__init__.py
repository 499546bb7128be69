"""hesse as a curvature backend of laplace-torch (``pip install "hesse[laplace]"``).

``Laplace(model, "classification", hessian_structure="diag", backend=HesseGGN)``:
see :mod:`hesse.integrations.laplace._backends` and docs/laplace.md.
"""

from hesse.integrations.laplace._version import SUPPORTED, check_version

check_version()

from hesse.integrations.laplace._backends import HesseEF, HesseGGN, HesseHessian  # noqa: E402

__all__ = ["SUPPORTED", "HesseEF", "HesseGGN", "HesseHessian", "check_version"]
