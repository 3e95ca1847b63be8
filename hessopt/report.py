r"""A curvature report of any model (or operator): report.json, report.md and plots in one call.

:func:`report` is the library form of ``hessopt analyze``: give it your own ``nn.Module``, loss and
data (one batch or an iterable of batches, e.g. a DataLoader) or any curvature operator, and it
writes into ``out``

* ``report.json``: every number (:meth:`hessopt.CurvatureSummary.to_dict`, and the layer-wise
  table and landscapes when asked), the configuration, the versions of hessopt, torch and Python,
  and the date (UTC);
* ``report.md``: the same as readable tables, with the plots embedded;
* ``density.png``, ``eigenvalues.png`` and, when asked, ``layerwise.png``, ``landscape_top.png``,
  ``landscape_random.png`` (matplotlib, ``pip install hessopt[plot]``; ``plots=False`` skips them).

The numbers come from one :func:`hessopt.curvature_summary` with ``generator=seed`` (its seeding
rule: eigenvalues ``seed``, trace ``seed + 1``, density ``seed + 2``); the layer-wise analysis uses
base seed ``seed`` (block ``i``: ``seed + 1000003 i``) and the random landscape plane ``seed + 3``.

Example:
    >>> import tempfile, torch, hessopt
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    >>> r = hessopt.report(model, nn.CrossEntropyLoss(), [(x[:8], y[:8]), (x[8:], y[8:])],
    ...                    out=tempfile.mkdtemp(), k=3, layerwise=True, plots=False)
    >>> sorted(r.paths), r.summary.num_params, r.layerwise.names
    (['json', 'markdown'], 26, ('0', '2'))
"""
from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from .operators import CurvatureOperator, as_operator
from .results import CurvatureSummary, to_plain
from .summary import curvature_summary, derive_seed

__all__ = ["Report", "report", "MATRICES"]

#: ``matrix=`` name -> the operator class in :mod:`hessopt` that builds it from (model, loss_fn, data)
MATRICES = {
    "hessian": "HessianOperator",
    "ggn": "GGNOperator",
    "fisher": "EmpiricalFisherOperator",
}

_REPORT_FILES = ("report.json", "report.md")
_LAYERWISE_DEFAULTS = {"k": 1, "trace_matvecs": 12}
_LANDSCAPE_DEFAULTS = {"steps": 21, "grid": 11, "distance": None}


