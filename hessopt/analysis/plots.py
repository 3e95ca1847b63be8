"""Plots of Hessian diagnostics (matplotlib, imported lazily: ``pip install hessopt[plot]``).

The one plotting module of the library: densities, eigenvalues, layer-wise spectra, landscapes,
and the records of :class:`hessopt.CurvatureMonitor` (:func:`plot_curvature`,
:func:`plot_densities`). Every function draws on a given matplotlib ``ax`` or on a new figure,
optionally saves it to ``path`` (format from the extension, e.g. ``.png``), and returns the
figure. Figures are built with :class:`matplotlib.figure.Figure` directly, not pyplot, so they work
without a display and leave pyplot's global state alone.

A density is smoothed in one place, :func:`smoothed_density` (the Gaussian kernel of
:func:`hessopt.spectral_density`), whether it comes as a :class:`hessopt.SpectralDensity` or as
the dict of a record or report (nodes, weights, sigma).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "smoothed_density",
    "plot_density",
    "plot_densities",
    "plot_eigenvalues",
    "plot_eigenvalue_evolution",
    "plot_curvature",
    "plot_landscape",
    "plot_layerwise",
]


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised by a test that hides matplotlib
        raise ImportError(
            "hessopt's plots need matplotlib: install it with `pip install hessopt[plot]`"
        ) from exc
    return matplotlib, Figure


def _axes(ax, figsize):
    _, Figure = _matplotlib()
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _finish(fig, path, dpi=100):
    if path is not None:
        fig.savefig(str(path), dpi=dpi)
    return fig


def smoothed_density(density: Union[Any, Mapping[str, Any]], grid_size: int = 1000) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(grid, density)`` of a :class:`hessopt.SpectralDensity` or of its dict (nodes, weights, sigma).

    A result that carries its smoothed curve gives it as is; otherwise the nodes and weights are
    smoothed with the result's ``sigma`` on ``grid_size`` points by the kernel of
    :func:`hessopt.spectral_density` (the same numbers it would have computed).
    """
    from ..spectrum.density import _smooth  # the one smoothing kernel

    get = density.get if isinstance(density, Mapping) else lambda key, default=None: getattr(density, key, default)
    grid, curve = get("grid"), get("density")
    if grid is not None and curve is not None:
        return torch.as_tensor(grid, dtype=torch.float64), torch.as_tensor(curve, dtype=torch.float64)
    nodes = [torch.as_tensor(t, dtype=torch.float64) for t in get("nodes")]
    weights = [torch.as_tensor(w, dtype=torch.float64) for w in get("weights")]
    grid, curve, _ = _smooth(nodes, weights, float(get("sigma")), 0.01, grid_size)
    return grid, curve


def plot_density(density: Any, path: Optional[str] = None, ax: Any = None, title: Optional[str] = None,
                 floor: float = 1e-8, label: Optional[str] = None, figsize=(5, 3.5)):
    """The smoothed eigenvalue density (a :class:`hessopt.SpectralDensity` or its dict) on a log scale.

    The density of network Hessians spans many orders of magnitude (a bulk near 0 and a few
    outliers), so the y-axis is logarithmic with values below ``floor`` clipped to it.
    """
    fig, ax = _axes(ax, figsize)
    grid, dens = smoothed_density(density)
    dens = dens.clamp_min(floor)
    ax.semilogy(grid.numpy(), dens.numpy(), label=label)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_ylim(bottom=floor)
    if title:
        ax.set_title(title)
    if label:
        ax.legend()
    return _finish(fig, path)


