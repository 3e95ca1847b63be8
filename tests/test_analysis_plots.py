"""Plots (the one plots module): each draws, saves a PNG, and a missing matplotlib names the [plot] extra."""
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


def test_one_smoothing_for_results_and_records():
    from hessopt.analysis.plots import smoothed_density

    A = torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.0], dtype=torch.float64))
    dens = hessopt.spectral_density(A, num_runs=2, num_steps=3, generator=0)
    grid, curve = smoothed_density(dens.to_dict(smoothed=False))  # a record's or report's compact form
    assert torch.equal(grid, dens.grid) and torch.equal(curve, dens.density)  # the numbers spectral_density gives
    g2, c2 = smoothed_density(dens)
    assert torch.equal(g2, dens.grid) and torch.equal(c2, dens.density)


def test_monitor_record_and_summary_plots(tmp_path):
    from hessopt.analysis.plots import plot_curvature, plot_densities, plot_eigenvalues

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2))
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    mon = hessopt.CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=1, k=2, max_matvecs=6,
                                   trace_matvecs=6, density=True, density_steps=5, tensorboard=False)
    records = [mon.compute(s) for s in (0, 1, 2)]
    summary = hessopt.curvature_summary(hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y)), k=3,
                                        generator=0)
    figs = {
        "curvature.png": lambda p: plot_curvature(records, path=p),
        "densities.png": lambda p: plot_densities(records, path=p, max_curves=2),
        "eigenvalues.png": lambda p: plot_eigenvalues(summary, path=p),
        "density.png": lambda p: plot_density(records[0]["density"], path=p),
    }
    for name, draw in figs.items():
        assert draw(tmp_path / name) is not None
        assert (tmp_path / name).read_bytes()[:4] == PNG, name
    assert plot_densities([{k: v for k, v in r.items() if k != "density"} for r in records]) is None
