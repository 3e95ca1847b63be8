r"""Curvature sources: what plays the role of the Hessian diagonal in :class:`hessopt.AdaHessian`
and :class:`hessopt.Sophia`.

A source turns one curvature step's inputs (:class:`CurvatureInputs`) into a per-entry estimate,
one tensor per parameter, *before* the optimizer's own post-processing (AdaHessian: absolute value,
spatial averaging, squaring; Sophia: exponential averaging). Three class attributes tell the
optimizer what the step needs:

``needs_graph``   the closure's ``backward()`` must build the gradient's graph (double backward);
``needs_logits``  the closure's ``F.cross_entropy`` logits are captured and their graph kept;
``needs_closure`` the closure is evaluated again at perturbed weights.

=====================  ==========================================================  ===========================  ====================================
source                 estimate of                                                 extra cost per curvature     works with
                                                                                   step
=====================  ==========================================================  ===========================  ====================================
``"hutchinson"``       :math:`\operatorname{diag}H` by :math:`z\odot Hz`            one HVP (double backward,    eager PyTorch; fused attention via
                       (Rademacher :math:`z`; unbiased, exact for diagonal H)       ~2-5 gradients)              :func:`hessopt.second_order_safe`
``"gnb"``              :math:`\operatorname{diag}` of the Gauss-Newton matrix       one backward of a sampled    anything that runs a backward:
                       of softmax cross-entropy (= Fisher), by                      loss through the kept        fused/flash attention,
                       :math:`B\,\hat g\odot\hat g`, labels sampled from the        graph                        ``torch.compile``, FSDP
                       model's own softmax (Gauss-Newton-Bartlett)
``"finite_difference"``:math:`z\odot Hz` with :math:`Hz\approx(g(\theta+hz)-g(\theta))/h`  one (forward) or two      the same; closure form only
                       (or central differences)                                     (central) gradients
``"exact"``            :math:`H_{ii}=(He_i)_i`                                      one HVP per entry            tiny models, tests
``"gradient"``         :math:`g` (AdaHessian becomes AdamW)                          none                         everything
=====================  ==========================================================  ===========================  ====================================

A plain callable ``(params, grads, generators) -> list of tensors`` is a source too (with
``needs_graph`` read from its attribute, default True). :func:`make_curvature` turns an optimizer's
``curvature=`` argument into a source.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .._checks import check_positive_int
from ..hvp import hvp_from_grads
from ..probes import PROBE_DISTRIBUTIONS, probe
from ._multi_tensor import restore
from .._sharded import Sharding, is_dtensor, local

__all__ = [
    "CurvatureInputs", "CurvatureSource", "Hutchinson", "GaussNewtonBartlett", "FiniteDifference",
    "GradientCurvature", "ExactDiagonal", "make_curvature", "needs_graph", "CURVATURE_NAMES",
]

CURVATURE_NAMES = ("hutchinson", "gnb", "finite_difference", "exact", "gradient")


@dataclass
class CurvatureInputs:
    """What a curvature step hands to its source.

    ``grads`` carry their graph when the source ``needs_graph``; ``generators`` maps each device to
    the optimizer's seeded probe generator; ``captures`` are the closure's cross-entropy calls
    (``needs_logits``); ``gradients_at(params_values)`` re-evaluates the closure and returns the
    gradients (``needs_closure``; the weights are the caller's business, see
    :class:`FiniteDifference`).
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[Optional[torch.Tensor]]
    generators: Dict[torch.device, torch.Generator]
    captures: List[dict] = field(default_factory=list)
    gradients_again: Optional[Callable[[], List[torch.Tensor]]] = None
    #: set when the parameters are sharded DTensors (FSDP2): ``grads`` and the returned estimates
    #: are then the rank-local chunks, ``params`` the DTensors themselves (see ``_sharded``)
    sharding: Optional[Sharding] = None


