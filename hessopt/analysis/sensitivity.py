r"""Hessian-trace sensitivity of layers and channels, for quantization and pruning (HAWQ-V2).

The sensitivity of a parameter block :math:`b` (a layer, a parameter tensor) is the **average
trace** of its diagonal Hessian block (HAWQ-V2, Dong et al., NeurIPS 2020):

.. math::  \bar t_b = \frac{\operatorname{tr}(H_{bb})}{n_b},

and the second-order loss increase of perturbing the block's weights by :math:`\Delta W_b` is
modelled, with the Hessian block replaced by :math:`\bar t_b I`, as

.. math::  \Omega_b = \bar t_b \, \lVert \Delta W_b \rVert^2, \qquad
           \Delta W_b = Q(W_b) - W_b \text{ (quantization) or } -W_b \text{ (removal)}.

HAWQ-V2 assigns fewer bits to blocks with small :math:`\Omega_b`. The same quantity per output
channel (row :math:`c` of a linear weight, output channel :math:`c` of a conv weight, entry
:math:`c` of a bias or a normalization scale) ranks channels for structured pruning.

**Estimator (one set of probes for every block and channel).** Draw :math:`S` probes
:math:`z_s` over *all* the operator's coordinates (Rademacher by default, :math:`E[zz^\top]=I`)
and compute the full products :math:`H z_s`; let :math:`u_s = z_s \odot H z_s` (per-entry
Hutchinson samples, as in :func:`hessopt.diagonal`). For any set :math:`I` of coordinates (a
block, a channel),

.. math::  t_{I,s} = \sum_{i \in I} u_{s,i} = \sum_{i\in I}\sum_j H_{ij} z_{s,i} z_{s,j},
           \qquad E[t_{I,s}] = \sum_{i \in I} H_{ii} = \operatorname{tr}(H_{II}),

because :math:`E[z_i z_j] = \delta_{ij}`: the restriction of the full-model quadratic form to the
block's coordinates is an unbiased block-trace estimate, so one pass over :math:`S` full HVPs gives
every block's and every channel's trace at once. The estimate is the mean
:math:`\hat t_I = \frac1S\sum_s t_{I,s}` and its **standard error** is the sample standard deviation
of :math:`t_{I,1..S}` over :math:`\sqrt S`. For Rademacher probes one sample's variance is

.. math::  \operatorname{Var}(t_{I,s}) = 2\sum_{i \ne j \in I} H_{ij}^2 + \sum_{i\in I,\, j \notin I} H_{ij}^2,

the block-restricted Hutchinson variance plus the coupling to the other coordinates (zero for a
block-diagonal Hessian). A diagonal Hessian gives zero variance: the estimate is then exact with
one probe. Channels partition a block, so the per-probe channel samples add up to the block's
sample, and the channel traces add up to the block trace (up to float64 rounding).

**Quantizer** (:func:`quantize`): symmetric uniform with :math:`b` bits, levels
:math:`q \in \{-(2^{b-1}-1), \dots, 2^{b-1}-1\}` (zero is a level; the most negative code is unused,
so the grid is symmetric), scale :math:`s = \max|W| / (2^{b-1}-1)` per tensor or per output channel
(dim 0), :math:`Q(W) = s \cdot \operatorname{clamp}(\operatorname{round}(W/s))`. Every entry's error is
at most :math:`s/2`. Under ``"per_channel"``, tensors with fewer than two dimensions (biases,
normalization parameters) are quantized per tensor. The grids of :math:`b` and :math:`b+1` bits are
not nested, so the error is not monotone in :math:`b` entrywise; its bound halves per bit.

Works on any :class:`hessopt.CurvatureOperator` over a model's parameters (``op.params``,
``op.param_names``: :class:`hessopt.HessianOperator`, and Gauss-Newton or Fisher operators with the
same interface) and, for tests, on any operator given ``params=`` explicitly.

Example:
    >>> import torch, hessopt
    >>> from torch import nn
    >>> from hessopt.analysis import hessian_sensitivity
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    >>> x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    >>> op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    >>> sens = hessian_sensitivity(op, model, num_probes=32, generator=0)
    >>> sens.names, sens["0"].num_channels                    # module blocks: conv, linear
    (('0', '3'), 4)
    >>> abs(sum(sens["0"].channel_trace.tolist()) - sens["0"].trace) < 1e-9   # channels split the block
    True
    >>> q = sens.quantization(bits=4, scheme="per_channel")    # avg_trace * ||Q(W) - W||^2 per block
    >>> len(q.ranking()), q.average_bits                       # most sensitive block first
    (2, 4.0)
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..results import dataclass_dict
from .._progress import progress_bar
from ..estimators import diagonal
from ..operators import CurvatureOperator, as_operator
from ..probes import GeneratorLike, _check_distribution, generator_for, probe

from ._common import refuse_sharded
from .layerwise import resolve_blocks

__all__ = [
    "BlockSensitivity",
    "HessianSensitivity",
    "BlockQuantization",
    "QuantizationSensitivity",
    "hessian_sensitivity",
    "quantize",
    "quantization_error",
]

QUANT_SCHEMES = ("per_tensor", "per_channel")


# --------------------------------------------------------------------------------------------------
# quantizer


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise ValueError(
            f"bits must be an int >= 2 (a symmetric grid with 1 bit has only the level 0), got {bits!r}"
        )
    return bits


def quantize(tensor: torch.Tensor, bits: int, scheme: str = "per_tensor") -> torch.Tensor:
    r"""Symmetric uniform quantization ``Q(W)`` (see the module docstring), returned dequantized.

    Args:
        tensor: the weights.
        bits: bit width ``b >= 2``; levels ``-(2^{b-1}-1) .. 2^{b-1}-1`` times the scale.
        scheme: ``"per_tensor"`` (one scale ``max|W| / (2^{b-1}-1)``) or ``"per_channel"`` (one scale
            per slice along dim 0; tensors with fewer than 2 dimensions fall back to per tensor).

    An all-zero tensor (or channel) quantizes to itself.

    Example:
        >>> quantize(torch.tensor([0.6, -1.0, 0.2]), bits=2)   # levels -1, 0, 1 times scale 1.0
        tensor([ 1., -1.,  0.])
    """
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"quantize needs a floating-point tensor, got {type(tensor).__name__}")
    bits = _check_bits(bits)
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {QUANT_SCHEMES}")
    qmax = 2 ** (bits - 1) - 1
    w = tensor.detach()
    if scheme == "per_channel" and w.dim() >= 2:
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
    else:
        amax = w.abs().amax() if w.numel() else torch.zeros((), dtype=w.dtype, device=w.device)
    scale = amax / qmax
    # a zero scale (all-zero slice) would divide by zero; any positive scale maps zeros to zero
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / safe), -qmax, qmax) * safe


def quantization_error(tensor: torch.Tensor, bits: int, scheme: str = "per_tensor") -> float:
    """``||Q(W) - W||^2`` in float64 for :func:`quantize`'s quantizer."""
    q = quantize(tensor, bits, scheme)
    return float((q.double() - tensor.detach().double()).pow(2).sum())