@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`report` computed and wrote.

    Attributes:
        summary: the :class:`hessopt.CurvatureSummary` of the whole operator.
        paths: the files written, by role: ``"json"``, ``"markdown"``, and the plots
            (``"density"``, ``"eigenvalues"``, ``"layerwise"``, ``"landscape_top"``,
            ``"landscape_random"``) that were drawn.
        layerwise: the :class:`hessopt.analysis.LayerwiseSpectrum` when asked, else ``None``.
        landscapes: ``{"top_eigenvector": Landscape, "random_plane": Landscape}`` when asked.
    """

    summary: CurvatureSummary
    paths: Dict[str, Path]
    layerwise: Any = None
    landscapes: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _operator_class(matrix: str):
    import hessopt

    if matrix not in MATRICES:
        raise ValueError(f"matrix={matrix!r}: choose one of {sorted(MATRICES)}")
    cls = getattr(hessopt, MATRICES[matrix], None)
    if cls is None:
        raise ValueError(
            f"matrix={matrix!r} needs hessopt.{MATRICES[matrix]}, which this version of hessopt does not have; "
            "use matrix='hessian' or build the operator yourself and pass it instead of the model"
        )
    return cls


def _options(value: Union[bool, Dict[str, Any]], defaults: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    if value is False or value is None:
        return None
    if value is True:
        return dict(defaults)
    if isinstance(value, dict):
        return {**defaults, **value}
    raise TypeError(f"{name} must be True, False or a dict of options, got {type(value).__name__}")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; give a directory for the report")
    existing = [name for name in _REPORT_FILES if (out / name).is_file() and (out / name).stat().st_size > 0]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a report ({', '.join(existing)}); pass overwrite=True to replace it, "
            "or choose another out directory"
        )


def _describe(value: Any) -> Any:
    """A JSON-able description of a configuration value (callables and modules by name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return getattr(value, "__qualname__", None) or type(value).__name__


def report(
    model_or_op: Union[nn.Module, CurvatureOperator, torch.Tensor],
    loss_fn: Optional[Callable[..., torch.Tensor]] = None,
    data: Any = None,
    *,
    out: Union[str, os.PathLike],
    k: int = 5,
    layerwise: Union[bool, Dict[str, Any]] = False,
    landscape: Union[bool, Dict[str, Any]] = False,
    density: bool = True,
    seed: int = 0,
    bn_mode: str = "eval",
    params: Any = None,
    matrix: str = "hessian",
    loss_form: str = "outputs",
    progress: bool = False,
    overwrite: bool = False,
    plots: bool = True,
    metadata: Optional[Dict[str, Any]] = None,
    **summary_kwargs: Any,
) -> Report:
    """Compute a curvature summary of a model or operator and write report.json, report.md and plots.

    Args:
        model_or_op: an ``nn.Module`` (with ``loss_fn`` and ``data``: the operator is built as
            ``hessopt.HessianOperator(model, loss_fn, data, params=params, bn_mode=bn_mode)``, or the
            class that ``matrix`` names), or any curvature operator / dense symmetric tensor (then
            ``loss_fn``, ``data``, ``params`` and ``bn_mode`` do not apply, and ``layerwise`` and
            ``landscape``, which need the model, are refused).
        loss_fn, data: as for :class:`hessopt.HessianOperator` (data: one batch or an iterable of
            batches, averaged weighted by batch size).
        out: output directory (created). A directory that already holds a non-empty report.json or
            report.md is refused unless ``overwrite=True``.
        k: number of top eigenvalues.
        layerwise: ``True`` for the spectrum of every module (:func:`hessopt.analysis.layerwise`,
            defaults ``k=1, trace_matvecs=12``), or a dict of its options (``blocks``, ``k``,
            ``trace_matvecs``, ``density``, ...).
        landscape: ``True`` for the loss along the top eigenvector (``steps=21`` points over
            ``[-d, d]``, ``d = 2 sqrt(2/lambda_1)`` where the quadratic model rises by 4, unless
            ``distance`` is given) and on a plane of two random filter-normalized directions
            (``grid=11`` points per axis over ``[-1, 1]``; ``grid=0`` skips it), or a dict of
            those options.
        density: also the spectral density (SLQ).
        seed: the seed of every random quantity (see the module docstring).
        bn_mode, params: as for :class:`hessopt.HessianOperator`.
        matrix: ``"hessian"``, ``"ggn"`` (generalized Gauss-Newton) or ``"fisher"`` (empirical
            Fisher): the curvature matrix of the model (:data:`MATRICES`).
        loss_form: ``"outputs"`` (``loss_fn(outputs, targets)``, or ``loss_fn=None`` for a model
            that returns ``outputs.loss``) or ``"model"`` (``loss_fn(model, batch)``), as for
            :class:`hessopt.HessianOperator`.
        progress: tqdm bars.
        overwrite: replace an existing report in ``out``.
        plots: draw the PNG plots (needs matplotlib).
        metadata: JSON-able facts to record under ``"metadata"`` (e.g. checkpoint, dataset).
        **summary_kwargs: passed to :func:`hessopt.curvature_summary` (``tol``, ``max_matvecs``,
            ``trace_matvecs``, ``trace_method``, ``density_steps``, ``density_runs``,
            ``gradient_concentration``).

    Returns:
        :class:`Report` with the summary and the paths written.
    """
    started = time.perf_counter()
    is_model = isinstance(model_or_op, nn.Module)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    for name in ("generator", "density"):
        if name in summary_kwargs:
            raise TypeError(f"report() sets {name} itself (use seed= / density=); do not pass it in summary_kwargs")
    layer_opts = _options(layerwise, _LAYERWISE_DEFAULTS, "layerwise")
    land_opts = _options(landscape, _LANDSCAPE_DEFAULTS, "landscape")
    if is_model:
        if data is None:
            raise ValueError("a model needs data: one batch or an iterable of batches (e.g. a DataLoader)")
        cls = _operator_class(matrix)
        if matrix != "hessian" and layer_opts is not None:
            raise ValueError(f"layerwise spectra are of the Hessian; use matrix='hessian' with layerwise (got {matrix!r})")
    else:
        if not isinstance(model_or_op, (CurvatureOperator, torch.Tensor)):
            raise TypeError(
                f"report() takes an nn.Module (with loss_fn and data) or a curvature operator, not {type(model_or_op).__name__}"
            )
        if loss_fn is not None or data is not None:
            raise ValueError("loss_fn and data are for a model; an operator carries its own data: drop them")
        for what, opts in (("layerwise", layer_opts), ("landscape", land_opts)):
            if opts is not None:
                raise ValueError(f"{what} needs the model: pass the nn.Module with loss_fn and data instead of an operator")
    model_kwargs: Dict[str, Any] = {} if loss_form == "outputs" else {"loss_form": loss_form}
    if model_kwargs and land_opts is not None:
        from .analysis.landscape import loss_landscape

        if "loss_form" not in inspect.signature(loss_landscape).parameters:
            raise ValueError(f"landscape with loss_form={loss_form!r}: hessopt.analysis.loss_landscape takes "
                             "loss(outputs, targets) only in this version; drop landscape or the loss form")
    out = Path(out)
    _check_out(out, overwrite)
    if plots:
        from .analysis.plots import _matplotlib

        _matplotlib()  # fail now, not after the computation, if matplotlib is missing

    timings: Dict[str, float] = {}
    if is_model:
        op = cls(model_or_op, loss_fn, data, params=params, bn_mode=bn_mode, **model_kwargs)
    else:
        op = as_operator(model_or_op)
    t0 = time.perf_counter()
    summary = curvature_summary(op, k=k, density=density, generator=seed, progress=progress, **summary_kwargs)
    timings["summary"] = time.perf_counter() - t0
    if hasattr(op, "clear_cache"):
        op.clear_cache()

    table = None
    if layer_opts is not None:
        from .analysis.layerwise import layerwise as layerwise_fn

        t0 = time.perf_counter()
        opts = {"tol": summary_kwargs.get("tol", 1e-3), **layer_opts}
        table = layerwise_fn(model_or_op, loss_fn, data, bn_mode=bn_mode, keep_eigenvectors=False,
                             generator=seed, progress=progress, **model_kwargs, **opts)
        timings["layerwise"] = time.perf_counter() - t0
    landscapes: Dict[str, Any] = {}
    if land_opts is not None:
        from .analysis.landscape import loss_landscape

        t0 = time.perf_counter()
        lam = float(summary.top_eigenvalues[0])
        dist = land_opts["distance"] or (2 * math.sqrt(2 / lam) if lam > 0 else 1.0)
        landscapes["top_eigenvector"] = loss_landscape(
            model_or_op, loss_fn, data, summary.eigenvectors[:, :1], steps=land_opts["steps"], distance=dist,
            params=params, bn_mode=bn_mode, progress=progress, **model_kwargs)
        if land_opts["grid"]:
            landscapes["random_plane"] = loss_landscape(
                model_or_op, loss_fn, data, "random", num_directions=2, steps=land_opts["grid"], distance=1.0,
                params=params, bn_mode=bn_mode, generator=derive_seed(seed, 3), progress=progress, **model_kwargs)
        timings["landscape"] = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Path] = {}
    if plots:
        paths.update(_plots(out, summary, table, landscapes))
    timings["total"] = time.perf_counter() - started

    import hessopt

    record: Dict[str, Any] = {
        "hessopt_version": hessopt.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "operator": type(op).__name__,
            "matrix": matrix if is_model else None,
            "loss_form": loss_form if is_model else None,
            "model": type(model_or_op).__name__ if is_model else None,
            "loss_fn": _describe(loss_fn),
            "k": k,
            "density": density,
            "seed": seed,
            "bn_mode": bn_mode if is_model else None,
            "params": _describe(params),
            "dtype": str(op.dtype),
            "device": str(op.device),
            "summary_kwargs": _describe(summary_kwargs),
            "layerwise": _describe(layer_opts),
            "landscape": _describe(land_opts),
        },
        "metadata": to_plain(metadata) if metadata is not None else {},
        "summary": summary.to_dict(),
    }
    if table is not None:
        record["layerwise"] = table.to_dict()["layers"]
    if landscapes:
        record["landscape"] = {name: ls.to_dict() for name, ls in landscapes.items()}
    record["plots"] = {name: p.name for name, p in paths.items()}
    record["timings_s"] = timings
    paths["json"] = out / "report.json"
    paths["markdown"] = out / "report.md"
    paths["json"].write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    paths["markdown"].write_text(_markdown(record, summary, table, landscapes), encoding="utf-8")
    return Report(summary=summary, paths=paths, layerwise=table, landscapes=landscapes)