class CurvatureSource:
    """Base of the built-in sources (see the module docstring)."""

    needs_graph = False
    needs_logits = False
    needs_closure = False
    #: the estimate goes through the user's (possibly GradScaler-scaled) graph and must be unscaled
    scaled_by_loss_scale = False

    def estimate(self, inputs: CurvatureInputs) -> List[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, params, grads, generators, **inputs: Any) -> List[torch.Tensor]:
        """``source(params, grads, generators)``: :meth:`estimate` on those inputs (for direct use and tests)."""
        return self.estimate(CurvatureInputs(params, grads, generators, **inputs))


def _probes(params, generators, distribution, sharding: Optional[Sharding] = None) -> List[torch.Tensor]:
    """One probe per parameter; for a sharded parameter this rank's chunk of the full-size probe."""
    if sharding is not None:
        return [sharding.probe(p, generators[p.device], distribution) if is_dtensor(p)
                else probe(p.shape, generators[p.device], dtype=p.dtype, device=p.device, distribution=distribution)
                for p in params]
    return [probe(p.shape, generators[p.device], dtype=p.dtype, device=p.device, distribution=distribution)
            for p in params]


class Hutchinson(CurvatureSource):
    r"""Hutchinson estimate of the Hessian diagonal, :math:`\frac1S\sum_s z_s\odot Hz_s`.

    Unbiased for :math:`\operatorname{diag}H` (:math:`E[z_iz_j]=\delta_{ij}`), exact for a diagonal
    Hessian with Rademacher probes. One HVP per sample through :func:`hessopt.hvp_from_grads`.
    """

    needs_graph = True
    scaled_by_loss_scale = True

    def __init__(self, n_samples: int = 1, distribution: str = "rademacher"):
        self.n_samples = check_positive_int("n_samples", n_samples)
        if distribution not in PROBE_DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {PROBE_DISTRIBUTIONS}, got {distribution!r}")
        self.distribution = distribution

    def __repr__(self) -> str:
        return f"Hutchinson(n_samples={self.n_samples}, distribution={self.distribution!r})"

    def estimate(self, inputs: CurvatureInputs) -> List[torch.Tensor]:
        params, grads = inputs.params, inputs.grads
        total: Optional[List[torch.Tensor]] = None
        for s in range(self.n_samples):
            zs = _probes(params, inputs.generators, self.distribution)
            hzs = hvp_from_grads(grads, params, zs, retain_graph=s < self.n_samples - 1)
            terms = torch._foreach_mul(zs, hzs)
            total = list(terms) if total is None else list(torch._foreach_add(total, terms))
        if self.n_samples > 1:
            torch._foreach_div_(total, float(self.n_samples))
        return total