def plot_eigenvalue_evolution(steps: Sequence[float], eigenvalues: Any, path: Optional[str] = None,
                              ax: Any = None, labels: Optional[Sequence[str]] = None,
                              xlabel: str = "step", ylabel: str = "eigenvalue", title: Optional[str] = None,
                              log: bool = False, figsize=(5, 3.5)):
    """Eigenvalues over training: ``eigenvalues`` is ``(T, k)`` (or ``(T,)``), one line per column."""
    fig, ax = _axes(ax, figsize)
    E = torch.as_tensor(eigenvalues, dtype=torch.float64)
    if E.dim() == 1:
        E = E[:, None]
    if E.shape[0] != len(steps):
        raise ValueError(f"eigenvalues has {E.shape[0]} rows but there are {len(steps)} steps")
    for j in range(E.shape[1]):
        lab = labels[j] if labels is not None else (f"λ{j + 1}" if E.shape[1] <= 10 else None)
        ax.plot(list(steps), E[:, j].numpy(), marker="o", markersize=3, label=lab)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if E.shape[1] <= 10:
        ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_landscape(landscape: Any, path: Optional[str] = None, ax: Any = None, title: Optional[str] = None,
                   levels: int = 30, label: Optional[str] = None, figsize=(5, 3.5)):
    """A 1-D landscape as a curve, a 2-D one as filled contours (log-spaced levels of the loss)."""
    fig, ax = _axes(ax, figsize)
    alphas = landscape.alphas.numpy()
    if landscape.betas is None:
        ax.plot(alphas, landscape.losses.numpy(), label=label)
        ax.set_xlabel("α (distance along the direction)")
        ax.set_ylabel("loss")
        if label:
            ax.legend()
    else:
        import numpy as np

        L = landscape.losses.numpy()
        lo, hi = float(L.min()), float(L.max())
        lv = np.geomspace(max(lo, 1e-12), max(hi, lo * 1.0001 + 1e-12), levels) if lo > 0 else levels
        cs = ax.contourf(alphas, landscape.betas.numpy(), L.T, levels=lv, cmap="viridis")
        ax.contour(alphas, landscape.betas.numpy(), L.T, levels=lv, colors="k", linewidths=0.3)
        fig.colorbar(cs, ax=ax, label="loss")
        ax.set_xlabel("α (direction 1)")
        ax.set_ylabel("β (direction 2)")
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def plot_layerwise(table: Any, path: Optional[str] = None, title: Optional[str] = None, figsize=None):
    """Top eigenvalue and trace of each block of a :class:`~hessopt.analysis.LayerwiseSpectrum`."""
    _, Figure = _matplotlib()
    n = len(table.layers)
    fig = Figure(figsize=figsize or (max(5, 0.35 * n + 2), 4.5), dpi=100, layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    xs = list(range(n))
    top = [float(l.top_eigenvalues[0]) for l in table.layers]
    tr = [l.trace for l in table.layers]
    err = [l.trace_std_error for l in table.layers]
    ax1.bar(xs, top)
    ax1.set_ylabel("top eigenvalue")
    ax2.bar(xs, tr, yerr=err)
    ax2.set_ylabel("trace")
    ax2.set_xticks(xs)
    ax2.set_xticklabels([l.name for l in table.layers], rotation=90, fontsize=7)
    if title:
        ax1.set_title(title)
    return _finish(fig, path)


def plot_eigenvalues(eigenvalues: Any, path: Optional[str] = None, ax: Any = None,
                     error_bounds: Any = None, title: Optional[str] = None, figsize=(5, 3.5)):
    """The top eigenvalues (or the ``top_eigenvalues`` of a :class:`hessopt.CurvatureSummary`) by rank.

    Error bars are the a-posteriori error bounds when known; the y-axis is logarithmic when every
    eigenvalue is positive (outliers and bulk differ by orders of magnitude).
    """
    if hasattr(eigenvalues, "top_eigenvalues"):
        if error_bounds is None:
            error_bounds = eigenvalues.eigenvalue_error_bounds
        eigenvalues = eigenvalues.top_eigenvalues
    fig, ax = _axes(ax, figsize)
    values = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1)
    ranks = list(range(1, values.numel() + 1))
    yerr = None if error_bounds is None else torch.as_tensor(error_bounds, dtype=torch.float64).reshape(-1).numpy()
    ax.errorbar(ranks, values.numpy(), yerr=yerr, marker="o", linestyle="none", capsize=3)
    if values.numel() and bool((values > 0).all()):
        ax.set_yscale("log")
    ax.set_xticks(ranks)
    ax.set_xlabel("rank i")
    ax.set_ylabel("eigenvalue λᵢ")
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def plot_curvature(records: Sequence[Mapping[str, Any]], path: Optional[str] = None, title: Optional[str] = None,
                   figsize=(10, 3.6)):
    """Top eigenvalues and trace (with standard-error bars) of monitor records against the step."""
    _, Figure = _matplotlib()
    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    ax_eig, ax_tr = fig.subplots(1, 2)
    steps = [r["step"] for r in records]
    k = max((len(r["top_eigenvalues"]) for r in records), default=0)
    nan = float("nan")
    E = torch.tensor([[r["top_eigenvalues"][i] if i < len(r["top_eigenvalues"]) else nan for i in range(k)]
                      for r in records], dtype=torch.float64).reshape(len(records), k)
    plot_eigenvalue_evolution(steps, E, ax=ax_eig, labels=[f"$\\lambda_{{{i + 1}}}$" for i in range(k)],
                              title="top eigenvalues")
    ax_tr.errorbar(steps, [r["trace"] for r in records], yerr=[r["trace_std_error"] for r in records],
                   marker="o", ms=3, capsize=2)
    ax_tr.set(xlabel="step", ylabel="trace", title="trace (± standard error)")
    if title:
        fig.suptitle(title)
    return _finish(fig, path, dpi=120)


def plot_densities(records: Sequence[Mapping[str, Any]], path: Optional[str] = None, max_curves: int = 6,
                   floor: float = 1e-8, figsize=(6, 3.6)):
    """Smoothed densities of up to ``max_curves`` evenly spaced records that have one (``None`` if none has)."""
    with_density = [r for r in records if r.get("density")]
    if not with_density:
        return None
    pick = sorted({round(i * (len(with_density) - 1) / max(max_curves - 1, 1)) for i in range(max_curves)})
    fig, ax = _axes(None, figsize)
    for i in pick:
        r = with_density[i]
        plot_density(r["density"], ax=ax, floor=floor, label=f"step {r['step']}")
    ax.set_title("spectral density (SLQ)")
    return _finish(fig, path, dpi=120)
