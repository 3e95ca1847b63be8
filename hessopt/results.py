"""Frozen result types returned by the estimators.

Every estimator returns one of these dataclasses rather than a bare tuple, so that call sites read
``result.eigenvalues`` instead of ``result[0]`` and so that a result can be logged with
:meth:`to_dict` (plain Python numbers and lists, ready for ``json.dumps``).

**One serializer.** :func:`to_plain` turns any result (and tensors, tuples, dicts of them) into
plain Python values and :func:`dataclass_dict` a result dataclass into a dict of them; every
``to_dict`` here, the monitor's records (:class:`hessopt.CurvatureMonitor`) and the report
(:func:`hessopt.report`) go through them.

**One name per quantity.** An estimator's own result names its fields in its own terms
(:class:`EigenResult` ``eigenvalues``, ``error_bounds``, ``converged``; :class:`TraceResult`
``estimate``, ``std_error``). Wherever several estimators' outputs sit side by side (a
:class:`CurvatureSummary`, a monitor record, a row of :func:`hessopt.analysis.layerwise`, report.json)
they are named, everywhere alike:

=============================  =======================================================
``top_eigenvalues``            ``EigenResult.eigenvalues`` (descending)
``eigenvalue_error_bounds``    ``EigenResult.error_bounds``
``eigenvalues_converged``      ``EigenResult.converged``
``trace``                      ``TraceResult.estimate``
``trace_std_error``            ``TraceResult.std_error``
``density``                    a :class:`SpectralDensity` (in dicts: ``nodes``, ``weights``, ``sigma``,
                               ``num_matvecs``; the smoothed curve is recomputed from them)
``gradient_norm``              ``||g||``
``gradient_concentration``     ``||V_k^T g||^2 / ||g||^2`` (:func:`hessopt.analysis.gradient_concentration`)
``loss``, ``num_params``,      the loss at the point, the dimension, the operator applications spent
``num_matvecs``
=============================  =======================================================
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["EigenResult", "TraceResult", "LanczosResult", "SpectralDensity", "CurvatureSummary", "to_plain",
           "dataclass_dict"]


def to_plain(value: Any) -> Any:
    """``value`` as plain Python values for JSON: the one serializer of hessopt's results.

    Tensors become (nested) lists of numbers, ``torch.Size`` a list, tuples lists, dicts keep their
    keys, and objects with a ``to_dict()`` method (every result dataclass) are replaced by it.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "to_dict") and dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # torch.Size is a tuple
        return [to_plain(v) for v in value]
    return value



def dataclass_dict(obj: Any) -> Dict[str, Any]:
    """A result dataclass's fields as plain values (:func:`to_plain`): what every ``to_dict`` returns.

    Fields named in the class's ``_skip_in_dict`` (bulky vectors) are left out, and so are fields
    named in ``_omit_if_none`` whose value is ``None`` (not computed).
    """
    skip = getattr(obj, "_skip_in_dict", ())
    omit = getattr(obj, "_omit_if_none", ())
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in skip or (value is None and f.name in omit):
            continue
        out[f.name] = to_plain(value)
    return out