class GaussNewtonBartlett(CurvatureSource):
    r"""Gauss-Newton-Bartlett estimate of the Gauss-Newton diagonal of softmax cross-entropy.

    For logits :math:`f_b(\theta)` of :math:`B` predictions (rows not equal to ``ignore_index``),
    draw :math:`\hat y_b\sim\operatorname{softmax}(f_b)` from the model's own predictive
    distribution, backpropagate the sampled mean loss
    :math:`\hat L=\frac1B\sum_b \mathrm{CE}(f_b,\hat y_b)` once through the closure's kept graph,
    and return :math:`\hat h = c\,B\,\hat g\odot\hat g` with :math:`\hat g=\nabla_\theta\hat L`
    (Liu et al. 2023, Sophia-G). Since :math:`E_{\hat y}[\nabla\mathrm{CE}(f_b,\hat y)]=0` and the
    samples are independent, the cross terms vanish in expectation and

    .. math::  E[\hat h] = c\,\operatorname{diag}\Big(\frac1B\sum_b J_b^\top
               (\operatorname{diag}p_b - p_bp_b^\top) J_b\Big),

    the diagonal of the Gauss-Newton matrix (= the Fisher) of the mean loss; ``c = 1`` for the
    user's ``reduction="mean"`` and ``c = B`` for ``"sum"``, so the estimate matches the user's loss.
    No double backward: works with fused attention, ``torch.compile``\ d models and FSDP.

    The logits are found without user code: during a curvature step's closure, every
    ``F.cross_entropy`` call (``nn.CrossEntropyLoss`` and HuggingFace models use it) is recorded,
    and its ``ignore_index`` honoured; the closure must make exactly one such call. Class weights
    and label smoothing of the user's loss are not part of the Gauss-Newton model sampled here.
    Cost: one extra backward through the kept graph, with the forward graph held until then.
    """

    needs_logits = True

    def __init__(self, n_samples: int = 1):
        self.n_samples = check_positive_int("n_samples", n_samples)

    def __repr__(self) -> str:
        return f"GaussNewtonBartlett(n_samples={self.n_samples})"

    def estimate(self, inputs: CurvatureInputs) -> List[torch.Tensor]:
        if len(inputs.captures) != 1:
            raise ValueError(
                f"curvature='gnb' needs exactly one F.cross_entropy call (or nn.CrossEntropyLoss) in "
                f"the closure on curvature steps, found {len(inputs.captures)}: Gauss-Newton-Bartlett "
                "samples labels from that call's logits. Compute the loss with one cross-entropy call, "
                "or use curvature='hutchinson' or 'finite_difference' for other losses"
            )
        capture = inputs.captures[0]
        logits, valid, scale = _flat_predictions(capture)
        num = int(valid.sum())
        sharding = inputs.sharding
        if sharding is not None:
            # FSDP2 averages the sampled loss's gradient over the ranks: g_hat is the gradient of
            # the global mean sampled loss, so B is the global number of predictions
            total_num = sharding.count(num)
            if scale != 1.0:  # reduction="sum": the user's loss is the global sum
                scale = float(total_num)
            if total_num == 0:
                return [torch.zeros_like(local(p)) for p in inputs.params]
        elif num == 0:
            return [torch.zeros_like(p) for p in inputs.params]
        logits = logits[valid]
        probs = torch.softmax(_at_least_float32(logits.detach()), dim=-1)
        gen = inputs.generators.get(logits.device) or next(iter(inputs.generators.values()))
        total: Optional[List[torch.Tensor]] = None
        for s in range(self.n_samples):
            sampled = torch.multinomial(probs, 1, generator=gen).squeeze(1) if num else logits.new_zeros(0, dtype=torch.long)
            retain = s < self.n_samples - 1
            if sharding is not None:
                terms = self._sharded_terms(inputs.params, logits, sampled, num, total_num, scale, retain, sharding)
            else:
                terms = self.for_labels(inputs.params, logits, sampled, scale, retain_graph=retain)
            total = terms if total is None else list(torch._foreach_add(total, terms))
        if self.n_samples > 1:
            torch._foreach_div_(total, float(self.n_samples))
        return total

    @staticmethod
    def _sharded_terms(params, logits, labels, num, total_num, scale, retain_graph, sharding) -> List[torch.Tensor]:
        r"""FSDP2: :math:`c\,N\,\bar g\odot\bar g` on this rank's chunks, where :math:`\bar g` is
        the rank average (FSDP's reduce-scatter after a plain ``backward()``) of the gradients of the
        ranks' mean sampled losses, i.e. the gradient of the global mean sampled loss when the ranks
        hold equal numbers of predictions, and :math:`N` the global number of predictions: the
        1-process estimator on the union of the ranks' batches (another draw of its labels).
        ``torch.autograd.grad`` cannot reach the shards, hence the plain backward into ``p.grad``
        (the step's own gradients are put back)."""
        if num:
            loss = F.cross_entropy(_at_least_float32(logits), labels, reduction="sum") / num
        else:  # no prediction here, but FSDP's reduce-scatter needs this rank's backward too
            loss = logits.sum() * 0.0
        grads = sharding.backward_grads(loss, params, retain_graph)
        terms = list(torch._foreach_mul(grads, grads))
        torch._foreach_mul_(terms, total_num * scale)
        return terms

    @staticmethod
    def for_labels(params: Sequence[torch.Tensor], logits: torch.Tensor, labels: torch.Tensor, scale: float = 1.0,
                   retain_graph: bool = False) -> List[torch.Tensor]:
        r"""The estimate for given labels: :math:`c\,B\,\hat g\odot\hat g` with :math:`\hat g` the
        gradient of the mean cross-entropy of ``logits`` ``[B, C]`` (graph attached) against
        ``labels`` ``[B]`` (the sampling step left out; its expectation is the oracle's business)."""
        num = logits.shape[0]
        loss = F.cross_entropy(_at_least_float32(logits), labels, reduction="sum") / num
        grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        terms = list(torch._foreach_mul(grads, grads))
        torch._foreach_mul_(terms, num * scale)
        return terms


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is in a half precision (softmax and the sampled loss), else as it is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _flat_predictions(capture: dict):
    """``(logits [N, C], valid mask [N], scale)`` of a captured cross-entropy call."""
    logits, target = capture["logits"], capture["target"]
    if logits.dim() == 1:  # a single prediction
        logits, target = logits.unsqueeze(0), target.reshape(1) if target.dim() == 0 else target.unsqueeze(0)
    elif logits.dim() > 2:  # (N, C, d1, ...): class dimension 1
        target = target.reshape(-1) if not target.is_floating_point() else target.movedim(1, -1).reshape(-1, logits.shape[1])
        logits = logits.movedim(1, -1).reshape(-1, logits.shape[1])
    if target.is_floating_point():  # class probabilities: every row is a prediction
        valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    else:
        valid = target.reshape(-1) != capture["ignore_index"]
    reduction = capture["reduction"]
    if capture["size_average"] is not None or capture["reduce"] is not None:
        reduction = torch.nn._reduction.legacy_get_string(capture["size_average"], capture["reduce"])
    if reduction not in ("mean", "sum"):
        raise ValueError(f"curvature='gnb' needs a cross-entropy loss with reduction 'mean' or 'sum', got {reduction!r}")
    scale = float(valid.sum()) if reduction == "sum" else 1.0
    return logits, valid, scale


