"""The AdaHessian optimizer, its curvature sources and its spatial-averaging rules."""
from .adahessian import AdaHessian, SecondOrderGraphError, adahessian_update
from .averaging import average_curvature
from .curvature import ExactDiagonal, GradientCurvature, Hutchinson, make_curvature

__all__ = ["AdaHessian", "SecondOrderGraphError", "adahessian_update", "average_curvature", "Hutchinson", "GradientCurvature",
           "ExactDiagonal", "make_curvature"]