class _ToDict:
    #: fields left out of :meth:`to_dict` (bulky vectors)
    _skip_in_dict: Tuple[str, ...] = ()
    #: fields left out of :meth:`to_dict` when they are ``None`` (not computed)
    _omit_if_none: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain Python values (:func:`to_plain`), minus bulky vectors."""
        return dataclass_dict(self)


@dataclasses.dataclass(frozen=True)
class EigenResult(_ToDict):
    """Top eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` float64, algebraic values in descending order (for ``which="smallest"``
            ascending, for ``which="magnitude"`` by descending absolute value).
        eigenvectors: ``(n, k)`` unit-norm columns matching ``eigenvalues``, in the accumulation dtype
            (float32 for a float16/bfloat16 operator, else the operator's dtype); on a sharded (FSDP2)
            operator this process's ``(local_size, k)`` rows.
        residuals: ``(k,)`` float64, the true ``||A v_i - lambda_i v_i||`` for each pair.
        error_bounds: ``(k,)`` float64, an a-posteriori bound on ``|lambda_i - true eigenvalue|``
            derived from the residuals (see :func:`hessopt.top_eigenvalues`).
        num_matvecs: operator applications spent.
        converged: whether the stopping test held for every pair: Lanczos
            ``error_bounds[i] <= tol * |eigenvalues[i]|``; power iteration, the residual of the
            deflated operator ``<= tol * |eigenvalues[i]|``.
        method: ``"lanczos"`` or ``"power"``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor = dataclasses.field(repr=False)
    residuals: torch.Tensor
    error_bounds: torch.Tensor
    num_matvecs: int
    converged: bool
    method: str

    _skip_in_dict = ("eigenvectors",)


@dataclasses.dataclass(frozen=True)
class TraceResult(_ToDict):
    """A stochastic trace estimate with its standard error.

    Attributes:
        estimate: the trace estimate.
        std_error: standard error of ``estimate`` (sample standard deviation of the per-probe
            estimates divided by the square root of their number; for Hutch++ the deterministic
            low-rank part contributes no variance and the error is that of the residual part).
        num_matvecs: operator applications spent.
        method: ``"hutchinson"`` or ``"hutch++"``.
        samples: the per-probe quadratic forms that the error bar is computed from (float64).
    """

    estimate: float
    std_error: float
    num_matvecs: int
    method: str
    samples: torch.Tensor = dataclasses.field(repr=False)

    _skip_in_dict = ("samples",)


@dataclasses.dataclass(frozen=True)
class LanczosResult(_ToDict):
    """Output of :func:`hessopt.lanczos`: the tridiagonal ``T = V^T A V`` and optionally ``V``.

    Attributes:
        alphas: ``(m,)`` float64 diagonal of ``T``.
        betas: ``(m - 1,)`` float64 off-diagonal of ``T``.
        basis: ``(n, m)`` orthonormal Lanczos vectors in the accumulation dtype (float32 for a
            float16/bfloat16 operator; this process's rows on a sharded one), or ``None`` when not kept.
        residual_norm: ``beta_m``, the norm of the component left outside the Krylov space; zero (up
            to round-off) when the space became invariant and the iteration stopped early.
        num_matvecs: operator applications spent (equals ``m``).
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    basis: Optional[torch.Tensor] = dataclasses.field(repr=False)
    residual_norm: float
    num_matvecs: int

    _skip_in_dict = ("basis",)

    def tridiagonal(self) -> torch.Tensor:
        """The dense ``(m, m)`` float64 tridiagonal matrix ``T``."""
        return (
            torch.diag(self.alphas)
            + torch.diag(self.betas, diagonal=1)
            + torch.diag(self.betas, diagonal=-1)
        )


@dataclasses.dataclass(frozen=True)
class SpectralDensity(_ToDict):
    """Eigenvalue spectral density by stochastic Lanczos quadrature (SLQ).

    Attributes:
        nodes: one float64 tensor per run, the Ritz values of that run (the quadrature nodes).
        weights: one float64 tensor per run, the quadrature weights (squared first components of the
            Ritz vectors); each run's weights sum to 1.
        grid: float64 points at which ``density`` is evaluated.
        density: float64 Gaussian-smoothed density on ``grid``, averaged over runs; integrates to 1.
        sigma: standard deviation of the Gaussian kernel used for smoothing.
        num_matvecs: operator applications spent over all runs.
    """

    nodes: Tuple[torch.Tensor, ...]
    weights: Tuple[torch.Tensor, ...]
    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    num_matvecs: int

    def to_dict(self, smoothed: bool = True) -> Dict[str, Any]:
        """Plain values; ``smoothed=False`` leaves out ``grid`` and ``density`` (a function of the
        nodes, weights and ``sigma``: :func:`hessopt.analysis.plots.smoothed_density` redraws it)."""
        out = super().to_dict()
        if not smoothed:
            del out["grid"], out["density"]
        return out

    @property
    def mean(self) -> float:
        """Mean eigenvalue implied by the quadrature, ``sum_i w_i t_i`` averaged over runs.

        Each run's mean is ``v^T A v`` for a unit probe ``v``: multiplied by ``n`` it is a
        Hutchinson estimate of the trace.
        """
        means = [float((w * t).sum()) for t, w in zip(self.nodes, self.weights)]
        return sum(means) / len(means)


def _compact(out: Dict[str, Any], obj: Any) -> Dict[str, Any]:
    if getattr(obj, "density", None) is not None:
        out["density"] = obj.density.to_dict(smoothed=False)
    return out


@dataclasses.dataclass(frozen=True)
class CurvatureSummary(_ToDict):
    """Top eigenvalues, trace and optionally density and gradient concentration of one operator.

    Returned by :func:`hessopt.curvature_summary`; the field names are the shared names of the
    module docstring (a :class:`hessopt.CurvatureMonitor` record is ``{"step": s, **to_dict()}``).

    Attributes:
        num_params: the operator's dimension.
        top_eigenvalues: ``(k,)`` float64, descending.
        eigenvectors: ``(n, k)`` matching unit eigenvectors (left out of :meth:`to_dict`).
        eigenvalue_error_bounds: ``(k,)`` float64 a-posteriori bounds (see :func:`hessopt.top_eigenvalues`).
        eigenvalues_converged: whether every bound met the tolerance.
        trace: trace estimate (Hutch++ by default); ``nan`` when not computed (``trace_matvecs=0``).
        trace_std_error: its standard error; ``0.0`` when exact (the Hutch++ sketch spans the
            space), ``nan`` when not computed.
        loss: the loss at the point when the operator knows it (:meth:`hessopt.HessianOperator.loss`), else ``None``.
        density: :class:`SpectralDensity` or ``None`` (in :meth:`to_dict`: nodes, weights, sigma, num_matvecs).
        gradient_norm: ``||g||`` or ``None`` (operator without a gradient, or not asked).
        gradient_concentration: ``||V_k^T g||^2 / ||g||^2`` (``nan`` for a zero gradient) or ``None``.
        num_matvecs: operator applications spent over all estimators.
        seed: the int seed the estimators' seeds derive from (see :func:`hessopt.curvature_summary`).

    ``None`` fields are left out of :meth:`to_dict`.
    """

    num_params: int
    top_eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor = dataclasses.field(repr=False)
    eigenvalue_error_bounds: torch.Tensor
    eigenvalues_converged: bool
    trace: float
    trace_std_error: float
    loss: Optional[float]
    density: Optional[SpectralDensity] = dataclasses.field(repr=False)
    gradient_norm: Optional[float]
    gradient_concentration: Optional[float]
    num_matvecs: int
    seed: int

    _skip_in_dict = ("eigenvectors",)
    _omit_if_none = ("loss", "density", "gradient_norm", "gradient_concentration")

    def to_dict(self) -> Dict[str, Any]:
        """Plain values (:func:`to_plain`); the density without its smoothed curve; ``None`` fields left out."""
        return _compact(super().to_dict(), self)

    def to_markdown(self) -> str:
        """A two-column markdown table of the quantities."""
        eigs = ", ".join(f"{v:.5g}" for v in self.top_eigenvalues.tolist())
        bounds = ", ".join(f"{v:.2g}" for v in self.eigenvalue_error_bounds.tolist())
        rows = [
            ("parameters", f"{self.num_params:,}"),
            ("top eigenvalues", eigs),
            ("eigenvalue error bounds", f"{bounds} (converged: {self.eigenvalues_converged})"),
            ("trace", "not computed" if self.trace != self.trace
             else f"{self.trace:.5g} ± {self.trace_std_error:.2g} (standard error)"),
        ]
        if self.loss is not None:
            rows.append(("loss", f"{self.loss:.6g}"))
        if self.gradient_concentration is not None:
            rows.append(("gradient norm", f"{self.gradient_norm:.4g}"))
            rows.append((f"gradient concentration (top {self.top_eigenvalues.numel()})",
                         f"{self.gradient_concentration:.4f}"))
        if self.density is not None:
            rows.append(("density (SLQ)", f"{len(self.density.nodes)} run(s), {self.density.num_matvecs} products, "
                                          f"σ = {self.density.sigma:.3g}"))
        rows.append(("operator applications", str(self.num_matvecs)))
        rows.append(("seed", str(self.seed)))
        return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])