class FiniteDifference(CurvatureSource):
    r"""Hutchinson's :math:`z\odot Hz` with the HVP replaced by a difference of gradients.

    * ``scheme="forward"`` (default): :math:`Hz\approx(g(\theta+hz)-g(\theta))/h`, one extra
      gradient (the closure's own :math:`g(\theta)` is reused); truncation error :math:`O(h)`.
    * ``scheme="central"``: :math:`Hz\approx(g(\theta+hz)-g(\theta-hz))/(2h)`, two extra gradients;
      truncation error :math:`O(h^2)`.

    Step: :math:`h = c\,(1+\|\theta\|)/\|z\|` over all parameters of the step, with
    :math:`c=\epsilon_{mach}^{1/2}` (forward) or :math:`\epsilon_{mach}^{1/3}` (central) of the
    parameters' lowest-precision dtype (``step_scale`` overrides ``c``): the usual balance of
    truncation against rounding error, scaled so that each coordinate moves by about ``c`` times
    the parameters' RMS. The closure is re-evaluated at the perturbed weights with the same random
    numbers (dropout masks) as the step's own evaluation; the weights are then restored bit-exactly
    from a saved copy (never by subtracting :math:`hz`), the gradients set back to the step's own,
    and the global RNG left where the step's closure left it. The re-evaluations replay the on/off
    pattern of the ReLU / leaky-ReLU units and max-pooling choices recorded in the step's own evaluation
    (:func:`hessopt._patches.frozen_activations`): a unit whose kink lies between :math:`\theta` and
    :math:`\theta\pm hz` would otherwise add its gradient's jump divided by :math:`h` (measured:
    central differences on a 1024-sample ReLU MLP 3.9e6 times the estimate off without the
    pattern, 1e-10 with it); hardtanh/relu6, abs, clamp and other kinks are not frozen. With ``model=``, the model's buffers
    (BatchNorm running statistics) are restored too; without it, train-mode BatchNorm sees the extra
    forward passes. Only first-order backward passes: works under ``torch.compile``, fused
    attention and reentrant checkpointing. Closure form only.
    """

    needs_closure = True

    def __init__(self, scheme: str = "forward", n_samples: int = 1, step_scale: Optional[float] = None,
                 distribution: str = "rademacher", model: Optional[torch.nn.Module] = None):
        if scheme not in ("forward", "central"):
            raise ValueError(f"scheme must be 'forward' or 'central', got {scheme!r}")
        if step_scale is not None and not (isinstance(step_scale, (int, float)) and step_scale > 0):
            raise ValueError(f"step_scale must be a positive number or None, got {step_scale!r}")
        if distribution not in PROBE_DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {PROBE_DISTRIBUTIONS}, got {distribution!r}")
        self.scheme, self.n_samples, self.step_scale = scheme, check_positive_int("n_samples", n_samples), step_scale
        self.distribution, self.model = distribution, model

    def __repr__(self) -> str:
        return f"FiniteDifference(scheme={self.scheme!r}, n_samples={self.n_samples}, step_scale={self.step_scale})"

    def step_size(self, params: Sequence[torch.Tensor], zs: Sequence[torch.Tensor],
                  sharding: Optional[Sharding] = None, sharded: Optional[Sequence[bool]] = None) -> float:
        """:math:`h` for probes ``zs`` at ``params`` (see the class docstring); with ``sharding``,
        ``params`` and ``zs`` are rank-local chunks and the norms are the global ones."""
        if self.step_scale is not None:
            c = self.step_scale
        else:
            eps = max(torch.finfo(p.dtype).eps for p in params)
            c = math.sqrt(eps) if self.scheme == "forward" else eps ** (1.0 / 3.0)
        if sharding is not None:
            sq = sharding.squared_norms([*params, *zs], [*sharded, *sharded])
        else:
            norms = torch.stack([torch.linalg.vector_norm(t.detach().double()) for t in [*params, *zs]])
            sq = (norms**2).tolist()
        theta = math.sqrt(sum(sq[: len(params)]))
        z = math.sqrt(sum(sq[len(params):]))
        return c * (1.0 + theta) / max(z, 1e-30)

    def estimate(self, inputs: CurvatureInputs) -> List[torch.Tensor]:
        if inputs.gradients_again is None:
            raise ValueError(
                "curvature='finite_difference' evaluates the loss again at perturbed weights, which "
                "needs the closure: call opt.step(closure)"
            )
        sharding = inputs.sharding
        # on sharded parameters the rank-local chunks (views: writing them moves the DTensors)
        params = [local(p) for p in inputs.params]
        sharded = [is_dtensor(p) for p in inputs.params]
        saved = [p.detach().clone() for p in params]
        buffers = [b for b in self.model.buffers()] if self.model is not None else []
        saved_buffers = [b.clone() for b in buffers]
        g0 = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, inputs.grads)]
        total: Optional[List[torch.Tensor]] = None
        try:
            for _ in range(self.n_samples):
                zs = _probes(inputs.params, inputs.generators, self.distribution, sharding)
                h = self.step_size(params, zs, sharding=sharding, sharded=sharded)
                plus = self._gradients_at(params, saved, zs, h, inputs)
                if self.scheme == "forward":
                    diff = torch._foreach_sub(plus, g0)
                    torch._foreach_div_(diff, h)
                else:
                    minus = self._gradients_at(params, saved, zs, -h, inputs)
                    diff = torch._foreach_sub(plus, minus)
                    torch._foreach_div_(diff, 2 * h)
                terms = torch._foreach_mul(zs, diff)
                total = list(terms) if total is None else list(torch._foreach_add(total, terms))
        finally:
            restore(params + buffers, saved + saved_buffers)
        if self.n_samples > 1:
            torch._foreach_div_(total, float(self.n_samples))
        return total

    @staticmethod
    def _gradients_at(params, saved, zs, h, inputs) -> List[torch.Tensor]:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
            torch._foreach_add_(params, zs, alpha=h)
        return inputs.gradients_again()