# --------------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass(frozen=True)
class BlockSensitivity:
    r"""Hessian-trace sensitivity of one parameter block and of its output channels.

    Attributes:
        name: the block's label (module name by default, see :func:`hessopt.analysis.resolve_blocks`).
        param_names, shapes: the block's parameters and their shapes.
        num_params: :math:`n_b`.
        trace, trace_std_error: estimate of :math:`\operatorname{tr}(H_{bb})` and its standard error.
        avg_trace, avg_trace_std_error: :math:`\operatorname{tr}(H_{bb}) / n_b` (HAWQ-V2) and its error.
        weight_sq_norm: :math:`\lVert W_b \rVert^2` of the block's current values.
        num_channels: output channels (size of dim 0 shared by the block's tensors), 0 when the
            block has no channel split (tensors disagree on dim 0, or a 0-d tensor is included).
        channel_sizes: ``(C,)`` entries per channel (int64), empty when ``num_channels == 0``.
        channel_trace, channel_trace_std_error: ``(C,)`` float64 channel traces and errors.
        channel_avg_trace, channel_avg_trace_std_error: the same divided by ``channel_sizes``.
        channel_sq_norm: ``(C,)`` squared norm of each channel's entries.
        samples: ``(S,)`` float64 per-probe block samples :math:`t_{b,s}`.
        channel_samples: ``(S, C)`` float64 per-probe channel samples (not in ``to_dict``).
        diagonal: per-parameter Hutchinson diagonal estimates shaped like the parameters
            (float64; not in ``to_dict``), e.g. for Optimal Brain Damage saliencies
            ``0.5 * H_ii * w_i^2`` (LeCun et al. 1990).
    """

    name: str
    param_names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    num_params: int
    trace: float
    trace_std_error: float
    avg_trace: float
    avg_trace_std_error: float
    weight_sq_norm: float
    num_channels: int
    channel_sizes: torch.Tensor
    channel_trace: torch.Tensor
    channel_trace_std_error: torch.Tensor
    channel_avg_trace: torch.Tensor
    channel_avg_trace_std_error: torch.Tensor
    channel_sq_norm: torch.Tensor
    samples: torch.Tensor = dataclasses.field(repr=False)
    channel_samples: torch.Tensor = dataclasses.field(repr=False)
    diagonal: Tuple[torch.Tensor, ...] = dataclasses.field(repr=False)

    _skip_in_dict = ("channel_samples", "diagonal")

    @property
    def channel_removal_score(self) -> torch.Tensor:
        r"""``(C,)`` :math:`\bar t_c \lVert W_c\rVert^2`: the model loss increase of zeroing channel
        :math:`c` (the perturbation score with :math:`Q(W_c) = 0`), for structured pruning."""
        return self.channel_avg_trace * self.channel_sq_norm

    def to_dict(self) -> Dict[str, Any]:
        out = dataclass_dict(self)
        out["channel_removal_score"] = self.channel_removal_score.tolist()
        return out


