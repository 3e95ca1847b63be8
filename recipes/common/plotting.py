"""Plots of a recipe's output directory: training curves (metrics.jsonl) and curvature (curvature.jsonl).

The recipes write one JSON object per epoch to ``metrics.jsonl`` (``epoch``, ``train_loss``,
``val_loss``, ``train_acc``, ``val_acc``, ...) and the monitor's records to ``curvature.jsonl``;
:func:`plot_run` draws ``training.png`` from the first (:func:`plot_training`, recipe-side: the
library knows nothing of the recipes' metrics) and ``curvature.png``/``density.png`` from the
second with the library's plots (:func:`hessopt.analysis.plots.plot_curvature`,
:func:`hessopt.analysis.plots.plot_densities`). Needs matplotlib (``pip install hessopt[plot]``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

from hessopt.analysis.plots import plot_curvature, plot_densities
from hessopt.monitor import read_jsonl

__all__ = ["plot_training", "plot_run"]


def plot_training(records: Sequence[Dict[str, Any]], path: Union[str, os.PathLike]) -> Path:
    """Loss (train and validation) and accuracy per epoch, from epoch records."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install hessopt[plot]") from err
    epochs = [r for r in records if "epoch" in r]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    x = [r["epoch"] for r in epochs]
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if any(key in r for r in epochs):
            ax_loss.plot(x, [r.get(key, float("nan")) for r in epochs], marker="o", ms=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    for key, label in (("train_acc", "train"), ("val_acc", "validation")):
        if any(key in r for r in epochs):
            ax_acc.plot(x, [100 * r.get(key, float("nan")) for r in epochs], marker="o", ms=3, label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_run(output_dir: Union[str, os.PathLike], metrics_file: str = "metrics.jsonl",
             curvature_file: str = "curvature.jsonl") -> List[Path]:
    """Write ``training.png``, ``curvature.png`` and ``density.png`` (where there is data) into ``output_dir``."""
    out = Path(output_dir)
    written: List[Path] = []
    if (out / metrics_file).exists():
        metrics = [r for r in read_jsonl(out / metrics_file) if "epoch" in r]
        if metrics:
            written.append(plot_training(metrics, out / "training.png"))
    if (out / curvature_file).exists():
        curvature = read_jsonl(out / curvature_file)
        if curvature:
            plot_curvature(curvature, path=out / "curvature.png")
            written.append(out / "curvature.png")
            if plot_densities(curvature, path=out / "density.png") is not None:
                written.append(out / "density.png")
    return written
