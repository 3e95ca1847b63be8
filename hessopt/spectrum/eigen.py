r"""Top eigenpairs of a symmetric operator: Lanczos (default) or power iteration with deflation.

**Convergence is judged on residuals, never on a relative change.** For a unit vector :math:`v`
and :math:`\theta = v^\top A v`, the residual :math:`r = \|Av - \theta v\|` bounds the eigenvalue
error two ways: some eigenvalue lies within :math:`r` of :math:`\theta`, and if the nearest other
eigenvalue is at distance :math:`\delta` (the gap), :math:`|\lambda - \theta| \le r^2 / \delta`
(Kato-Temple; Parlett, *The Symmetric Eigenvalue Problem*, ch. 11). Lanczos reports the error
bound :math:`\min(r, r^2/\delta)` with :math:`\delta` estimated from the other Ritz values, and stops
when every wanted pair has a bound below ``tol`` times its eigenvalue; power iteration, which has
no gap estimate, uses :math:`r` itself. A stopping rule on the change between iterations (as in
PyHessian) can stop early on a slowly converging iteration; a residual cannot be small unless
:math:`v` is close to an eigenvector.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional

import torch

from .._progress import progress_bar
from ..operators import as_operator
from ..probes import GeneratorLike, generator_for, probe
from ..results import EigenResult
from .lanczos import LanczosIteration

__all__ = ["top_eigenvalues"]

_WHICH = ("largest", "smallest", "magnitude")


def _order(values: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of ``values`` in the order ``which`` wants them (best first)."""
    if which == "largest":
        return torch.argsort(values, descending=True)
    if which == "smallest":
        return torch.argsort(values)
    return torch.argsort(values.abs(), descending=True)


