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
* Any callable, e.g. the exact Hessian diagonal of a small model in a test.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..hvp import hvp_from_grads
from ..probes import PROBE_DISTRIBUTIONS, probe

__all__ = ["Hutchinson", "GradientCurvature", "needs_graph"]


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
