"""hesse: second derivatives for PyTorch, exact where structure allows, fast everywhere.

The public names live here; each is implemented in a private module with one idea.
"""

from hesse import (
    distributed,  # the subpackage hesse.distributed (data-parallel curvature)
    solvers,  # the subpackage hesse.solvers (linear solves with curvature)
)
from hesse._chunking import LoopFallbackWarning
from hesse._estimate import Estimate
from hesse._transforms import hessian, hvp
from hesse.curvprop import CurvpropFallbackWarning, per_sample_diagonal
from hesse.estimators import diagonal
from hesse.influence import InfluenceInfo, influence, self_influence
from hesse.kfac import EKFACOperator, KFACOperator
from hesse.operators import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    as_operator,
    hessian_operator,
)
from hesse.solvers import NotConvergedError, NotConvergedWarning, SolveResult, inverse, solve
from hesse.sparsity._sparse import (
    hessian_diagonal,
    hessian_sparsity,
    jacobian_sparsity,
    sparse_hessian,
    sparse_jacobian,
)
from hesse.spectra import EigshResult, SpectralDensity, eigsh, spectral_density, trace

__version__ = "0.1.0"

__all__ = [
    "CurvpropFallbackWarning",
    "EKFACOperator",
    "EigshResult",
    "Estimate",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "InfluenceInfo",
    "KFACOperator",
    "LinearOperator",
    "LoopFallbackWarning",
    "NotConvergedError",
    "NotConvergedWarning",
    "SolveResult",
    "SpectralDensity",
    "as_operator",
    "diagonal",
    "distributed",
    "eigsh",
    "hessian",
    "hessian_diagonal",
    "hessian_sparsity",
    "jacobian_sparsity",
    "per_sample_diagonal",
    "self_influence",
    "sparse_hessian",
    "sparse_jacobian",
    "hessian_operator",
    "hvp",
    "influence",
    "inverse",
    "solve",
    "solvers",
    "spectral_density",
    "trace",
]
