"""The AdaHessian optimizer, its curvature sources and its spatial-averaging rules."""
from .adahessian import AdaHessian, SecondOrderGraphError, adahessian_update
from .averaging import average_curvature
from .curvature import GradientCurvature, Hutchinson

__all__ = ["AdaHessian", "SecondOrderGraphError", "adahessian_update", "average_curvature", "Hutchinson", "GradientCurvature"]
