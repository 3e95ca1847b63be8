"""Curvature operators: symmetric linear maps ``v -> A v`` that the estimators apply.

Estimators (trace, diagonal, eigenvalues, spectral density, solve) only ever compute ``op @ v``;
the operator owns everything else: which parameters, which data, how a model is put in the right
mode and restored. So every estimator can be tested on a 10x10 matrix, and every operator against a
dense oracle.

``op @ v`` accepts a flat 1-D tensor of length ``op.local_size`` (``op.num_params`` unless the model is
sharded by FSDP2; returns a flat tensor), a list of tensors shaped like the operator's parameters
(returns such a list; model-based operators only), or a 2-D tensor of shape ``(local_size, k)``
(applies the operator to each column). The operator also owns the inner product of its space
(``dot``, ``norm``, ``reduce_sum``, ``probe``), which the estimators use, so they run unchanged on
sharded vectors.

Modules:
    base:     CurvatureOperator (the interface, ``to_scipy()``), MatrixOperator, LambdaOperator.
    _model:   ModelOperator, the constructor conventions and data protocol of the model operators.
    _sharded_model: the same on FSDP2-sharded parameters (sharded vectors, FSDP's averaging).
    hessian:  HessianOperator (reverse, forward-over-reverse, finite differences).
    ggn:      GGNOperator, the generalized Gauss-Newton matrix J^T H_L J.
    _finite_difference: theta +- eps v for both finite-difference methods (step, moves, ReLU patterns).
    fisher:   EmpiricalFisherOperator, (1/N) sum_n g_n g_n^T.
"""
from .._batches import call_model, is_single_batch as _is_single_batch, to_device as _to_device
from ..distributed import DistributedOperatorError
from ._model import ModelOperator, operator_mode as _operator_mode, select_params as _select_params
from .base import (
    CurvatureOperator,
    LambdaOperator,
    MatrixOperator,
    NonFiniteCurvatureError,
    as_operator,
    flatten,
    unflatten,
)
from .fisher import EmpiricalFisherOperator
from .ggn import GGN_METHODS, GGNOperator
from .hessian import HVP_METHODS, HessianOperator

__all__ = [
    "CurvatureOperator",
    "ModelOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "MatrixOperator",
    "LambdaOperator",
    "NonFiniteCurvatureError",
    "DistributedOperatorError",
    "as_operator",
    "flatten",
    "unflatten",
    "call_model",
    "HVP_METHODS",
    "GGN_METHODS",
]
