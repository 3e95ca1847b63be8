"""Small shared helpers of the analysis package (validation of bases)."""
from __future__ import annotations

from typing import Any

import torch

from ..results import EigenResult

__all__ = ["as_basis", "check_orthonormal", "refuse_sharded"]


def refuse_sharded(op: Any, what: str) -> None:
    """A clear error for an analysis that needs whole vectors, given a sharded (FSDP2) operator."""
    if getattr(op, "is_sharded", False):
        op._refuse_sharded(what)


def as_basis(vectors: Any, name: str = "V") -> torch.Tensor:
    """``vectors`` as an ``(n, k)`` tensor: a 1-D vector becomes one column, an
    :class:`hessopt.EigenResult` gives its eigenvectors."""
    if isinstance(vectors, EigenResult):
        vectors = vectors.eigenvectors
    if not isinstance(vectors, torch.Tensor):
        raise TypeError(
            f"{name} must be a tensor of column vectors (n, k) or an EigenResult, got {type(vectors).__name__}"
        )
    if vectors.dim() == 1:
        vectors = vectors[:, None]
    if vectors.dim() != 2 or vectors.shape[1] < 1 or vectors.shape[0] < 1:
        raise ValueError(f"{name} must be an (n, k) matrix with k >= 1 columns, got shape {tuple(vectors.shape)}")
    if not vectors.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {vectors.dtype}")
    if not bool(torch.isfinite(vectors).all()):
        raise ValueError(f"{name} contains NaN/Inf (an eigensolver that did not converge?)")
    return vectors


def check_orthonormal(V: torch.Tensor, name: str, tol: float, reduce_sum=None) -> None:
    """Raise a ValueError unless ``V^T V = I`` to within ``tol`` (max abs entry); ``reduce_sum``:
    an operator's (:meth:`hessopt.operators.CurvatureOperator.reduce_sum`) when ``V`` holds this
    process's rows of sharded vectors."""
    V64 = V.double()
    gram = V64.T @ V64 if reduce_sum is None else reduce_sum(V64.T @ V64)
    err = float((gram - torch.eye(V.shape[1], dtype=torch.float64, device=V.device)).abs().max())
    if err > tol:
        raise ValueError(
            f"the columns of {name} are not orthonormal (max |{name}^T {name} - I| = {err:.2e} > {tol:g}); "
            "pass orthonormalize=True to orthonormalize them first (QR)"
        )