def _error_bounds(theta: torch.Tensor, residuals: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``min(r, r^2 / gap)`` for the chosen Ritz values, the gap measured to the other Ritz values."""
    bounds = residuals.clone()
    for i, idx in enumerate(chosen.tolist()):
        others = torch.cat([theta[:idx], theta[idx + 1 :]])
        if others.numel():
            gap = float((others - theta[idx]).abs().min())
            if gap > 0:
                bounds[i] = min(float(residuals[i]), float(residuals[i]) ** 2 / gap)
    return bounds


def _converged(values: torch.Tensor, bounds: torch.Tensor, tol: float, scale: float) -> bool:
    floor = 100 * torch.finfo(torch.float32).eps * scale  # eigenvalues at ~0 compare to the spectrum's scale
    return bool((bounds <= tol * torch.clamp(values.abs(), min=floor)).all())


def top_eigenvalues(
    op,
    k: int = 1,
    method: str = "lanczos",
    which: str = "largest",
    tol: float = 1e-5,
    max_matvecs: Optional[int] = None,
    generator: GeneratorLike = None,
    progress: bool = False,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator.

    Args:
        op: an operator (e.g. :class:`hessopt.HessianOperator`) or a dense symmetric tensor.
        k: number of eigenpairs (at most the dimension).
        method: ``"lanczos"`` (default: Krylov space with full reorthogonalization; finds all ``k``
            at once, far fewer matvecs) or ``"power"`` (power iteration with deflation, as in
            PyHessian, kept for comparison).
        which: ``"largest"`` algebraic (default; the sharpest directions), ``"smallest"``
            algebraic (the most negative curvature), or ``"magnitude"``.
        tol: relative accuracy: stop when each eigenvalue's error bound (see module docstring) is
            at most ``tol * |eigenvalue|``. The float32 Hessian of a network supports about 1e-5.
        max_matvecs: budget (default: Lanczos ``min(n, max(100, 20 k))``, power ``200 k``). If it
            runs out first, ``converged`` is False and a warning is issued.
        generator: generator, seed or ``None`` for the random start vector(s).
        progress: show a progress bar.

    Returns:
        :class:`hessopt.EigenResult`: ``eigenvalues`` (float64, ordered by ``which``: descending
        for ``"largest"``), ``eigenvectors`` (``(n, k)``), ``residuals``, ``error_bounds``,
        ``num_matvecs``, ``converged``.

    Example:
        >>> r = hessopt.top_eigenvalues(op, k=5, tol=1e-4)
        >>> r.eigenvalues, r.residuals, r.converged
    """
    op = as_operator(op)
    n = op.num_params
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} is larger than the dimension of the operator ({n}); ask for at most {n}")
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if method == "lanczos":
        budget = min(n, max(100, 20 * k)) if max_matvecs is None else max_matvecs
        if budget < k:
            raise ValueError(f"max_matvecs={budget} is too small: Lanczos needs at least k={k} matvecs")
        result = _lanczos_eigs(op, k, which, tol, budget, generator, progress)
    elif method == "power":
        budget = 200 * k if max_matvecs is None else max_matvecs
        result = _power_eigs(op, k, which, tol, budget, generator, progress)
    else:
        raise ValueError(f"unknown method {method!r}; choose 'lanczos' or 'power'")
    if not result.converged:
        warnings.warn(
            f"top_eigenvalues({method}) did not reach tol={tol} within {result.num_matvecs} matvecs "
            f"(largest error bound {float(result.error_bounds.max()):.3g}); raise max_matvecs or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    return result


def _lanczos_eigs(op, k, which, tol, budget, generator, progress) -> EigenResult:
    it = LanczosIteration(op, budget, generator=generator, restart=True)
    done = False
    with progress_bar(it.max_steps, progress, f"Lanczos top-{k}") as bar:
        while True:
            stepped = it.step()
            bar.update()
            if it.size >= k:
                theta, S = torch.linalg.eigh(it.tridiagonal())
                chosen = _order(theta, which)[:k]
                residuals = (it.residual_norm * S[-1, chosen]).abs()
                bounds = _error_bounds(theta, residuals, chosen)
                scale = float(theta.abs().max())
                done = _converged(theta[chosen], bounds, tol, scale)
                if done or not stepped or it.size >= it.max_steps or it.exhausted:
                    break
            elif not stepped:
                break
    vectors = it.basis[: it.size].T @ S[:, chosen].to(op.dtype)
    return EigenResult(
        eigenvalues=theta[chosen].clone(),
        eigenvectors=vectors,
        residuals=residuals,
        error_bounds=bounds,
        num_matvecs=it.num_matvecs,
        converged=done,
        method="lanczos",
    )


def _power_eigs(op, k, which, tol, budget, generator, progress) -> EigenResult:
    """Power iteration on the complement of the eigenvectors found so far (deflation).

    Power iteration converges to the eigenvalue of largest magnitude. For ``which="largest"`` a
    negative dominant eigenvalue is shifted away: once one is met, the iteration runs on
    ``A + s I`` with ``s = |lambda|`` (same eigenvectors, all shifted eigenvalues of the wanted end
    larger in magnitude). ``"smallest"`` runs on ``-A``.
    """
    gen = generator_for(op, generator)
    sign = -1.0 if which == "smallest" else 1.0
    found: List[torch.Tensor] = []
    values, residuals = [], []
    shift, matvecs, all_converged = 0.0, 0, True
    with progress_bar(budget, progress, f"power top-{k}") as bar:
        while len(found) < k:
            V = torch.stack(found, dim=1) if found else None

            def deflate(x):
                return x if V is None else x - V @ (V.T @ x)

            v = deflate(probe(op.num_params, gen, dtype=op.dtype))
            v = v / torch.linalg.vector_norm(v)
            theta, r, converged = math.nan, math.inf, False
            while matvecs < budget:
                Av = sign * deflate(op @ v)
                matvecs += 1
                bar.update()
                theta = float(torch.dot(Av.double(), v.double()))
                r = float(torch.linalg.vector_norm((Av - theta * v).double()))
                if r <= tol * max(abs(theta), 1e-300):
                    converged = True
                    break
                w = Av + shift * v
                v = w / torch.linalg.vector_norm(w)
            if which == "largest" and theta < 0 and shift == 0.0 and converged:
                shift = abs(theta)  # a negative eigenvalue dominates: look at A + |theta| I instead
                continue
            all_converged &= converged
            found.append(v)
            values.append(sign * theta)
            residuals.append(r)
            if matvecs >= budget:
                break
    while len(values) < k:  # budget exhausted: report what there is, marked unconverged
        values.append(math.nan)
        residuals.append(math.inf)
        found.append(torch.full((op.num_params,), math.nan, dtype=op.dtype, device=op.device))
        all_converged = False
    vals = torch.tensor(values, dtype=torch.float64)
    res = torch.tensor(residuals, dtype=torch.float64)
    order = _order(torch.nan_to_num(vals, nan=-math.inf if which != "smallest" else math.inf), which)
    return EigenResult(
        eigenvalues=vals[order],
        eigenvectors=torch.stack(found, dim=1)[:, order],
        residuals=res[order],
        error_bounds=res[order].clone(),
        num_matvecs=matvecs,
        converged=all_converged,
        method="power",
    )
