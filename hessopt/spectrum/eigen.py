r"""Top eigenpairs of a symmetric operator: Lanczos (default) or power iteration with deflation.

**Convergence is judged on residuals, never on a relative change.** For a unit vector :math:`v`
and :math:`\theta = v^\top A v`, the residual :math:`r = \|Av - \theta v\|` bounds the eigenvalue
error two ways: some eigenvalue lies within :math:`r` of :math:`\theta`, and if the nearest other
eigenvalue is at distance :math:`\delta` (the gap), :math:`|\lambda - \theta| \le r^2 / \delta`
(Kato-Temple; Parlett, *The Symmetric Eigenvalue Problem*, ch. 11). Lanczos reports the error
bound :math:`\min(r, \rho^2/\delta)` with :math:`\delta` estimated from the other Ritz values (for
a cluster of Ritz values, e.g. copies of a multiple eigenvalue, :math:`\rho` is the cluster's
root-sum-square residual and :math:`\delta` the gap to the nearest value outside it), and stops
when every wanted pair has a bound below ``tol`` times its eigenvalue; power iteration, which has
no gap estimate, uses :math:`r` itself. A stopping rule on the change between iterations (as in
PyHessian) can stop early on a slowly converging iteration; a residual cannot be small unless
:math:`v` is close to an eigenvector.

**Multiple eigenvalues.** A single Krylov chain holds one direction of each eigenspace, so plain
Lanczos returns one copy of a repeated eigenvalue and, worse, reports the next eigenvalue down as
converged in its place. Here, after convergence a check chain from a fresh random vector looks for
further copies (see :func:`_lanczos_eigs`); power iteration finds them by deflation.
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
    """``min(r, rho^2 / gap)`` for the chosen Ritz values (``residuals``: one per Ritz value).

    Ritz values whose residual intervals overlap form a cluster (e.g. the copies of a multiple
    eigenvalue); ``rho`` is the root-sum-square residual of the cluster and ``gap`` the distance to
    the nearest Ritz value outside it: the quadratic (Kato-Temple) bound for a cluster, which stays
    sharp when the copies themselves are equal.
    """
    bounds = residuals[chosen].clone()
    for i, idx in enumerate(chosen.tolist()):
        inside = (theta - theta[idx]).abs() <= residuals + residuals[idx]
        others = (theta - theta[idx]).abs()[~inside]
        if others.numel():
            rho2 = float((residuals[inside] ** 2).sum())
            bounds[i] = min(float(residuals[idx]), rho2 / float(others.min()))
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
    check_multiplicity: bool = True,
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
        check_multiplicity: Lanczos only: after convergence, run a check chain that finds further
            copies of repeated eigenvalues (about 1.5x the matvecs on a separated spectrum; see
            :func:`_lanczos_eigs`). ``False`` stops at the first convergence: one copy of a
            multiple eigenvalue, fewer matvecs (fine for the well-separated top eigenvalues of a
            network Hessian, e.g. when tracking them during training).

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
        result = _lanczos_eigs(op, k, which, tol, budget, generator, progress, check_multiplicity)
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


def _ritz(it: LanczosIteration, k: int, which: str):
    """Ritz values, coefficients, all residuals, the ``k`` wanted indices and their error bounds."""
    theta, S = torch.linalg.eigh(it.projected())
    residuals = it.residuals(S, theta)
    chosen = _order(theta, which)[:k]
    return theta, S, residuals, chosen, _error_bounds(theta, residuals, chosen)


def _nothing_beyond(theta, residuals, chosen, which: str, worst: float, worst_bound: float) -> bool:
    """Whether the best Ritz value outside the wanted set lies, within its residual, past them."""
    order = _order(theta, which)
    if order.numel() <= chosen.numel():
        return True
    nxt = int(order[chosen.numel()])
    return _below(float(theta[nxt]), float(residuals[nxt]), worst, worst_bound, which)


def _improved(worst: float, before: float, margin: float, which: str) -> bool:
    """Whether the k-th wanted value moved past ``before`` by more than ``margin`` (a new member)."""
    if which == "largest":
        return worst > before + margin
    if which == "smallest":
        return worst < before - margin
    return abs(worst) > abs(before) + margin


def _below(value: float, radius: float, worst: float, worst_bound: float, which: str) -> bool:
    """Whether ``[value - radius, value + radius]`` lies strictly past the k-th wanted value."""
    if which == "largest":
        return value + radius < worst - worst_bound
    if which == "smallest":
        return value - radius > worst + worst_bound
    return abs(value) + radius < abs(worst) - worst_bound


def _lanczos_eigs(op, k, which, tol, budget, generator, progress, check_multiplicity=True) -> EigenResult:
    """Lanczos, then a check for eigenvalues a single Krylov chain cannot see.

    One chain contains, of each eigenspace, only the direction of its start vector's component, so
    it finds one copy of a multiple eigenvalue. Once the wanted Ritz pairs converge (after ``m1``
    steps), a check chain starts from a random vector orthogonal to the basis (see
    :class:`LanczosIteration`; Ritz pairs are taken over all chains together):

    * if a further copy (or an eigenvalue the first chain missed) enters the wanted set, it is
      converged, and another check chain starts, to look for one more;
    * the check passes when, after at least ``max(3, m1 / 2)`` steps of the check chain, the best
      Ritz value outside the wanted set lies, within its residual, past the k-th wanted value.
      The wait matters: a hidden copy of a wanted eigenvalue gets, in the check chain, the same
      amplification it had in the first one, so after half the steps its Ritz value is already
      too close to pass.

    This costs about half the first chain again on a separated spectrum, and makes ``k`` copies
    of a repeated eigenvalue come out as ``k`` copies. When the budget runs out first the check is
    incomplete; ``converged`` still reports the error bounds.
    """
    it = LanczosIteration(op, budget, generator=generator, restart=True)
    checking, chain_start, min_check, worst_at_check = False, 0, 0, 0.0
    with progress_bar(it.max_steps, progress, f"Lanczos top-{k}") as bar:
        while it.step():
            bar.update()
            if it.size < k:
                continue
            theta, S, residuals, chosen, bounds = _ritz(it, k, which)
            scale = float(theta.abs().max())
            if not _converged(theta[chosen], bounds, tol, scale) or it.size >= it.max_steps:
                continue
            if not check_multiplicity:
                break
            worst, worst_bound = float(theta[chosen[-1]]), float(bounds[-1])
            if not checking:
                min_check = max(3, math.ceil(it.size / 2))
            elif not _improved(worst, worst_at_check, max(10 * worst_bound, tol * abs(worst_at_check)), which):
                if it.size - chain_start < min_check:
                    continue
                if _nothing_beyond(theta, residuals, chosen, which, worst, worst_bound):
                    break  # verified
                continue
            # first convergence, or the check chain brought in a new member: look (again)
            if not it.restart():
                break  # nothing left outside the basis
            checking, chain_start, worst_at_check = True, it.size, worst
    theta, S, residuals, chosen, bounds = _ritz(it, k, which)
    done = _converged(theta[chosen], bounds, tol, float(theta.abs().max()))
    vectors = it.basis[: it.size].T @ S[:, chosen].to(op.dtype)
    return EigenResult(
        eigenvalues=theta[chosen].clone(),
        eigenvectors=vectors,
        residuals=residuals[chosen].clone(),
        error_bounds=bounds,
        num_matvecs=it.num_matvecs,
        converged=done,
        method="lanczos",
    )


def _power_eigs(op, k, which, tol, budget, generator, progress) -> EigenResult:
    """Power iteration on the complement of the eigenvectors found so far (deflation).

    Power iteration converges to the eigenvalue of largest magnitude. ``"smallest"`` runs on
    ``-A``. For ``"largest"`` (and so ``"smallest"``) a dominant eigenvalue of the wrong sign is
    shifted away: once one is met, the iteration runs on ``A + s I`` with ``s = |lambda|`` (same
    eigenvectors, the wanted end now dominant). The stopping test uses the residual of the deflated
    operator; the reported ``residuals`` are the true ``||A v - lambda v||``.
    """
    gen = generator_for(op, generator)
    sign = -1.0 if which == "smallest" else 1.0
    found: List[torch.Tensor] = []
    values, residuals = [], []
    shift, matvecs, all_converged = 0.0, 0, True
    with progress_bar(budget, progress, f"power top-{k}") as bar:
        while len(found) < k and matvecs < budget:
            V = torch.stack(found, dim=1) if found else None
            watch = which != "magnitude" and shift == 0.0
            v, theta, r_true, converged, used, stalled = _power_one(op, V, sign, shift, tol, budget - matvecs, gen, watch)
            matvecs += used
            bar.update(used)
            if watch and (stalled is not None or (converged and theta < 0)):
                # a wrong-sign eigenvalue dominates, or ties in magnitude: look at A + s I instead
                shift = stalled if stalled is not None else abs(theta)
                continue
            all_converged &= converged
            found.append(v)
            values.append(sign * theta)
            residuals.append(r_true)
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


def _power_one(op, V, sign, shift, tol, budget, gen, watch: bool = False):
    """One deflated power iteration on ``sign * A + shift * I``, orthogonal to the columns of ``V``.

    Returns ``(v, theta, true_residual, converged, matvecs, stalled)``; ``theta = sign * v^T A v``
    and the residual refer to the same ``v``. With ``watch``, an iteration whose growth rate
    ``rho = ||A v||`` has settled while its residual stopped shrinking is abandoned and ``stalled``
    is ``rho``: eigenvalues of opposite signs tie in magnitude (``+-lambda``), so the iterate
    oscillates between them and would never converge; the caller then shifts by ``rho``.
    """

    def deflate(x):
        return x if V is None else x - V @ (V.T @ x)

    # Gaussian: after deflation a sign vector can be exactly orthogonal to the rest of a multiple
    # eigenspace (structured matrices), which would skip the remaining copies.
    v = deflate(probe(op.num_params, gen, dtype=op.dtype, distribution="gaussian"))
    v = v / torch.linalg.vector_norm(v)
    theta, r_true, used, rhos, residuals = math.nan, math.inf, 0, [], []
    while used < budget:
        Av_full = sign * (op @ v)
        used += 1
        Av = deflate(Av_full)
        theta = float(torch.dot(Av.double(), v.double()))
        r_true = float(torch.linalg.vector_norm((Av_full - theta * v).double()))
        r = float(torch.linalg.vector_norm((Av - theta * v).double()))
        if r <= tol * max(abs(theta), 1e-300):
            return v, theta, r_true, True, used, None
        rhos.append(float(torch.linalg.vector_norm(Av.double())))
        residuals.append(r)
        if watch and _stalled(rhos, residuals):
            return v, theta, r_true, False, used, rhos[-1]
        if used == budget:
            break
        w = Av + shift * v
        v = w / torch.linalg.vector_norm(w)
    return v, theta, r_true, False, used, None


def _stalled(rhos: List[float], residuals: List[float], window: int = 20) -> bool:
    """Growth rate settled (to 1e-3) but the residual not halved over the last ``window`` steps."""
    if len(rhos) <= window:
        return False
    settled = abs(rhos[-1] - rhos[-2]) <= 1e-3 * rhos[-1]
    return settled and residuals[-1] > 0.5 * residuals[-1 - window]
