"""Frozen result types returned by the estimators.

Every estimator returns one of these dataclasses rather than a bare tuple, so that call sites read
``result.eigenvalues`` instead of ``result[0]`` and so that a result can be logged with
:meth:`to_dict` (plain Python numbers and lists, ready for ``json.dumps``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["EigenResult", "TraceResult", "LanczosResult", "SpectralDensity"]


def _plain(value: Any) -> Any:
    """Convert tensors (and containers of them) to Python numbers and lists for JSON."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _ToDict:
    _skip_in_dict: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain Python values (tensors become lists), minus bulky vectors."""
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name not in self._skip_in_dict
        }


@dataclasses.dataclass(frozen=True)
class EigenResult(_ToDict):
    """Top eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` float64, algebraic values in descending order (for ``which="smallest"``
            ascending, for ``which="magnitude"`` by descending absolute value).
        eigenvectors: ``(n, k)`` in the operator's dtype, unit-norm columns matching ``eigenvalues``.
        residuals: ``(k,)`` float64, the true ``||A v_i - lambda_i v_i||`` for each pair.
        error_bounds: ``(k,)`` float64, an a-posteriori bound on ``|lambda_i - true eigenvalue|``
            derived from the residuals (see :func:`hessopt.top_eigenvalues`).
        num_matvecs: operator applications spent.
        converged: whether the stopping test held for every pair: Lanczos
            ``error_bounds[i] <= tol * |eigenvalues[i]|``; power iteration, the residual of the
            deflated operator ``<= tol * |eigenvalues[i]|``.
        method: ``"lanczos"`` or ``"power"``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor = dataclasses.field(repr=False)
    residuals: torch.Tensor
    error_bounds: torch.Tensor
    num_matvecs: int
    converged: bool
    method: str

    _skip_in_dict = ("eigenvectors",)


@dataclasses.dataclass(frozen=True)
class TraceResult(_ToDict):
    """A stochastic trace estimate with its standard error.

    Attributes:
        estimate: the trace estimate.
        std_error: standard error of ``estimate`` (sample standard deviation of the per-probe
            estimates divided by the square root of their number; for Hutch++ the deterministic
            low-rank part contributes no variance and the error is that of the residual part).
        num_matvecs: operator applications spent.
        method: ``"hutchinson"`` or ``"hutch++"``.
        samples: the per-probe quadratic forms that the error bar is computed from (float64).
    """

    estimate: float
    std_error: float
    num_matvecs: int
    method: str
    samples: torch.Tensor = dataclasses.field(repr=False)

    _skip_in_dict = ("samples",)


@dataclasses.dataclass(frozen=True)
class LanczosResult(_ToDict):
    """Output of :func:`hessopt.lanczos`: the tridiagonal ``T = V^T A V`` and optionally ``V``.

    Attributes:
        alphas: ``(m,)`` float64 diagonal of ``T``.
        betas: ``(m - 1,)`` float64 off-diagonal of ``T``.
        basis: ``(n, m)`` orthonormal Lanczos vectors in the operator's dtype, or ``None`` when not kept.
        residual_norm: ``beta_m``, the norm of the component left outside the Krylov space; zero (up
            to round-off) when the space became invariant and the iteration stopped early.
        num_matvecs: operator applications spent (equals ``m``).
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    basis: Optional[torch.Tensor] = dataclasses.field(repr=False)
    residual_norm: float
    num_matvecs: int

    _skip_in_dict = ("basis",)

    def tridiagonal(self) -> torch.Tensor:
        """The dense ``(m, m)`` float64 tridiagonal matrix ``T``."""
        return (
            torch.diag(self.alphas)
            + torch.diag(self.betas, diagonal=1)
            + torch.diag(self.betas, diagonal=-1)
        )


@dataclasses.dataclass(frozen=True)
class SpectralDensity(_ToDict):
    """Eigenvalue spectral density by stochastic Lanczos quadrature (SLQ).

    Attributes:
        nodes: one float64 tensor per run, the Ritz values of that run (the quadrature nodes).
        weights: one float64 tensor per run, the quadrature weights (squared first components of the
            Ritz vectors); each run's weights sum to 1.
        grid: float64 points at which ``density`` is evaluated.
        density: float64 Gaussian-smoothed density on ``grid``, averaged over runs; integrates to 1.
        sigma: standard deviation of the Gaussian kernel used for smoothing.
        num_matvecs: operator applications spent over all runs.
    """

    nodes: Tuple[torch.Tensor, ...]
    weights: Tuple[torch.Tensor, ...]
    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    num_matvecs: int

    @property
    def mean(self) -> float:
        """Mean eigenvalue implied by the quadrature, ``sum_i w_i t_i`` averaged over runs.

        Each run's mean is ``v^T A v`` for a unit probe ``v``: multiplied by ``n`` it is a
        Hutchinson estimate of the trace.
        """
        means = [float((w * t).sum()) for t, w in zip(self.nodes, self.weights)]
        return sum(means) / len(means)