def _ranked(items: Sequence[Any], key: str) -> Tuple[str, ...]:
    # descending; ties keep model order (sorted is stable)
    return tuple(b.name for b in sorted(items, key=lambda b: -getattr(b, key)))


@dataclasses.dataclass(frozen=True)
class HessianSensitivity:
    """Sensitivity of every block (in model order), from one set of ``num_probes`` probes.

    Index by position or by name (``sens["conv1"]``). ``total_trace`` is the trace estimate over
    the union of the blocks (the per-probe block samples summed), with its standard error.
    """

    blocks: Tuple[BlockSensitivity, ...]
    num_probes: int
    distribution: str
    total_trace: float
    total_trace_std_error: float
    #: the parameter values the scores refer to (``{name: tensor}``; not in ``to_dict``)
    values: Dict[str, torch.Tensor] = dataclasses.field(repr=False, compare=False, default_factory=dict)

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(b.name for b in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, key: Union[int, str]) -> BlockSensitivity:
        if isinstance(key, str):
            for b in self.blocks:
                if b.name == key:
                    return b
            raise KeyError(f"no block named {key!r}; blocks are {list(self.names)}")
        return self.blocks[key]

    def ranking(self, by: str = "avg_trace") -> Tuple[str, ...]:
        """Block names, most sensitive first, by ``"avg_trace"`` (default) or ``"trace"``."""
        if by not in ("avg_trace", "trace"):
            raise ValueError(f"by must be 'avg_trace' or 'trace', got {by!r}; for quantization scores use .quantization(bits).ranking()")
        return _ranked(self.blocks, by)

    def channel_ranking(self, by: str = "removal_score") -> List[Tuple[str, int, float]]:
        """All channels of all blocks as ``(block, channel, value)``, largest first, by
        ``"removal_score"`` (``avg_trace_c * ||W_c||^2``, default) or ``"avg_trace"``."""
        if by not in ("removal_score", "avg_trace"):
            raise ValueError(f"by must be 'removal_score' or 'avg_trace', got {by!r}")
        rows = []
        for b in self.blocks:
            values = b.channel_removal_score if by == "removal_score" else b.channel_avg_trace
            rows.extend((b.name, c, float(v)) for c, v in enumerate(values.tolist()))
        return sorted(rows, key=lambda r: -r[2])

    def quantization(self, bits: Union[int, Mapping[str, int]], scheme: str = "per_tensor",
                     params: Optional[Mapping[str, torch.Tensor]] = None) -> "QuantizationSensitivity":
        """HAWQ-V2 scores ``avg_trace * ||Q(W) - W||^2`` of every block at ``bits`` (one width for all,
        or ``{block name: bits}``), with :func:`quantize`'s quantizer applied to each tensor.

        ``params`` (``{name: tensor}``) gives the weights to quantize; by default the values the
        sensitivity was computed at (kept in the result), so call it again after training changes them
        only if you pass the new values.
        """
        if scheme not in QUANT_SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {QUANT_SCHEMES}")
        if isinstance(bits, Mapping):
            unknown = set(bits) - set(self.names)
            if unknown:
                raise ValueError(f"bits names unknown blocks {sorted(unknown)}; blocks are {list(self.names)}")
            missing = [n for n in self.names if n not in bits]
            if missing:
                raise ValueError(f"bits gives no width for blocks {missing}: give every block a width")
        values = dict(self.values) if params is None else dict(params)
        rows = []
        for b in self.blocks:
            width = _check_bits(bits[b.name] if isinstance(bits, Mapping) else bits)
            missing = [n for n in b.param_names if n not in values]
            if missing:
                raise ValueError(f"params lacks {missing} of block {b.name!r}")
            err = sum(quantization_error(values[n], width, scheme) for n in b.param_names)
            rows.append(BlockQuantization(
                name=b.name, bits=width, num_params=b.num_params, avg_trace=b.avg_trace,
                avg_trace_std_error=b.avg_trace_std_error, quant_error_sq=err,
                score=b.avg_trace * err, score_std_error=b.avg_trace_std_error * err))
        return QuantizationSensitivity(tuple(rows), scheme)

    def to_dict(self) -> Dict[str, Any]:
        return {"blocks": [b.to_dict() for b in self.blocks], "num_probes": self.num_probes,
                "distribution": self.distribution, "total_trace": self.total_trace,
                "total_trace_std_error": self.total_trace_std_error}

    def to_markdown(self) -> str:
        """A markdown table: block, size, trace ± s.e., average trace ± s.e., channels."""
        lines = ["| block | params | trace | avg trace | channels |", "|---|---:|---:|---:|---:|"]
        for b in self.blocks:
            lines.append(f"| `{b.name}` | {b.num_params} | {b.trace:.4g} ± {b.trace_std_error:.2g} "
                         f"| {b.avg_trace:.4g} ± {b.avg_trace_std_error:.2g} | {b.num_channels} |")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class BlockQuantization:
    """One block's HAWQ-V2 score at a bit width: ``score = avg_trace * quant_error_sq``, with
    ``score_std_error = avg_trace_std_error * quant_error_sq`` (the quantization error is exact)."""

    name: str
    bits: int
    num_params: int
    avg_trace: float
    avg_trace_std_error: float
    quant_error_sq: float
    score: float
    score_std_error: float

    def to_dict(self) -> Dict[str, Any]:
        return dataclass_dict(self)


