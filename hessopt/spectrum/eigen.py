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

**Precision of the products.** Both methods accumulate in float32 at least (a float16/bfloat16
operator's products are cast up; see :func:`hessopt.spectrum.lanczos.accumulation_dtype`). A 16-bit
product is itself only accurate to about :math:`\epsilon\,\|A\|` (:math:`\epsilon` the dtype's
machine epsilon: 9.8e-4 for float16, 7.8e-3 for bfloat16), and no amount of iteration on it gets
closer to the eigenvalues of :math:`A`. For such an operator each error bound includes
:math:`\epsilon\,\|A\|` (:math:`\|A\|` estimated by the largest Ritz value in magnitude: a Weyl
bound on what one rounding of every product can move an eigenvalue), the iteration stops once the
computed bounds reach that floor, and ``converged`` is False, with a warning that names the dtype,
whenever ``tol`` asks for more than the products allow. (For float32 and float64 operators the
accumulation is in the operator's own precision and nothing is added, as before.)

**Eigenvectors** (``vector_tol``, Lanczos only). A small eigenvalue error does not mean an accurate
eigenvector: the eigenvalue error goes as :math:`r^2/\delta`, the angle as :math:`r/\delta`
(Davis-Kahan :math:`\sin\Theta` theorem). For the subspace of the ``k`` wanted Ritz vectors,
:math:`\sin\Theta \le \|R_k\|_F / \delta` with :math:`R_k` their residuals and :math:`\delta` the
gap between the wanted values and the rest of the spectrum, estimated from the best Ritz value
outside the wanted set (moved towards the wanted ones by its residual). ``vector_tol`` makes the
stopping test require that bound too (what :func:`hessopt.analysis.gradient_concentration` needs).
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional

import torch

from .._checks import check_positive_int
from .._progress import progress_bar
from ..operators import as_operator
from ..probes import GeneratorLike, generator_for
from ..results import EigenResult
from .lanczos import LanczosIteration, accumulation_dtype

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


def _product_noise(op, scale: float) -> float:
    """What one rounding of a product in the operator's dtype can move an eigenvalue by,
    ``eps(dtype) * ||A||``, when that dtype is narrower than the accumulation (16-bit); else 0."""
    if accumulation_dtype(op.dtype) == op.dtype:
        return 0.0
    return float(torch.finfo(op.dtype).eps) * scale


def _targets(values: torch.Tensor, tol: float, scale: float, noise: float) -> torch.Tensor:
    """Per-value stopping targets for the computed (Ritz or residual) part of the bound.

    ``tol * |value|`` (floored as in :func:`_converged`) less the products' noise, which the final
    bound adds; never below the noise itself (iterating further cannot get under it)."""
    floor = 100 * torch.finfo(torch.float32).eps * scale
    want = tol * torch.clamp(values.abs(), min=floor)
    return torch.clamp(want - noise, min=noise)


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
    vector_tol: Optional[float] = None,
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
            at most ``tol * |eigenvalue|``. The float32 Hessian of a network supports about 1e-5;
            a float16 (bfloat16) operator about 1e-3 (1e-2) at best: ask for less and
            ``converged`` is False, with a warning.
        max_matvecs: budget (default: Lanczos ``min(n, max(100, 20 k))``, power ``200 k``). If it
            runs out first, ``converged`` is False and a warning is issued.
        generator: generator, seed or ``None`` for the random start vector(s).
        progress: show a progress bar.
        check_multiplicity: Lanczos only: after convergence, run a check chain that finds further
            copies of repeated eigenvalues (about 1.5x the matvecs on a separated spectrum; see
            :func:`_lanczos_eigs`). ``False`` stops at the first convergence: one copy of a
            multiple eigenvalue, fewer matvecs (fine for the well-separated top eigenvalues of a
            network Hessian, e.g. when tracking them during training).
        vector_tol: Lanczos only: also require the Davis-Kahan bound ``||R_k||_F / gap`` on the
            sine of the angle between the wanted Ritz subspace and the true eigenspace to be at most
            ``vector_tol`` (see module docstring). Default ``None``: eigenvalues only.

    Returns:
        :class:`hessopt.EigenResult`: ``eigenvalues`` (float64, ordered by ``which``: descending
        for ``"largest"``), ``eigenvectors`` (``(n, k)``, in the accumulation dtype: float32 for a
        float16/bfloat16 operator, else the operator's dtype; on a sharded operator this
        process's ``(local_size, k)`` rows), ``residuals``, ``error_bounds``,
        ``num_matvecs``, ``converged``.

    Example:
        >>> r = hessopt.top_eigenvalues(op, k=5, tol=1e-4)
        >>> r.eigenvalues, r.residuals, r.converged
    """
    return _top_eigenvalues(op, k, method, which, tol, max_matvecs, generator, progress, check_multiplicity,
                            vector_tol, stacklevel=3)[0]


def _top_eigenvalues(op, k=1, method="lanczos", which="largest", tol=1e-5, max_matvecs=None, generator=None,
                     progress=False, check_multiplicity=True, vector_tol=None, stacklevel=2):
    """:func:`top_eigenvalues` and its extras: ``(EigenResult, {"noise": .., "vector_bound": ..})``
    (``vector_bound``: the Davis-Kahan bound when ``vector_tol`` was given; see module docstring)."""
    op = as_operator(op)
    n = op.num_params
    check_positive_int("k", k)
    if k > n:
        raise ValueError(f"k={k} is larger than the dimension of the operator ({n}); ask for at most {n}")
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if vector_tol is not None and not (isinstance(vector_tol, (int, float)) and vector_tol > 0):
        raise ValueError(f"vector_tol must be a positive number or None, got {vector_tol!r}")
    if method == "lanczos":
        budget = min(n, max(100, 20 * k)) if max_matvecs is None else max_matvecs
        if budget < k:
            raise ValueError(f"max_matvecs={budget} is too small: Lanczos needs at least k={k} matvecs")
        result, extra = _lanczos_eigs(op, k, which, tol, budget, generator, progress, check_multiplicity, vector_tol)
    elif method == "power":
        if vector_tol is not None:
            raise ValueError("vector_tol needs a gap estimate, which power iteration has not: use method='lanczos'")
        budget = 200 * k if max_matvecs is None else max_matvecs
        result, extra = _power_eigs(op, k, which, tol, budget, generator, progress)
    else:
        raise ValueError(f"unknown method {method!r}; choose 'lanczos' or 'power'")
    if not result.converged:
        noise = extra.get("noise", 0.0)
        why = ""
        if noise > 0:
            name = str(op.dtype).replace("torch.", "")
            why = (f"; the operator computes in {name}, whose products are accurate to about "
                   f"eps*||A|| = {noise:.3g} (included in the bounds): ask for tol >= "
                   f"{2 * noise / max(float(result.eigenvalues.abs().nan_to_num(0).min()), 1e-300):.2g} "
                   f"or use a float32 operator")
        elif extra.get("vector_bound") is not None and vector_tol is not None:
            why = f"; eigenvector angle bound {extra['vector_bound']:.3g} (vector_tol={vector_tol})"
        warnings.warn(
            f"top_eigenvalues({method}) did not reach tol={tol} within {result.num_matvecs} matvecs "
            f"(largest error bound {float(result.error_bounds.max()):.3g}){why}; raise max_matvecs or tol",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return result, extra


def _ritz(it: LanczosIteration, k: int, which: str):
    """Ritz values, coefficients, all residuals, the ``k`` wanted indices and their error bounds."""
    theta, S = torch.linalg.eigh(it.projected())
    residuals = it.residuals(S, theta)
    chosen = _order(theta, which)[:k]
    return theta, S, residuals, chosen, _error_bounds(theta, residuals, chosen)


def _subspace_bound(theta, residuals, chosen, bounds, which: str) -> float:
    """Davis-Kahan: ``||R_k||_F / gap`` for the wanted Ritz subspace (``inf`` without a gap).

    The gap is from the wanted values (each moved towards the rest by its bound) to the best Ritz value
    outside the wanted set moved towards them by its residual. When the Krylov space is invariant
    and there is no value outside, the subspace is exact up to its residuals."""
    frob = float((residuals[chosen] ** 2).sum().sqrt())
    if frob == 0:
        return 0.0  # exact eigenvectors (an invariant space), whatever the gap
    order = _order(theta, which)
    if order.numel() <= chosen.numel():
        return math.inf
    nxt = int(order[chosen.numel()])
    wanted, b = theta[chosen], bounds
    if which == "largest":
        gap = float((wanted - b).min()) - (float(theta[nxt]) + float(residuals[nxt]))
    elif which == "smallest":
        gap = (float(theta[nxt]) - float(residuals[nxt])) - float((wanted + b).max())
    else:
        gap = float((wanted.abs() - b).min()) - (abs(float(theta[nxt])) + float(residuals[nxt]))
    return frob / gap if gap > 0 else math.inf


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


def _lanczos_eigs(op, k, which, tol, budget, generator, progress, check_multiplicity=True, vector_tol=None):
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

    Returns ``(EigenResult, extra)`` with ``extra["noise"]`` the products' precision floor added
    to the bounds (see :func:`_product_noise`) and ``extra["vector_bound"]``.
    """
    it = LanczosIteration(op, budget, generator=generator, restart=True)
    checking, chain_start, min_check, worst_at_check = False, 0, 0, 0.0

    def settled(theta, residuals, chosen, bounds) -> bool:
        scale = float(theta.abs().max())
        noise = _product_noise(op, scale)
        if not bool((bounds <= _targets(theta[chosen], tol, scale, noise)).all()):
            return False
        if vector_tol is None:
            return True
        return _subspace_bound(theta, residuals, chosen, bounds, which) <= max(vector_tol, noise / scale)

    with progress_bar(it.max_steps, progress, f"Lanczos top-{k}") as bar:
        while it.step():
            bar.update()
            if it.size < k:
                continue
            theta, S, residuals, chosen, bounds = _ritz(it, k, which)
            if not settled(theta, residuals, chosen, bounds) or it.full:
                continue
            if not check_multiplicity:
                break
            worst, worst_bound = float(theta[chosen[-1]]), float(bounds[-1])
            worst_bound += _product_noise(op, float(theta.abs().max()))
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
    scale = float(theta.abs().max())
    noise = _product_noise(op, scale)
    bounds = bounds + noise
    done = _converged(theta[chosen], bounds, tol, scale)
    vector_bound = None
    if vector_tol is not None:
        vector_bound = _subspace_bound(theta, residuals, chosen, bounds, which)
        done = done and vector_bound <= vector_tol
    result = EigenResult(
        eigenvalues=theta[chosen].clone(),
        eigenvectors=it.ritz_vectors(S[:, chosen]),
        residuals=residuals[chosen].clone(),
        error_bounds=bounds,
        num_matvecs=it.num_matvecs,
        converged=done,
        method="lanczos",
    )
    return result, {"noise": noise, "vector_bound": vector_bound}


def _power_eigs(op, k, which, tol, budget, generator, progress):
    """Power iteration on the complement of the eigenvectors found so far (deflation).

    Power iteration converges to the eigenvalue of largest magnitude. ``"smallest"`` runs on
    ``-A``. For ``"largest"`` (and so ``"smallest"``) a dominant eigenvalue of the wrong sign is
    shifted away: once one is met, the iteration runs on ``A + s I`` with ``s = |lambda|`` (same
    eigenvectors, the wanted end now dominant). The stopping test uses the residual of the deflated
    operator; the reported ``residuals`` are the true ``||A v - lambda v||``. Vectors are kept in
    the accumulation dtype (float32 for a 16-bit operator); the error bound is the residual plus
    the products' precision floor (:func:`_product_noise`, with ``||A||`` estimated by the largest
    ``|lambda|`` met).
    """
    gen = generator_for(op, generator)
    acc = accumulation_dtype(op.dtype)
    sign = -1.0 if which == "smallest" else 1.0
    found: List[torch.Tensor] = []
    values, residuals, bounds = [], [], []
    shift, matvecs, all_converged = 0.0, 0, True
    state = {"scale": 0.0}
    with progress_bar(budget, progress, f"power top-{k}") as bar:
        while len(found) < k and matvecs < budget:
            V = torch.stack(found, dim=1) if found else None
            watch = which != "magnitude" and shift == 0.0
            v, theta, r_true, converged, used, stalled = _power_one(
                op, V, sign, shift, tol, budget - matvecs, gen, watch, acc, state)
            matvecs += used
            bar.update(used)
            if watch and (stalled is not None or (converged and theta < 0)):
                # a wrong-sign eigenvalue dominates, or ties in magnitude: look at A + s I instead
                shift = stalled if stalled is not None else abs(theta)
                continue
            found.append(v)
            values.append(sign * theta)
            residuals.append(r_true)
            bounds.append(r_true + _product_noise(op, state["scale"]))
            all_converged &= converged
    while len(values) < k:  # budget exhausted: report what there is, marked unconverged
        values.append(math.nan)
        residuals.append(math.inf)
        bounds.append(math.inf)
        found.append(torch.full((op.local_size,), math.nan, dtype=acc, device=op.device))
        all_converged = False
    vals = torch.tensor(values, dtype=torch.float64)
    res = torch.tensor(residuals, dtype=torch.float64)
    bnd = torch.tensor(bounds, dtype=torch.float64)
    order = _order(torch.nan_to_num(vals, nan=-math.inf if which != "smallest" else math.inf), which)
    result = EigenResult(
        eigenvalues=vals[order],
        eigenvectors=torch.stack(found, dim=1)[:, order],
        residuals=res[order],
        error_bounds=bnd[order],
        num_matvecs=matvecs,
        converged=all_converged,
        method="power",
    )
    return result, {"noise": _product_noise(op, state["scale"])}


def _power_one(op, V, sign, shift, tol, budget, gen, watch: bool = False, acc=None, state=None):
    """One deflated power iteration on ``sign * A + shift * I``, orthogonal to the columns of ``V``.

    Returns ``(v, theta, true_residual, converged, matvecs, stalled)``; ``theta = sign * v^T A v``
    and the residual refer to the same ``v``. With ``watch``, an iteration whose growth rate
    ``rho = ||A v||`` has settled while its residual stopped shrinking is abandoned and ``stalled``
    is ``rho``: eigenvalues of opposite signs tie in magnitude (``+-lambda``), so the iterate
    oscillates between them and would never converge; the caller then shifts by ``rho``. A
    residual at the products' precision floor is neither: the iteration stops there
    (``converged`` then says whether that met ``tol``).
    """
    acc = accumulation_dtype(op.dtype) if acc is None else acc
    state = {"scale": 0.0} if state is None else state

    def deflate(x):
        return x if V is None else x - V @ op.reduce_sum(V.T @ x)

    def apply(x):
        return (op @ x.to(op.dtype)).to(acc)

    # Gaussian: after deflation a sign vector can be exactly orthogonal to the rest of a multiple
    # eigenspace (structured matrices), which would skip the remaining copies.
    v = deflate(op.probe(gen, dtype=acc, distribution="gaussian"))
    v = v / op.norm(v)
    theta, r_true, used, rhos, residuals = math.nan, math.inf, 0, [], []
    while used < budget:
        Av_full = apply(v)
        if sign < 0:
            Av_full = -Av_full  # not in place: the product may alias its input
        used += 1
        Av = deflate(Av_full)
        theta = op.dot(Av, v)
        state["scale"] = max(state["scale"], abs(theta))
        r_true = op.norm(Av_full - theta * v)
        r = op.norm(Av - theta * v)
        noise = _product_noise(op, state["scale"])
        target = max(tol * max(abs(theta), 1e-300) - noise, 2 * noise)
        if r <= target:
            return v, theta, r_true, r + noise <= tol * max(abs(theta), 1e-300), used, None
        rhos.append(op.norm(Av))
        residuals.append(r)
        if watch and r > 8 * noise and _stalled(rhos, residuals):
            return v, theta, r_true, False, used, rhos[-1]
        if used == budget:
            break
        w = Av + shift * v
        v = w / op.norm(w)
    return v, theta, r_true, False, used, None


def _stalled(rhos: List[float], residuals: List[float], window: int = 20) -> bool:
    """Growth rate settled (to 1e-3) but the residual not halved over the last ``window`` steps."""
    if len(rhos) <= window:
        return False
    settled = abs(rhos[-1] - rhos[-2]) <= 1e-3 * rhos[-1]
    return settled and residuals[-1] > 0.5 * residuals[-1 - window]
