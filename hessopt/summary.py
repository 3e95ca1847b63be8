r"""One curvature summary of an operator: top eigenvalues, trace, density, gradient concentration.

:func:`curvature_summary` is what the monitor (:class:`hessopt.CurvatureMonitor`, every N steps),
the layer-wise analysis (:func:`hessopt.analysis.layerwise`, once per block), the report
(:func:`hessopt.report`) and ``hessopt analyze`` compute, written once:

* the top-``k`` eigenvalues with a-posteriori error bounds (Lanczos, :func:`hessopt.top_eigenvalues`);
* the trace with its standard error (Hutch++ by default, :func:`hessopt.trace`);
* optionally the spectral density (stochastic Lanczos quadrature, :func:`hessopt.spectral_density`);
* when the operator has a gradient (:class:`hessopt.HessianOperator`), the loss, ``||g||`` and the
  fraction of the gradient in the top-``k`` eigenspace, :math:`\|V_k^\top g\|^2 / \|g\|^2`
  (:func:`hessopt.analysis.gradient_concentration`; Gur-Ari et al. 2018, Ghorbani et al. 2019).

**Seeding rule** (the one rule of every caller). ``generator`` becomes one int seed :math:`s`: an
int is used as is; a :class:`torch.Generator` gives :math:`s` by one draw from it; ``None`` draws
:math:`s` from PyTorch's global CPU generator (the meaning of ``generator=None`` in every hessopt
estimator, so ``torch.manual_seed`` makes it reproducible). The estimators then get the seeds

.. math::  \text{eigenvalues: } s, \qquad \text{trace: } s + 1, \qquad \text{density: } s + 2
           \pmod{2^{61} - 1},

each through the estimator's own ``generator=`` (so an operator under ``torch.distributed`` makes
it rank 0's seed everywhere). The same seed gives the same numbers; which quantities are asked for
does not change the others. Callers that need many summaries derive their seeds from one base:
the monitor uses :math:`s = 1000003\,\mathrm{seed} + 7\,\mathrm{step}`, the layer-wise analysis
:math:`s = s_0 + 1000003\, i` for block :math:`i` (:func:`derive_seed`).

Cost in operator applications: at most ``max_matvecs`` (Lanczos) + ``trace_matvecs`` +
``density_runs * density_steps``, plus one gradient and one loss evaluation when available.

Example:
    >>> import torch, hessopt
    >>> from torch import nn
    >>> A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    >>> s = hessopt.curvature_summary(A, k=2, trace_matvecs=9, generator=0)
    >>> [round(v, 8) for v in s.top_eigenvalues.tolist()], round(s.trace, 8), s.trace_std_error
    ([3.0, 2.0], 6.0, 0.0)
    >>> _ = torch.manual_seed(0)
    >>> model, x, y = nn.Linear(3, 2), torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    >>> s = hessopt.curvature_summary(op, k=2, density=True, generator=0)
    >>> 0 <= s.gradient_concentration <= 1, sorted(s.to_dict()["density"])
    (True, ['nodes', 'num_matvecs', 'sigma', 'weights'])
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .estimators import trace as trace_estimate
from .operators import as_operator
from .probes import GeneratorLike
from .results import CurvatureSummary
from .spectrum import spectral_density, top_eigenvalues

__all__ = ["curvature_summary", "derive_seed", "summary_seed"]

#: seeds live modulo this prime (a Mersenne prime below 2**63, so every seed fits torch's int64)
SEED_MODULUS = 2**61 - 1
_EIGEN, _TRACE, _DENSITY = 0, 1, 2


def summary_seed(generator: GeneratorLike) -> int:
    """The one int seed of :func:`curvature_summary`'s seeding rule (see the module docstring)."""
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, SEED_MODULUS, (1,), generator=generator, device=generator.device).item())
    if generator is None:
        return int(torch.randint(0, SEED_MODULUS, (1,)).item())
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, not {type(generator).__name__}")
    return generator % SEED_MODULUS


def derive_seed(seed: int, offset: int) -> int:
    """``(seed + offset) mod (2**61 - 1)``: the seed of one stream derived from a base seed."""
    return (int(seed) + int(offset)) % SEED_MODULUS