@dataclasses.dataclass(frozen=True)
class QuantizationSensitivity:
    """Per-block quantization-perturbation scores at given bit widths (see :meth:`HessianSensitivity.quantization`).

    ``total_score`` is HAWQ-V2's modelled loss increase of the whole bit assignment, the sum of the
    block scores; ``average_bits`` the parameter-weighted mean width.
    """

    blocks: Tuple[BlockQuantization, ...]
    scheme: str

    @property
    def total_score(self) -> float:
        return float(sum(b.score for b in self.blocks))

    @property
    def average_bits(self) -> float:
        return sum(b.bits * b.num_params for b in self.blocks) / sum(b.num_params for b in self.blocks)

    def __getitem__(self, key: Union[int, str]) -> BlockQuantization:
        if isinstance(key, str):
            for b in self.blocks:
                if b.name == key:
                    return b
            raise KeyError(f"no block named {key!r}")
        return self.blocks[key]

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def ranking(self) -> Tuple[str, ...]:
        """Block names by score, most sensitive first."""
        return _ranked(self.blocks, "score")

    def to_dict(self) -> Dict[str, Any]:
        return {"blocks": [b.to_dict() for b in self.blocks], "scheme": self.scheme,
                "total_score": self.total_score, "average_bits": self.average_bits}


# --------------------------------------------------------------------------------------------------
# the estimator


def _operator_params(op: CurvatureOperator, params: Any) -> List[Tuple[str, torch.Tensor]]:
    if params is None:
        names, tensors = getattr(op, "param_names", None), getattr(op, "params", None)
        if names is None or tensors is None:
            raise TypeError(
                f"{type(op).__name__} does not say which parameters it acts on (no .params / "
                ".param_names): use an operator over a model's parameters (hessopt.HessianOperator) "
                "or pass params={name: tensor} in the operator's coordinate order"
            )
        named = list(zip(names, tensors))
    elif isinstance(params, Mapping):
        named = list(params.items())
    else:
        raise TypeError(f"params must be None or a dict {{name: tensor}}, got {type(params).__name__}")
    for n, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"parameter {n!r} is a {type(t).__name__}, not a tensor")
    total = sum(t.numel() for _, t in named)
    if total != op.num_params:
        raise ValueError(
            f"the parameters have {total} entries but the operator acts on {op.num_params}: params "
            "must list exactly the operator's coordinates, in order"
        )
    return named


