"""hesse: second derivatives for PyTorch, exact where structure allows, fast everywhere.

The public names live here; each is implemented in a private module with one idea.
"""

from hesse._chunking import LoopFallbackWarning
from hesse._transforms import hessian, hvp
from hesse.spectra import EigshResult, SpectralDensity, eigsh, spectral_density, trace

__version__ = "0.1.0"

__all__ = [
    "EigshResult",
    "LoopFallbackWarning",
    "SpectralDensity",
    "eigsh",
    "hessian",
    "hvp",
    "spectral_density",
    "trace",
]