class GradientCurvature(CurvatureSource):
    """The gradient as the curvature: AdaHessian then is AdamW (for tests and baselines)."""

    scaled_by_loss_scale = True

    def __repr__(self) -> str:
        return "GradientCurvature()"

    def estimate(self, inputs: CurvatureInputs) -> List[torch.Tensor]:
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(inputs.params, inputs.grads)]


class ExactDiagonal(CurvatureSource):
    r"""The exact Hessian diagonal, :math:`H_{ii} = (H e_i)_i`, one HVP per entry (tiny models, tests).

    Costs ``sum(p.numel())`` HVPs per curvature step, so it refuses more than ``max_entries`` entries.
    """

    needs_graph = True
    scaled_by_loss_scale = True

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries

    def __repr__(self) -> str:
        return f"ExactDiagonal(max_entries={self.max_entries})"

    def estimate(self, inputs: CurvatureInputs) -> List[torch.Tensor]:
        params, grads = inputs.params, inputs.grads
        total = sum(p.numel() for p in params)
        if total > self.max_entries:
            raise ValueError(
                f"curvature='exact' needs one HVP per entry ({total} > max_entries={self.max_entries}); "
                "use the Hutchinson estimate (curvature='hutchinson') for models of this size"
            )
        diags = [torch.empty_like(p) for p in params]
        for j, p in enumerate(params):
            for i in range(p.numel()):
                vectors = [torch.zeros_like(q) for q in params]
                vectors[j].view(-1)[i] = 1
                hv = hvp_from_grads(grads, params, vectors, retain_graph=True)
                diags[j].view(-1)[i] = hv[j].reshape(-1)[i]
        return diags


