r"""Curvature sources for :class:`hessopt.AdaHessian`: what plays the role of the Hessian diagonal.

A curvature source is a callable

    ``source(params, grads, generators) -> list of tensors shaped like params``

returning a per-entry curvature estimate *before* the optimizer takes absolute values and applies
spatial averaging. ``grads`` are the gradients (carrying their graph when the source's
``needs_graph`` attribute is true, the default for callables without it), and ``generators`` maps
each device to the optimizer's seeded :class:`torch.Generator` for that device.

* :class:`Hutchinson` (the default): :math:`\frac1S\sum_s z_s \odot H z_s` with Rademacher (or
  Gaussian) probes; an unbiased estimate of :math:`\operatorname{diag} H`, exact for a diagonal
  Hessian with Rademacher probes. Costs one HVP per sample through the core's
  :func:`hessopt.hvp_from_grads`.
* :class:`GradientCurvature`: the gradient itself. With it AdaHessian's second moment becomes
  :math:`E[g^2]` and the optimizer is exactly AdamW (a reference test); it needs no graph.
* :class:`ExactDiagonal`: :math:`\operatorname{diag} H` exactly, one HVP per parameter entry
  (:math:`H_{ii} = e_i^\top H e_i`); for tiny models and tests.
* Any callable with that signature.

:func:`make_curvature` turns the optimizer's ``curvature=`` argument into a source.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..hvp import hvp_from_grads
from ..probes import PROBE_DISTRIBUTIONS, probe

__all__ = ["Hutchinson", "GradientCurvature", "ExactDiagonal", "make_curvature", "needs_graph"]

CURVATURE_NAMES = ("hutchinson", "exact", "gradient")


def needs_graph(source) -> bool:
    """Whether ``source`` needs gradients that carry their graph (default True)."""
    return bool(getattr(source, "needs_graph", True))


class Hutchinson:
    """Hutchinson estimate of the Hessian diagonal, ``mean_s z_s * (H z_s)`` (see module docstring)."""

    needs_graph = True

    def __init__(self, n_samples: int = 1, distribution: str = "rademacher"):
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        if distribution not in PROBE_DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {PROBE_DISTRIBUTIONS}, got {distribution!r}")
        self.n_samples = n_samples
        self.distribution = distribution

    def __repr__(self) -> str:
        return f"Hutchinson(n_samples={self.n_samples}, distribution={self.distribution!r})"

    def __call__(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[Optional[torch.Tensor]],
        generators: Dict[torch.device, torch.Generator],
    ) -> List[torch.Tensor]:
        total: Optional[List[torch.Tensor]] = None
        for s in range(self.n_samples):
            zs = [
                probe(p.shape, generators[p.device], dtype=p.dtype, device=p.device, distribution=self.distribution)
                for p in params
            ]
            last = s == self.n_samples - 1
            hzs = hvp_from_grads(grads, params, zs, retain_graph=not last)
            terms = torch._foreach_mul(zs, hzs)
            if total is None:
                total = list(terms)
            else:
                torch._foreach_add_(total, terms)
        if self.n_samples > 1:
            torch._foreach_div_(total, float(self.n_samples))
        return total


class GradientCurvature:
    """Use the gradient as the curvature: AdaHessian then reduces to AdamW (for tests and baselines)."""

    needs_graph = False

    def __repr__(self) -> str:
        return "GradientCurvature()"

    def __call__(self, params, grads, generators) -> List[torch.Tensor]:
        return [g.detach() for g in grads]


class ExactDiagonal:
    r"""The exact Hessian diagonal, :math:`H_{ii} = (H e_i)_i`, one HVP per entry (tiny models, tests).

    Costs ``sum(p.numel())`` HVPs per Hessian step, so it refuses more than ``max_entries`` entries.
    """

    needs_graph = True

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries

    def __repr__(self) -> str:
        return f"ExactDiagonal(max_entries={self.max_entries})"

    def __call__(self, params, grads, generators) -> List[torch.Tensor]:
        total = sum(p.numel() for p in params)
        if total > self.max_entries:
            raise ValueError(
                f"curvature='exact' needs one HVP per entry ({total} > max_entries={self.max_entries}); "
                "use the Hutchinson estimate (curvature=None) for models of this size"
            )
        diags = [torch.empty_like(p) for p in params]
        for j, p in enumerate(params):
            for i in range(p.numel()):
                vectors = [torch.zeros_like(q) for q in params]
                vectors[j].view(-1)[i] = 1
                hv = hvp_from_grads(grads, params, vectors, retain_graph=True)
                diags[j].view(-1)[i] = hv[j].reshape(-1)[i]
        return diags


def make_curvature(curvature, n_samples: int = 1, distribution: str = "rademacher"):
    """The curvature source for the optimizer's ``curvature=`` argument: ``None`` or a name in
    :data:`CURVATURE_NAMES`, or a callable ``(params, grads, generators) -> list of tensors``."""
    if curvature is None or curvature == "hutchinson":
        return Hutchinson(n_samples, distribution)
    if isinstance(curvature, str):
        if curvature == "exact":
            return ExactDiagonal()
        if curvature == "gradient":
            return GradientCurvature()
        raise ValueError(f"curvature must be None, one of {CURVATURE_NAMES} or a callable, got {curvature!r}")
    if not callable(curvature):
        raise TypeError(
            f"curvature must be None, one of {CURVATURE_NAMES} or a callable "
            f"(params, grads, generators) -> list of tensors, not {type(curvature).__name__}"
        )
    return curvature
