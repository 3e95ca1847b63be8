"""The optimizers (AdaHessian, Sophia), their curvature sources and spatial-averaging rules."""
from ._base import NonFiniteError, SecondOrderGraphError
from .adahessian import AdaHessian, adahessian
from .averaging import average_curvature
from .curvature import (CurvatureInputs, CurvatureSource, ExactDiagonal, FiniteDifference, GaussNewtonBartlett,
                        GradientCurvature, Hutchinson, make_curvature)
from .sophia import SOPHIA_PRESETS, Sophia, sophia

__all__ = ["AdaHessian", "adahessian", "Sophia", "sophia", "SOPHIA_PRESETS", "NonFiniteError",
           "SecondOrderGraphError", "average_curvature", "CurvatureSource", "CurvatureInputs", "Hutchinson",
           "GaussNewtonBartlett", "FiniteDifference", "GradientCurvature", "ExactDiagonal", "make_curvature"]
