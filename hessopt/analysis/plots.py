"""Plots of Hessian diagnostics (matplotlib, imported lazily: ``pip install hessopt[plot]``).

Every function draws on a given matplotlib ``ax`` or on a new figure, optionally saves it to
``path`` (format from the extension, e.g. ``.png``), and returns the figure. Figures are built
with :class:`matplotlib.figure.Figure` directly, not pyplot, so they work without a display and
leave pyplot's global state alone.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

__all__ = ["plot_density", "plot_eigenvalue_evolution", "plot_landscape", "plot_layerwise"]


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


def plot_density(density: Any, path: Optional[str] = None, ax: Any = None, title: Optional[str] = None,
                 floor: float = 1e-8, label: Optional[str] = None, figsize=(5, 3.5)):
    """The smoothed eigenvalue density of a :class:`hessopt.SpectralDensity` on a log scale.

    The density of network Hessians spans many orders of magnitude (a bulk near 0 and a few
    outliers), so the y-axis is logarithmic with values below ``floor`` clipped to it.
    """
    fig, ax = _axes(ax, figsize)
    grid = torch.as_tensor(density.grid).double()
    dens = torch.as_tensor(density.density).double().clamp_min(floor)
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
    top = [float(l.eigenvalues[0]) for l in table.layers]
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