def _blocks_without_model(names: List[str], blocks: Any) -> List[Tuple[str, List[str]]]:
    if blocks is None or blocks == "parameter":
        return [(n, [n]) for n in names]
    if isinstance(blocks, Mapping):
        out = []
        for label, spec in blocks.items():
            if isinstance(spec, str):
                pattern = re.compile(spec)
                chosen = [n for n in names if pattern.search(n)]
            elif isinstance(spec, (list, tuple)):
                chosen = list(spec)
            elif callable(spec):
                chosen = [n for n in names if spec(n)]
            else:
                raise TypeError(f"block {label!r}: spec must be a regex, a list of names or a predicate")
            if not chosen:
                raise ValueError(f"block {label!r} selects no parameters of the operator; its names are {names}")
            out.append((str(label), chosen))
        return out
    raise ValueError(
        f"without a model, blocks must be None/'parameter' or a dict {{label: regex | [names]}}, got {blocks!r}; "
        "pass the model to group parameters by module"
    )


def _channel_count(shapes: Sequence[torch.Size]) -> int:
    if any(len(s) == 0 for s in shapes):
        return 0
    sizes = {s[0] for s in shapes}
    return sizes.pop() if len(sizes) == 1 else 0


def _mean_and_error(samples: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean over dim 0 and sample std / sqrt(S) (``inf`` with one probe, unless every sample agrees)."""
    mean = samples.mean(dim=0)
    if samples.shape[0] > 1:
        err = samples.std(dim=0, unbiased=True) / math.sqrt(samples.shape[0])
    else:
        err = torch.full_like(mean, math.inf)
    return mean, err


def hessian_sensitivity(
    op: CurvatureOperator,
    model: Optional[nn.Module] = None,
    blocks: Any = None,
    num_probes: int = 64,
    generator: GeneratorLike = None,
    distribution: str = "rademacher",
    probes: Optional[torch.Tensor] = None,
    params: Optional[Mapping[str, torch.Tensor]] = None,
    progress: bool = False,
) -> HessianSensitivity:
    r"""Per-block and per-channel Hessian-trace sensitivity from ``num_probes`` full products ``op @ z``.

    Args:
        op: a curvature operator over parameters (``op.params``, ``op.param_names``), e.g.
            :class:`hessopt.HessianOperator`, or any operator with ``params=`` given.
        model: the model, to group parameters by module (:func:`hessopt.analysis.resolve_blocks`);
            its parameter names must be the operator's (as for a ``HessianOperator`` of it).
        blocks: with ``model``: any spec :func:`~hessopt.analysis.resolve_blocks` accepts (default
            one block per module); without: ``None``/``"parameter"`` (one block per tensor) or a dict
            ``{label: regex | [names]}``. Every block's parameters must be covered by the operator.
        num_probes: ``S``, the number of probes (= Hessian-vector products); at least 2 for error bars.
        generator: a :class:`torch.Generator`, a seed or ``None`` (as for :func:`hessopt.diagonal`).
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        probes: an ``(n, S)`` tensor of probes to use instead (e.g. for exact expectations).
        params: ``{name: tensor}`` in the operator's coordinate order, overriding ``op.params``.
        progress: a tqdm bar over probes.

    Returns:
        :class:`HessianSensitivity`: per-block traces, average traces, channel splits, all with
        standard errors (see the module docstring for the estimator); ``.quantization(bits)`` for
        HAWQ-V2 scores, ``.ranking()``, ``.channel_ranking()``.
    """
    op = as_operator(op)
    refuse_sharded(op, "hessian_sensitivity (per-parameter blocks of whole probe vectors)")
    _check_distribution(distribution)
    named = _operator_params(op, params)
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"parameter names must be unique, got {names}")
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        spec = resolve_blocks(model, blocks)
    else:
        spec = _blocks_without_model(names, blocks)
    index = {n: i for i, n in enumerate(names)}
    for label, block_names in spec:
        missing = [n for n in block_names if n not in index]
        if missing:
            raise ValueError(
                f"block {label!r} includes {missing}, which the operator does not act on; build the "
                "operator over those parameters too, or choose blocks= within op.param_names"
            )
    if probes is not None:
        if not isinstance(probes, torch.Tensor) or probes.dim() != 2 or probes.shape[0] != op.num_params:
            got = tuple(probes.shape) if isinstance(probes, torch.Tensor) else type(probes).__name__
            raise ValueError(f"probes must be a ({op.num_params}, S) tensor with one probe per column, got {got}")
        num_probes = probes.shape[1]
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be an int >= 1 (2 or more for standard errors), got {num_probes!r}")

    offsets = [0]
    for _, t in named:
        offsets.append(offsets[-1] + t.numel())
    shapes = {n: t.shape for n, t in named}
    channels = [_channel_count([shapes[n] for n in bn]) for _, bn in spec]
    block_samples = torch.zeros(num_probes, len(spec), dtype=torch.float64)
    channel_samples = [torch.zeros(num_probes, c, dtype=torch.float64) for c in channels]
    diag_total = torch.zeros(op.num_params, dtype=torch.float64, device=op.device)
    gen = None if probes is not None else generator_for(op, generator)
    with progress_bar(num_probes, progress, "Hessian sensitivity") as bar:
        for s in range(num_probes):
            if probes is not None:
                z = probes[:, s].to(dtype=op.dtype, device=op.device)
            else:
                z = probe(op.num_params, gen, dtype=op.dtype, distribution=distribution)
            # one probe through the public estimator: u = z * (H z), the per-entry Hutchinson sample
            u = diagonal(op, probes=z[:, None]).double()
            diag_total += u
            for b, (_, block_names) in enumerate(spec):
                parts = [u[offsets[index[n]]:offsets[index[n] + 1]] for n in block_names]
                if channels[b]:
                    per_channel = sum(p.reshape(channels[b], -1).sum(dim=1) for p in parts)
                    channel_samples[b][s] = per_channel.cpu()
                    block_samples[s, b] = per_channel.sum().cpu()
                else:
                    block_samples[s, b] = sum(p.sum() for p in parts).cpu()
            bar.update()

    diag = diag_total / num_probes
    values = {n: t.detach() for n, t in named}
    rows = []
    for b, (label, block_names) in enumerate(spec):
        n_b = sum(values[n].numel() for n in block_names)
        tr, tr_err = (float(v) for v in _mean_and_error(block_samples[:, b:b + 1]))
        C = channels[b]
        if C:
            sizes = torch.tensor([sum(values[n][0].numel() for n in block_names)] * C, dtype=torch.int64)
            ctr, cerr = _mean_and_error(channel_samples[b])
            csq = sum(values[n].double().reshape(C, -1).pow(2).sum(dim=1).cpu() for n in block_names)
        else:
            sizes = torch.zeros(0, dtype=torch.int64)
            ctr = cerr = csq = torch.zeros(0, dtype=torch.float64)
        rows.append(BlockSensitivity(
            name=label,
            param_names=tuple(block_names),
            shapes=tuple(tuple(values[n].shape) for n in block_names),
            num_params=n_b,
            trace=tr,
            trace_std_error=tr_err,
            avg_trace=tr / n_b,
            avg_trace_std_error=tr_err / n_b,
            weight_sq_norm=float(sum(values[n].double().pow(2).sum() for n in block_names)),
            num_channels=C,
            channel_sizes=sizes,
            channel_trace=ctr,
            channel_trace_std_error=cerr,
            channel_avg_trace=ctr / sizes.double() if C else ctr,
            channel_avg_trace_std_error=cerr / sizes.double() if C else cerr,
            channel_sq_norm=csq,
            samples=block_samples[:, b].clone(),
            channel_samples=channel_samples[b],
            diagonal=tuple(diag[offsets[index[n]]:offsets[index[n] + 1]].reshape(values[n].shape).cpu()
                           for n in block_names),
        ))
    total, total_err = (float(v) for v in _mean_and_error(block_samples.sum(dim=1, keepdim=True)))
    return HessianSensitivity(tuple(rows), num_probes, "given" if probes is not None else distribution,
                              total, total_err, {n: v.clone() for n, v in values.items()})
