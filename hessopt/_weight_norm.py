r"""Weight normalization written out (routed to by :func:`hessopt.second_order_safe`).

``torch.nn.utils.parametrizations.weight_norm`` (and the older ``torch.nn.utils.weight_norm``) compute
:math:`w = g \, v / \|v\|` (the norm over every dimension but ``dim``) with the fused
``torch._weight_norm``. On torch 2.14.1 its double backward on CPU is wrong: the Hessian through it
is not symmetric and an HVP is about 7% off a finite difference of gradients at every step size
(measured on a 3-4-1 MLP: max |H - H^T| = 0.21 for max |H| = 2). The same formula written out with
differentiable primitives, :func:`weight_norm`, gives the exact Hessian (tests/test_hvp.py checks it
against finite differences of gradients in float64) and the same forward values and first
derivatives.
"""
from __future__ import annotations

import torch

__all__ = ["ORIGINAL_WEIGHT_NORM", "weight_norm"]

ORIGINAL_WEIGHT_NORM = torch._weight_norm


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r"""``torch._weight_norm(v, g, dim)`` written out: :math:`v \, g / \|v\|_{\text{all dims but dim}}`.

    ``dim=-1`` means the norm over the whole tensor (torch's convention for ``weight_norm(dim=None)``).
    """
    if dim == -1:
        norm = torch.linalg.vector_norm(v)
    else:
        keep = dim % v.dim()
        norm = torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != keep], keepdim=True)
    return v * (g / norm)
