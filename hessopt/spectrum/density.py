r"""Eigenvalue spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric :math:`A \in \mathbb{R}^{n\times n}` with eigenvalues
:math:`\lambda_i` is :math:`\phi(t) = \frac1n\sum_i \delta(t - \lambda_i)`. For a random unit
vector :math:`v` (Rademacher, normalized), :math:`E[v^\top f(A) v] = \frac1n \operatorname{tr} f(A)
= \int f\,\phi`, and :math:`m` Lanczos steps from :math:`v` give the Gauss quadrature rule
:math:`v^\top f(A) v \approx \sum_{j=1}^m \tau_j f(\theta_j)`, with nodes :math:`\theta_j` the
eigenvalues of :math:`T_m` and weights :math:`\tau_j = (e_1^\top s_j)^2` (Golub & Meurant;
Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019; PyHessian). The weights of a run sum to 1,
and with :math:`m = n` (or an invariant Krylov space) the rule is exact for every :math:`f`.

The smoothed density replaces each node by a Gaussian of standard deviation :math:`\sigma`:
:math:`\hat\phi(t) = \frac1R\sum_{r}\sum_j \tau^{(r)}_j\,\mathcal N(t;\theta^{(r)}_j, \sigma^2)`.
Default :math:`\sigma` is 1% of the spread of the nodes (PyHessian uses a variance of
:math:`10^{-5}` times the spread, i.e. a narrower kernel that needs a finer grid).

For a float16/bfloat16 operator the recurrence is accumulated in float32 (see
:mod:`hessopt.spectrum.lanczos`): the nodes and weights are then those of the half-precision
products, accurate to about :math:`\epsilon\,\|A\|` of that dtype, and a run no longer stops after
one product on a false breakdown.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._checks import check_positive_int
from .._progress import progress_bar
from ..operators import as_operator
from ..probes import GeneratorLike, generator_for
from ..results import SpectralDensity
from .lanczos import LanczosIteration

__all__ = ["spectral_density"]


def spectral_density(
    op,
    num_runs: int = 1,
    num_steps: int = 90,
    sigma: Optional[float] = None,
    sigma_rel: float = 0.01,
    grid_size: int = 1000,
    generator: GeneratorLike = None,
    progress: bool = False,
) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Args:
        op: an operator or a dense symmetric tensor.
        num_runs: independent random start vectors; the density is their average.
        num_steps: Lanczos steps per run (each one matvec); capped at the dimension. 80-90 steps
            resolve network Hessian spectra well (Ghorbani et al. 2019).
        sigma: Gaussian kernel standard deviation for the smoothed density (default:
            ``sigma_rel`` times the spread of all nodes).
        sigma_rel: see ``sigma``.
        grid_size: number of grid points; the grid spans the nodes plus 6 sigma on each side.
        generator: generator, seed or ``None``.
        progress: show a progress bar.

    Returns:
        :class:`hessopt.SpectralDensity` with per-run ``nodes`` and ``weights`` and the smoothed
        ``density`` on ``grid``.

    Example:
        >>> d = hessopt.spectral_density(op, num_runs=3, num_steps=90, generator=0)
        >>> plt.semilogy(d.grid, d.density)
    """
    op = as_operator(op)
    for name, value in (("num_runs", num_runs), ("num_steps", num_steps), ("grid_size", grid_size)):
        check_positive_int(name, value)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    if not sigma_rel > 0:
        raise ValueError(f"sigma_rel must be positive, got {sigma_rel!r}")
    gen = generator_for(op, generator)
    nodes, weights, matvecs = [], [], 0
    steps = min(num_steps, op.num_params)
    with progress_bar(num_runs * steps, progress, "SLQ") as bar:
        for _ in range(num_runs):
            it = LanczosIteration(op, steps, generator=gen)
            while it.step():
                bar.update()
            theta, S = torch.linalg.eigh(it.tridiagonal())
            nodes.append(theta)
            weights.append(S[0] ** 2)
            matvecs += it.num_matvecs
    grid, density, sigma = _smooth(nodes, weights, sigma, sigma_rel, grid_size)
    return SpectralDensity(tuple(nodes), tuple(weights), grid, density, sigma, matvecs)


def _smooth(nodes, weights, sigma, sigma_rel, grid_size):
    all_nodes = torch.cat(nodes)
    lo, hi = float(all_nodes.min()), float(all_nodes.max())
    if sigma is None:
        spread = hi - lo
        sigma = sigma_rel * spread if spread > 0 else sigma_rel * max(abs(hi), 1.0)
    grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, grid_size, dtype=torch.float64)
    density = torch.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for theta, tau in zip(nodes, weights):
        kernel = torch.exp(-0.5 * ((grid[:, None] - theta[None, :]) / sigma) ** 2) * norm
        density += kernel @ tau
    return grid, density / len(nodes), float(sigma)