class _CallableSource(CurvatureSource):
    """A user callable ``(params, grads, generators) -> list of tensors`` as a source."""

    scaled_by_loss_scale = True

    def __init__(self, fn: Callable[..., List[torch.Tensor]]):
        self.fn = fn
        self.needs_graph = bool(getattr(fn, "needs_graph", True))

    def __repr__(self) -> str:
        return repr(self.fn)

    def estimate(self, inputs: CurvatureInputs) -> List[torch.Tensor]:
        return self.fn(inputs.params, inputs.grads, inputs.generators)


def needs_graph(source) -> bool:
    """Whether ``source`` needs gradients that carry their graph."""
    return bool(getattr(source, "needs_graph", True))


def make_curvature(curvature: Any = None, n_samples: int = 1, distribution: str = "rademacher",
                   default: str = "hutchinson") -> CurvatureSource:
    """The source for an optimizer's ``curvature=`` argument: ``None`` (``default``), a name in
    :data:`CURVATURE_NAMES`, a :class:`CurvatureSource`, or a callable
    ``(params, grads, generators) -> list of tensors``."""
    if curvature is None:
        curvature = default
    if isinstance(curvature, CurvatureSource):
        return curvature
    if isinstance(curvature, str):
        if curvature == "hutchinson":
            return Hutchinson(n_samples, distribution)
        if curvature == "gnb":
            return GaussNewtonBartlett(n_samples)
        if curvature == "finite_difference":
            return FiniteDifference(n_samples=n_samples, distribution=distribution)
        if curvature == "exact":
            return ExactDiagonal()
        if curvature == "gradient":
            return GradientCurvature()
        raise ValueError(f"curvature must be None, one of {CURVATURE_NAMES}, a CurvatureSource or a callable, "
                         f"got {curvature!r}")
    if not callable(curvature):
        raise TypeError(
            f"curvature must be None, one of {CURVATURE_NAMES}, a CurvatureSource or a callable "
            f"(params, grads, generators) -> list of tensors, not {type(curvature).__name__}"
        )
    return _CallableSource(curvature)
