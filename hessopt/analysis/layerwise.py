r"""Layer-wise Hessian spectra: top eigenvalues, trace and density of each diagonal block.

Partition the parameters into blocks :math:`\theta = (\theta_1, \dots, \theta_L)` (by default one
block per module that owns parameters: a conv's weight and bias together). The layer-wise Hessian
of block :math:`l` is the diagonal block

.. math::  H_{ll} = \frac{\partial^2 L}{\partial \theta_l\, \partial \theta_l^\top},

the Hessian of the loss as a function of :math:`\theta_l` alone with every other parameter fixed:
it is exactly what :class:`hessopt.HessianOperator` computes with ``params=`` the block (the
product :math:`H_{ll} v` differentiates the gradient of the block only). Its spectrum shows where
the curvature sits (PyHessian, Yao et al. 2020; Dissecting Hessian, Wu, Zhu et al. 2020). Note
that the blocks' traces add up to the full trace, while their top eigenvalues do not in general
give the full Hessian's.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._checks import check_positive_int
from ..operators import HessianOperator
from ..probes import GeneratorLike
from ..results import SpectralDensity, _ToDict, _compact
from ..summary import curvature_summary, derive_seed, summary_seed

__all__ = ["LayerSpectrum", "LayerwiseSpectrum", "layerwise", "resolve_blocks"]


@dataclasses.dataclass(frozen=True)
class LayerSpectrum(_ToDict):
    """Spectrum of one parameter block's Hessian: a :class:`hessopt.CurvatureSummary` of the block.

    The quantities carry the names of :class:`hessopt.CurvatureSummary` (see :mod:`hessopt.results`).

    Attributes:
        name: the block's label (a module name by default).
        param_names: the parameters in the block.
        shapes: their shapes (for reshaping eigenvectors, see :mod:`hessopt.analysis.lowrank`).
        num_params: the block's dimension.
        top_eigenvalues: ``(k,)`` float64, descending (largest algebraic).
        eigenvectors: ``(num_params, k)`` or ``None`` (not kept; never written by ``to_dict``).
        eigenvalue_error_bounds: ``(k,)`` float64 a-posteriori error bounds.
        eigenvalues_converged: whether Lanczos reached its tolerance.
        trace: trace estimate (``nan`` when not computed).
        trace_std_error: its standard error (0 when exact).
        density: spectral density (SLQ) of the block, or ``None``.
        num_matvecs: block Hessian-vector products spent on this block.
        seed: the block's summary seed.
    """

    name: str
    param_names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    num_params: int
    top_eigenvalues: torch.Tensor
    eigenvectors: Optional[torch.Tensor] = dataclasses.field(repr=False)
    eigenvalue_error_bounds: torch.Tensor
    eigenvalues_converged: bool
    trace: float
    trace_std_error: float
    density: Optional[SpectralDensity] = dataclasses.field(repr=False)
    num_matvecs: int
    seed: int

    _skip_in_dict = ("eigenvectors",)
    _omit_if_none = ("density",)

    def to_dict(self) -> Dict[str, Any]:
        """Plain values (:func:`hessopt.results.to_plain`); the density without its smoothed curve."""
        return _compact(super().to_dict(), self)


@dataclasses.dataclass(frozen=True)
class LayerwiseSpectrum:
    """A table of :class:`LayerSpectrum` rows, one per block, in model order.

    Index by position or by name (``table["layer1.0.conv1"]``); ``to_dict()`` gives
    ``{"layers": [...]}`` ready for JSON and :meth:`to_markdown` a summary table.
    """

    layers: Tuple[LayerSpectrum, ...]

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(l.name for l in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, key: Union[int, str]) -> LayerSpectrum:
        if isinstance(key, str):
            for layer in self.layers:
                if layer.name == key:
                    return layer
            raise KeyError(f"no block named {key!r}; blocks are {list(self.names)}")
        return self.layers[key]

    def to_dict(self) -> Dict[str, Any]:
        return {"layers": [l.to_dict() for l in self.layers]}

    def to_markdown(self) -> str:
        """A markdown table: block, size, top eigenvalues, trace +- standard error."""
        lines = ["| block | params | top eigenvalues | trace |", "|---|---:|---|---:|"]
        for l in self.layers:
            eigs = ", ".join(f"{v:.4g}" for v in l.top_eigenvalues.tolist())
            tr = "n/a" if l.trace != l.trace else f"{l.trace:.4g} ± {l.trace_std_error:.2g}"
            lines.append(f"| `{l.name}` | {l.num_params} | {eigs} | {tr} |")
        return "\n".join(lines)


BlockSpec = Union[str, Callable[[str], bool], nn.Module, Sequence[Any]]


def resolve_blocks(model: nn.Module, blocks: Any = None) -> List[Tuple[str, List[str]]]:
    r"""Turn a block specification into ``[(label, [parameter names])]``, in model order.

    ``blocks`` may be:

    * ``None`` or ``"module"``: one block per module that directly owns trainable parameters
      (``nn.Linear`` weight and bias together; a module's children form their own blocks);
    * ``"parameter"``: one block per trainable parameter tensor;
    * a dict ``{label: spec}``, where ``spec`` is a regular expression searched in parameter
      names, a predicate on names, a module of ``model``, or a list of parameter tensors/names;
    * a list of such specs (labels: the regex, the module's name, or ``block{i}``).

    Only parameters with ``requires_grad=True`` are used.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    trainable = {id(p): n for n, p in named}
    if blocks is None or blocks == "module":
        out = []
        for mname, module in model.named_modules():
            names = [trainable[id(p)] for p in module.parameters(recurse=False) if id(p) in trainable]
            if names:
                out.append((mname or "(root)", names))
        return out
    if blocks == "parameter":
        return [(n, [n]) for n, _ in named]
    if isinstance(blocks, str):
        raise ValueError(
            f"blocks={blocks!r}: use 'module', 'parameter', a dict {{label: regex}} or a list of regexes"
        )
    module_names = {id(m): n for n, m in model.named_modules()}
    if isinstance(blocks, dict):
        items = list(blocks.items())
    elif isinstance(blocks, (list, tuple)):
        items = []
        for i, spec in enumerate(blocks):
            if isinstance(spec, str):
                label = spec
            elif isinstance(spec, nn.Module):
                label = module_names.get(id(spec), f"block{i}") or "(root)"
            else:
                label = f"block{i}"
            items.append((label, spec))
    else:
        raise TypeError(f"blocks must be None, 'module', 'parameter', a dict or a list, got {type(blocks).__name__}")
    out = []
    for label, spec in items:
        if isinstance(spec, str):
            pattern = re.compile(spec)
            names = [n for n, _ in named if pattern.search(n)]
        elif isinstance(spec, nn.Module):
            if id(spec) not in module_names:
                raise ValueError(f"block {label!r}: the module is not part of the model")
            names = [trainable[id(p)] for p in spec.parameters() if id(p) in trainable]
        elif callable(spec):
            names = [n for n, _ in named if spec(n)]
        elif isinstance(spec, (list, tuple)):
            names = []
            for item in spec:
                if isinstance(item, str):
                    if item not in dict(named):
                        raise ValueError(f"block {label!r}: no trainable parameter named {item!r}")
                    names.append(item)
                elif isinstance(item, torch.Tensor) and id(item) in trainable:
                    names.append(trainable[id(item)])
                else:
                    raise ValueError(f"block {label!r}: {type(item).__name__} is not a trainable parameter of the model")
        else:
            raise TypeError(f"block {label!r}: unsupported spec {type(spec).__name__}")
        if not names:
            raise ValueError(f"block {label!r} selects no trainable parameters; check the pattern against model.named_parameters()")
        out.append((str(label), names))
    return out


def layerwise(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: Any,
    blocks: Any = None,
    k: int = 3,
    trace_matvecs: int = 30,
    trace_method: str = "hutch++",
    density: bool = False,
    density_steps: int = 60,
    density_runs: int = 1,
    tol: float = 1e-3,
    max_matvecs: Optional[int] = None,
    bn_mode: str = "eval",
    keep_eigenvectors: bool = True,
    generator: GeneratorLike = None,
    progress: bool = False,
    loss_form: str = "outputs",
) -> LayerwiseSpectrum:
    """Top eigenvalues, trace (with standard error) and optionally the density of each block's Hessian.

    Args:
        model, loss_fn, data, bn_mode, loss_form: as for :class:`hessopt.HessianOperator`.
        blocks: the parameter blocks, see :func:`resolve_blocks` (default: one per module).
        k: top eigenvalues per block (capped at the block's dimension).
        trace_matvecs: budget of the trace estimate per block (0: skip the trace). With Hutch++ and
            a block of at most ``trace_matvecs // 3`` parameters the trace is exact.
        trace_method: ``"hutch++"`` or ``"hutchinson"``.
        density: also compute each block's spectral density (SLQ).
        density_steps, density_runs: Lanczos steps and runs of the density.
        tol, max_matvecs: passed to :func:`hessopt.top_eigenvalues`.
        keep_eigenvectors: keep the ``(n, k)`` eigenvectors in the table (for overlaps and rank).
        generator: int seed, :class:`torch.Generator` or ``None``, turned into one seed ``s`` by
            the rule of :func:`hessopt.curvature_summary`; block ``i`` is summarized with the seed
            ``s + 1000003 i``, so a block's numbers do not depend on which other blocks are asked.
        progress: a tqdm bar over blocks.

    Returns:
        :class:`LayerwiseSpectrum`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessopt.analysis import layerwise
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> table = layerwise(model, nn.CrossEntropyLoss(), (x, y), k=2, generator=0)
        >>> table.names, table["2"].num_params, table[0].top_eigenvalues.shape
        (('0', '2'), 10, torch.Size([2]))
        >>> print(table.to_markdown().splitlines()[0])
        | block | params | top eigenvalues | trace |
    """
    check_positive_int("k", k)
    if isinstance(trace_matvecs, bool) or not isinstance(trace_matvecs, int) or trace_matvecs < 0:
        raise ValueError(f"trace_matvecs must be an int >= 0 (0 skips the trace), got {trace_matvecs!r}")
    spec = resolve_blocks(model, blocks)
    params = dict(model.named_parameters())
    from tqdm.auto import tqdm

    base = summary_seed(generator)
    rows = []
    for i, (label, names) in enumerate(tqdm(spec, desc="layer-wise Hessian", disable=not progress, leave=False)):
        op = HessianOperator(model, loss_fn, data, params=[params[n] for n in names], bn_mode=bn_mode,
                             **({} if loss_form == "outputs" else {"loss_form": loss_form}))
        s = curvature_summary(op, k=k, tol=tol, max_matvecs=max_matvecs, trace_matvecs=trace_matvecs,
                              trace_method=trace_method, density=density, density_steps=density_steps,
                              density_runs=density_runs, gradient_concentration=False, loss=False,
                              generator=derive_seed(base, 1_000_003 * i))
        if not s.eigenvalues_converged:  # named by block: a bare "did not converge" is not actionable
            warnings.warn(
                f"block {label!r}: the top eigenvalues did not reach tol={tol} within the Lanczos budget "
                f"(largest error bound {float(s.eigenvalue_error_bounds.max()):.3g}); raise max_matvecs or tol",
                RuntimeWarning, stacklevel=2)
        rows.append(
            LayerSpectrum(
                name=label,
                param_names=tuple(names),
                shapes=tuple(tuple(sh) for sh in op.shapes),
                num_params=op.num_params,
                top_eigenvalues=s.top_eigenvalues,
                eigenvectors=s.eigenvectors if keep_eigenvectors else None,
                eigenvalue_error_bounds=s.eigenvalue_error_bounds,
                eigenvalues_converged=s.eigenvalues_converged,
                trace=s.trace,
                trace_std_error=s.trace_std_error,
                density=s.density,
                num_matvecs=s.num_matvecs,
                seed=s.seed,
            )
        )
        op.clear_cache()
    return LayerwiseSpectrum(tuple(rows))
