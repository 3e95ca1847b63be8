r"""Linear solves with a curvature operator: :func:`solve` by conjugate gradients.

:math:`(A + \lambda I) x = b` for a symmetric operator :math:`A` (any :class:`CurvatureOperator` or
a dense symmetric tensor) and damping :math:`\lambda \ge 0`. This is the inner loop of Newton-CG /
Hessian-free optimization (Martens 2010: :math:`x = -(G + \lambda I)^{-1} g` with the GGN) and of
influence functions (Koh & Liang 2017: :math:`H^{-1} \nabla L_{test}`).

Conjugate gradients (Hestenes & Stiefel 1952) needs :math:`A + \lambda I` positive definite. Each
iteration costs one product; the iteration stops when the residual
:math:`\|r_k\| = \|b - (A + \lambda I) x_k\|` (updated recursively) is at most ``tol * ||b||``.
If a search direction :math:`p` has :math:`p^\top (A + \lambda I) p \le 0` the operator is not
positive definite along it: the solve stops there, returns the iterate reached so far (the
standard truncated-Newton answer; Nocedal & Wright 2006, Alg. 7.1), and reports
``negative_curvature=True`` with ``converged=False`` (add damping, or use the GGN, which is PSD for
convex losses). Scalars are accumulated in float64.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from ._checks import check_positive_int
from .operators import CurvatureOperator, as_operator, flatten, unflatten

__all__ = ["SolveResult", "solve"]


@dataclass(frozen=True)
class SolveResult:
    """The result of :func:`solve`.

    Attributes:
        solution: ``x`` (a flat tensor, or a list shaped like the parameters when ``b`` was a list).
        residual_norm: ``||b - (A + damping I) x||`` (the recursively updated residual).
        relative_residual: ``residual_norm / ||b||``.
        num_matvecs: operator products used.
        converged: whether ``relative_residual <= tol``.
        negative_curvature: whether a direction with ``p^T (A + damping I) p <= 0`` stopped the solve.
        curvature: ``p^T (A + damping I) p / ||p||^2`` along that direction (``None`` otherwise).
    """

    solution: Union[torch.Tensor, List[torch.Tensor]]
    residual_norm: float
    relative_residual: float
    num_matvecs: int
    converged: bool
    negative_curvature: bool = False
    curvature: Optional[float] = None

    def to_dict(self) -> dict:
        return {
            "residual_norm": self.residual_norm,
            "relative_residual": self.relative_residual,
            "num_matvecs": self.num_matvecs,
            "converged": self.converged,
            "negative_curvature": self.negative_curvature,
            "curvature": self.curvature,
        }


def _dot(op: CurvatureOperator, a: torch.Tensor, b: torch.Tensor) -> float:
    """``a^T b`` in float64 (over the shards, for a sharded operator)."""
    return op.dot(a.reshape(-1).double(), b.reshape(-1).double())


def solve(
    op: Union[CurvatureOperator, torch.Tensor],
    b: Union[torch.Tensor, Sequence[torch.Tensor]],
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iter: Optional[int] = None,
    x0: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
    progress: bool = False,
) -> SolveResult:
    r"""Solve :math:`(A + \text{damping}\, I)\, x = b` by conjugate gradients.

    Args:
        op: a :class:`CurvatureOperator` (Hessian, GGN, empirical Fisher, ...) or a dense symmetric
            tensor.
        b: the right-hand side: a flat tensor of length ``op.num_params`` or a list of tensors
            shaped like the operator's parameters (the solution then comes back as such a list).
        damping: :math:`\lambda \ge 0` added to the diagonal (Tikhonov / Levenberg-Marquardt).
        tol: stop when ``||r|| <= tol * ||b||`` (relative residual).
        max_iter: at most this many products (default ``op.num_params``, CG's exact-arithmetic bound,
            capped at 1000).
        x0: a starting point (default zero; costs one more product when given).
        progress: a progress bar over iterations.

    Returns:
        :class:`SolveResult`. A non-positive-definite operator stops the solve at the first direction
        of non-positive curvature, with ``negative_curvature=True`` and a ``RuntimeWarning``.

    Example:
        >>> op = hessopt.GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
        >>> r = hessopt.solve(op, -op.gradient(), damping=1e-3, tol=1e-4)
        >>> r.converged, r.num_matvecs
    """
    op = as_operator(op)
    as_list = isinstance(b, (list, tuple))
    if as_list:
        if op.shapes is None:
            raise TypeError(f"{type(op).__name__} works on flat vectors only: pass b as a flat tensor")
        b_flat = flatten(list(b))
    elif isinstance(b, torch.Tensor):
        b_flat = b
    else:
        raise TypeError(f"b must be a tensor or a list of tensors, got {type(b).__name__}")
    if b_flat.dim() != 1 or b_flat.numel() != op.local_size:
        raise ValueError(f"b must have {op.local_size} entries (one per parameter), got shape {tuple(b_flat.shape)}")
    if b_flat.dtype != op.dtype or b_flat.device != op.device:
        raise TypeError(
            f"b is {b_flat.dtype} on {b_flat.device} but the operator works in {op.dtype} on {op.device}: "
            "convert it with b.to(op.device, op.dtype)"
        )
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if max_iter is None:
        max_iter = min(op.num_params, 1000)
    check_positive_int("max_iter", max_iter)

    def apply(v: torch.Tensor) -> torch.Tensor:
        out = op @ v
        return out + damping * v if damping else out

    b_norm = math.sqrt(_dot(op, b_flat, b_flat))
    matvecs = 0
    if x0 is None:
        x = torch.zeros_like(b_flat)
        r = b_flat.clone()
    else:
        x = (flatten(list(x0)) if isinstance(x0, (list, tuple)) else x0).detach().clone().to(b_flat)
        if x.shape != b_flat.shape:
            raise ValueError(f"x0 must be shaped like b ({tuple(b_flat.shape)}), got {tuple(x.shape)}")
        r = b_flat - apply(x)
        matvecs += 1

    def result(converged: bool, rr: float, matvecs: int, negative: bool = False,
               curvature: Optional[float] = None) -> SolveResult:
        norm = math.sqrt(max(rr, 0.0))
        solution = unflatten(x, op.shapes) if as_list else x
        return SolveResult(solution=solution, residual_norm=norm,
                           relative_residual=norm / b_norm if b_norm > 0 else 0.0,
                           num_matvecs=matvecs, converged=converged, negative_curvature=negative,
                           curvature=curvature)

    rr = _dot(op, r, r)
    if b_norm == 0.0 or math.sqrt(rr) <= tol * b_norm:
        return result(True, rr, matvecs)
    p = r.clone()
    from ._progress import progress_bar

    with progress_bar(max_iter - matvecs, progress, "CG") as bar:
        while matvecs < max_iter:
            bar.update(1)
            ap = apply(p)
            matvecs += 1
            pap = _dot(op, p, ap)
            if pap <= 0.0 or not math.isfinite(pap):
                curvature = pap / _dot(op, p, p)
                warnings.warn(
                    f"hessopt.solve: the operator (+ damping {damping:g}) has non-positive curvature "
                    f"{curvature:.3e} along a conjugate-gradient direction: it is not positive definite, "
                    "so CG stopped at the iterate reached so far. Increase damping (above the most "
                    "negative eigenvalue) or use a PSD operator (GGNOperator, EmpiricalFisherOperator)",
                    RuntimeWarning, stacklevel=2,
                )
                return result(False, rr, matvecs, negative=True, curvature=curvature)
            alpha = rr / pap
            x.add_(p, alpha=alpha)
            r.add_(ap, alpha=-alpha)
            rr_new = _dot(op, r, r)
            if math.sqrt(rr_new) <= tol * b_norm:
                return result(True, rr_new, matvecs)
            p.mul_(rr_new / rr).add_(r)
            rr = rr_new
    return result(False, rr, matvecs)