def _count(name: str, value, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{why}, got {value!r}")


def curvature_summary(
    op,
    *,
    k: int = 5,
    tol: float = 1e-3,
    max_matvecs: Optional[int] = None,
    trace_matvecs: int = 30,
    trace_method: str = "hutch++",
    density: bool = False,
    density_steps: int = 60,
    density_runs: int = 1,
    gradient_concentration: bool = True,
    loss: bool = True,
    generator: GeneratorLike = None,
    progress: bool = False,
) -> CurvatureSummary:
    """Top eigenvalues, trace, optionally density and gradient concentration of ``op``.

    Args:
        op: any operator (:class:`hessopt.HessianOperator`, ``GGNOperator``, :class:`hessopt.MatrixOperator`, ...)
            or a dense symmetric tensor.
        k: number of top eigenvalues (capped at the dimension).
        tol: relative accuracy of the eigenvalues (Lanczos stops when every error bound is below
            ``tol * |eigenvalue|``); not reaching it is recorded in ``eigenvalues_converged``,
            without a warning.
        max_matvecs: Lanczos budget (default that of :func:`hessopt.top_eigenvalues`,
            ``min(n, max(100, 20 k))``); capped at the dimension.
        trace_matvecs: trace budget (``0`` skips the trace: ``nan``); Hutch++ needs at least 4.
            With Hutch++ and ``n <= trace_matvecs // 3`` the sketch spans the space and the trace
            is exact (``trace_std_error`` 0).
        trace_method: ``"hutch++"`` or ``"hutchinson"``.
        density: also the spectral density (SLQ), ``density_runs`` runs of ``density_steps``
            Lanczos steps.
        gradient_concentration: also ``||g||`` and ``||V_k^T g||^2/||g||^2`` when the operator has
            a ``gradient()`` method (ignored otherwise).
        loss: also the loss when the operator has a ``loss()`` method (one more pass over the data).
        generator: int seed, :class:`torch.Generator` or ``None``: see the seeding rule in the
            module docstring.
        progress: tqdm bars of the estimators.

    Returns:
        :class:`hessopt.CurvatureSummary`.
    """
    op = as_operator(op)
    _count("k", k, 1)
    _count("trace_matvecs", trace_matvecs, 0, " (0 skips the trace)")
    _count("density_steps", density_steps, 1)
    _count("density_runs", density_runs, 1)
    if max_matvecs is not None:
        _count("max_matvecs", max_matvecs, 1)
    if trace_method not in ("hutch++", "hutchinson"):
        raise ValueError(f"unknown trace method {trace_method!r}; choose 'hutch++' or 'hutchinson'")
    n = op.num_params
    # rank 0's seed on every rank of a distributed operator (identity otherwise), so that the
    # recorded seed is the one the estimators use
    seed = op.broadcast_seed(summary_seed(generator)) % SEED_MODULUS
    kk = min(k, n)
    budget = None if max_matvecs is None else max(min(max_matvecs, n), kk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-convergence is recorded in the summary instead
        eig = top_eigenvalues(op, k=kk, tol=tol, max_matvecs=budget, generator=derive_seed(seed, _EIGEN),
                              progress=progress)
    matvecs = eig.num_matvecs
    tr, tr_err = math.nan, math.nan
    if trace_matvecs:
        t = trace_estimate(op, num_matvecs=trace_matvecs, method=trace_method, generator=derive_seed(seed, _TRACE),
                           progress=progress)
        tr, tr_err, matvecs = float(t.estimate), float(t.std_error), matvecs + t.num_matvecs
        if trace_method == "hutch++" and n <= trace_matvecs // 3:
            tr_err = 0.0  # the sketch spans the whole space: the trace is exact
    if (tr == 0.0 or not trace_matvecs) and bool((eig.eigenvalues == 0).all()):
        warnings.warn(
            "curvature_summary: every operator product was exactly zero. The loss may not depend on the "
            "selected parameters, or a gradient hook detaches the gradients that torch.autograd.grad "
            "returns (the Hessian-vector product needs their graph)",
            RuntimeWarning,
            stacklevel=2,
        )
    has_gradient = callable(getattr(op, "gradient", None))
    loss_value = float(op.loss()) if loss and callable(getattr(op, "loss", None)) else None
    dens = None
    if density:
        dens = spectral_density(op, num_runs=density_runs, num_steps=density_steps,
                                generator=derive_seed(seed, _DENSITY), progress=progress)
        matvecs += dens.num_matvecs
    g_norm = concentration = None
    if gradient_concentration and has_gradient:
        g_norm, concentration = _concentration(op, op.gradient(), eig)
    return CurvatureSummary(
        num_params=n,
        top_eigenvalues=eig.eigenvalues,
        eigenvectors=eig.eigenvectors.detach(),
        eigenvalue_error_bounds=eig.error_bounds,
        eigenvalues_converged=bool(eig.converged),
        trace=tr,
        trace_std_error=tr_err,
        loss=loss_value,
        density=dens,
        gradient_norm=g_norm,
        gradient_concentration=concentration,
        num_matvecs=matvecs,
        seed=seed,
    )


def _concentration(op, grad: torch.Tensor, eig):
    """``(||g||, ||V_k^T g||^2 / ||g||^2)`` by the one formula, ``nan`` for a zero gradient (inner
    products in the operator's space: all-reduced over the shards of a sharded operator)."""
    from .analysis.concentration import gradient_concentration  # analysis imports the core, not back

    g = grad.detach().reshape(-1).double()
    norm = op.norm(g)
    if not norm > 0:
        return norm, math.nan
    return norm, float(gradient_concentration(op, grad=g, eigenvectors=eig.eigenvectors,
                                              k=eig.eigenvalues.numel()).fraction)
