"""Small shared helpers of the analysis package (validation of bases, JSON conversion)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import torch

from ..results import EigenResult, _plain

__all__ = ["as_basis", "check_orthonormal", "plain_dict"]


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


def check_orthonormal(V: torch.Tensor, name: str, tol: float) -> None:
    """Raise a ValueError unless ``V^T V = I`` to within ``tol`` (max abs entry)."""
    V64 = V.double()
    err = float((V64.T @ V64 - torch.eye(V.shape[1], dtype=torch.float64, device=V.device)).abs().max())
    if err > tol:
        raise ValueError(
            f"the columns of {name} are not orthonormal (max |{name}^T {name} - I| = {err:.2e} > {tol:g}); "
            "pass orthonormalize=True to orthonormalize them first (QR)"
        )


def plain_dict(obj: Any) -> Dict[str, Any]:
    """A dataclass as plain Python values, recursing into nested dataclasses that have ``to_dict``."""
    out: Dict[str, Any] = {}
    skip = getattr(obj, "_skip_in_dict", ())
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if hasattr(value, "to_dict") and dataclasses.is_dataclass(value):
            out[f.name] = value.to_dict()
        elif isinstance(value, (list, tuple)) and value and all(hasattr(v, "to_dict") for v in value):
            out[f.name] = [v.to_dict() for v in value]
        elif isinstance(value, torch.Size):
            out[f.name] = list(value)
        else:
            out[f.name] = _plain(value)
    return out
