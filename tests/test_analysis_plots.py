"""Plots: each draws, saves a PNG, and a missing matplotlib names the [plot] extra."""
import sys

import pytest
import torch
from torch import nn

import hessopt
from hessopt.analysis import (
    Landscape,
    layerwise,
    plot_density,
    plot_eigenvalue_evolution,
    plot_landscape,
    plot_layerwise,
)

PNG = b"\x89PNG"


def _landscape(two_d):
    a = torch.linspace(-1, 1, 5, dtype=torch.float64)
    if two_d:
        return Landscape(a, a.clone(), 1 + a[:, None] ** 2 + 0.5 * a[None, :] ** 2, 1.0, "given", (1.0, 1.0))
    return Landscape(a, None, 1 + a**2, 1.0, "given", (1.0,))


def test_plots_write_pngs(tmp_path):
    A = torch.diag(torch.tensor([10.0, 1.0, 0.5, 0.1, 0.0, -0.2], dtype=torch.float64))
    dens = hessopt.spectral_density(A, num_steps=6, generator=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2))
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    table = layerwise(model, nn.CrossEntropyLoss(), (x, y), k=1, trace_matvecs=6)
    figs = {
        "density.png": lambda p: plot_density(dens, path=p, title="ESD"),
        "evolution.png": lambda p: plot_eigenvalue_evolution([0, 10, 20], torch.rand(3, 2), path=p, log=True),
        "line.png": lambda p: plot_landscape(_landscape(False), path=p),
        "contour.png": lambda p: plot_landscape(_landscape(True), path=p),
        "layers.png": lambda p: plot_layerwise(table, path=p),
    }
    for name, draw in figs.items():
        fig = draw(tmp_path / name)
        assert fig is not None
        assert (tmp_path / name).read_bytes()[:4] == PNG, name


def test_plot_on_given_axes_and_validation():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert plot_landscape(_landscape(False), ax=ax, label="a") is fig
    with pytest.raises(ValueError, match="3 rows but there are 2 steps"):
        plot_eigenvalue_evolution([0, 1], torch.rand(3, 2))


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install hessopt\[plot\]"):
        plot_landscape(_landscape(False))