def _plots(out: Path, summary: CurvatureSummary, table, landscapes) -> Dict[str, Path]:
    from .analysis.plots import plot_density, plot_eigenvalues, plot_landscape, plot_layerwise

    paths = {}
    if summary.density is not None:
        paths["density"] = out / "density.png"
        plot_density(summary.density, path=paths["density"], title="eigenvalue density (SLQ)")
    paths["eigenvalues"] = out / "eigenvalues.png"
    plot_eigenvalues(summary, path=paths["eigenvalues"], title=f"top {summary.top_eigenvalues.numel()} eigenvalues")
    if table is not None:
        paths["layerwise"] = out / "layerwise.png"
        plot_layerwise(table, path=paths["layerwise"], title="layer-wise top eigenvalue and trace")
    if "top_eigenvector" in landscapes:
        paths["landscape_top"] = out / "landscape_top.png"
        plot_landscape(landscapes["top_eigenvector"], path=paths["landscape_top"], title="loss along the top eigenvector")
    if "random_plane" in landscapes:
        paths["landscape_random"] = out / "landscape_random.png"
        plot_landscape(landscapes["random_plane"], path=paths["landscape_random"],
                       title="loss on two random filter-normalized directions")
    return paths


def _markdown(record: Dict[str, Any], summary: CurvatureSummary, table, landscapes) -> str:
    cfg = record["config"]
    what = f"{cfg['matrix']} of `{cfg['model']}`" if cfg["model"] else f"operator `{cfg['operator']}`"
    lines = [
        "# Curvature report",
        "",
        f"The {what}: {summary.num_params:,} parameters, {cfg['dtype']} on {cfg['device']}"
        + (f", BatchNorm in {cfg['bn_mode']} mode" if cfg["bn_mode"] else "") + f", seed {cfg['seed']}. "
        f"hessopt {record['hessopt_version']}, torch {record['torch_version']}, Python {record['python_version']}, "
        f"{record['date']}.",
        "",
        summary.to_markdown(),
        "",
    ]
    if record["metadata"]:
        lines += ["| metadata | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in record["metadata"].items()]
        lines.append("")
    plots = record["plots"]
    if "eigenvalues" in plots:
        lines += ["## Top eigenvalues", "", f"![top eigenvalues]({plots['eigenvalues']})", ""]
    if "density" in plots:
        lines += ["## Eigenvalue density", "", f"![density]({plots['density']})", ""]
    if table is not None:
        lines += ["## Layer-wise spectra", "", table.to_markdown(), ""]
        if "layerwise" in plots:
            lines += [f"![layer-wise]({plots['layerwise']})", ""]
    if landscapes:
        lines += ["## Loss landscape", ""]
        t = landscapes["top_eigenvector"]
        losses = t.losses
        lines += [
            f"Along the unit top eigenvector (λ₁ = {float(summary.top_eigenvalues[0]):.4g}), α in "
            f"[{float(t.alphas[0]):.3g}, {float(t.alphas[-1]):.3g}]: loss from {float(losses.min()):.4f} to "
            f"{float(losses.max()):.4f} (center {t.center_loss:.4f}).",
            "",
        ]
        if "landscape_top" in plots:
            lines += [f"![landscape along the top eigenvector]({plots['landscape_top']})", ""]
        if "random_plane" in landscapes:
            lines += ["Plane of two random filter-normalized directions (Li et al. 2018), coordinates in [-1, 1].", ""]
            if "landscape_random" in plots:
                lines += [f"![landscape on a random plane]({plots['landscape_random']})", ""]
    lines += ["## Timings", "", ", ".join(f"{k} {v:.2f} s" for k, v in record["timings_s"].items()), ""]
    return "\n".join(lines)
