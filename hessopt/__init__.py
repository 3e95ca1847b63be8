"""hessopt: an AdaHessian optimizer and Hessian diagnostics for PyTorch, on one HVP core.

The public API is flat; names are grouped below by layer: core, operators, estimators, spectrum,
optimizers, monitor.
"""
from .hvp import hvp, hvp_from_grads, second_order_safe
from .operators import (
    CurvatureOperator,
    DistributedOperatorError,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LambdaOperator,
    MatrixOperator,
    NonFiniteCurvatureError,
)
from .solve import SolveResult, solve
from .estimators import diagonal, trace
from .results import CurvatureSummary, EigenResult, LanczosResult, SpectralDensity, TraceResult
from .spectrum import lanczos, spectral_density, top_eigenvalues
from .optim import (AdaHessian, FiniteDifference, GaussNewtonBartlett, GradientCurvature, Hutchinson, NonFiniteError,
                    SecondOrderGraphError, Sophia)
from .summary import curvature_summary
from .monitor import CurvatureMonitor
from .report import Report, report

__version__ = "0.1.0"

__all__ = [
    # core
    "hvp",
    "hvp_from_grads",
    "second_order_safe",
    # operators
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "MatrixOperator",
    "LambdaOperator",
    "NonFiniteCurvatureError",
    "DistributedOperatorError",
    # linear solves
    "solve",
    "SolveResult",
    # estimators
    "trace",
    "diagonal",
    # spectrum
    "lanczos",
    "top_eigenvalues",
    "spectral_density",
    # optim
    "AdaHessian",
    "Sophia",
    "Hutchinson",
    "GaussNewtonBartlett",
    "FiniteDifference",
    "GradientCurvature",
    "SecondOrderGraphError",
    "NonFiniteError",
    # diagnostics: one summary, the monitor, the report
    "curvature_summary",
    "CurvatureMonitor",
    "report",
    "Report",
    # results
    "EigenResult",
    "TraceResult",
    "LanczosResult",
    "SpectralDensity",
    "CurvatureSummary",
]
