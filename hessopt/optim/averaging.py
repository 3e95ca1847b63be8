r"""Spatial averaging of the Hessian-diagonal estimate: one rule per tensor shape.

AdaHessian smooths the noisy Hutchinson estimate :math:`|z \odot Hz|` by averaging it over groups
of entries that play the same role (Yao et al. 2021, "spatial averaging"). The rule is decided by
the tensor's shape alone, because an optimizer sees tensors, not modules:

====================  =========================================================================
shape                 rule under ``averaging="auto"``
====================  =========================================================================
0-D, 1-D (biases,     no averaging
norm scales)
2-D (linear weights,  no averaging; with ``block_length=B``, the mean over contiguous blocks of
embeddings)           ``B`` entries along the last dimension (the AdaHessian fairseq recipe uses
                      ``B = 32``); a trailing partial block is averaged over its own entries
>= 3-D (convolution   the mean over kernel positions, i.e. over all dimensions after the first
kernels of Conv1d,    two (``[out, in/groups, *kernel]``), for every kernel dimensionality.
Conv2d, Conv3d)       A 3-D or higher tensor that is not a convolution kernel should be put in a
                      parameter group with ``averaging="none"``.
====================  =========================================================================

``averaging="none"`` turns every rule off (per parameter group).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["AVERAGING_POLICIES", "average_curvature", "describe_rule"]

AVERAGING_POLICIES = ("auto", "none")


def describe_rule(shape: torch.Size, averaging: str, block_length: Optional[int]) -> str:
    """A short description of the rule applied to a tensor of ``shape`` (for logs and docs)."""
    if averaging == "none" or len(shape) <= 1:
        return "none"
    if len(shape) >= 3:
        return f"mean over {len(shape) - 2}-D kernel positions"
    if block_length and block_length > 1:
        return f"mean over blocks of {block_length} along the last dimension"
    return "none"


def _block_mean(d: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = d.shape
    full = (cols // block) * block
    out = torch.empty_like(d)
    if full:
        means = d[:, :full].reshape(rows, cols // block, block).mean(dim=-1, keepdim=True)
        out[:, :full] = means.expand(rows, cols // block, block).reshape(rows, full)
    if full < cols:
        out[:, full:] = d[:, full:].mean(dim=-1, keepdim=True)
    return out


def average_curvature(d: torch.Tensor, averaging: str = "auto", block_length: Optional[int] = None) -> torch.Tensor:
    """Apply the averaging rule for ``d``'s shape (see the module docstring); returns a new tensor or ``d``."""
    if averaging == "none" or d.dim() <= 1:
        return d
    if d.dim() >= 3:
        return d.mean(dim=tuple(range(2, d.dim())), keepdim=True).expand_as(d)
    if block_length and block_length > 1:
        return _block_mean(d, block_length)
    return d
