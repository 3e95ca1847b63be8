r"""Low-rank structure of Hessian eigenvectors reshaped to their weight's shape.

An eigenvector of a layer's Hessian lives in the space of that layer's weight :math:`W \in
\mathbb R^{m\times d}` (a conv weight ``(out, in, kh, kw)`` is read as ``(out, in*kh*kw)``, the
layout of ``weight.reshape(out, -1)``). Reshaped to that shape, the top eigenvectors of trained
networks are close to rank one (Wu, Zhu et al., *Dissecting Hessian*, 2020): if the layer Hessian
is approximately a Kronecker product :math:`S \otimes A` (see :mod:`hessopt.analysis.kronecker`),
its eigenvectors are :math:`u \otimes v`, which reshape to the rank-one matrix :math:`u v^\top`.

For a matrix :math:`E` with singular values :math:`\sigma_1 \ge \sigma_2 \ge \dots`:

* stable rank :math:`\|E\|_F^2 / \|E\|_2^2 = \sum_i \sigma_i^2 / \sigma_1^2 \in [1, \operatorname{rank} E]`
  (1 exactly for a rank-one matrix);
* rank-one energy fraction :math:`\sigma_1^2 / \sum_i \sigma_i^2` (1 for rank one), the share of
  :math:`\|E\|_F^2` captured by the best rank-one approximation (Eckart-Young).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..results import dataclass_dict
from ._common import as_basis

__all__ = ["LowRankStructure", "low_rank_structure", "eigenvector_structures"]


@dataclasses.dataclass(frozen=True)
class LowRankStructure:
    """Singular-value summary of one matrix (e.g. a reshaped eigenvector).

    Attributes:
        shape: the matrix shape ``(m, d)`` the vector was reshaped to.
        singular_values: float64, descending.
        stable_rank: ``sum(s^2) / s_1^2`` (1 for rank one).
        rank1_energy: ``s_1^2 / sum(s^2)`` (1 for rank one).
        name: what the matrix is (e.g. ``"eigvec 0 / fc1.weight"``), or ``""``.
    """

    shape: Tuple[int, int]
    singular_values: torch.Tensor
    stable_rank: float
    rank1_energy: float
    name: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return dataclass_dict(self)


def _matrix_shape(shape: Sequence[int]) -> Tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(
            f"a weight shape needs at least 2 dimensions to reshape to a matrix, got {shape} "
            "(biases and norm scales are vectors: they have no matrix structure)"
        )
    rest = 1
    for s in shape[1:]:
        rest *= s
    return shape[0], rest


def low_rank_structure(x: torch.Tensor, shape: Optional[Sequence[int]] = None, name: str = "") -> LowRankStructure:
    """Singular values, stable rank and rank-one energy of ``x`` reshaped to ``shape``.

    Args:
        x: a matrix, a weight-shaped tensor, or a flat vector (then ``shape`` is required).
        shape: the weight shape to reshape ``x`` to; ``(out, in, kh, kw)`` is read as
            ``(out, in*kh*kw)``. Default: ``x``'s own shape.
        name: a label kept in the result.

    Example:
        >>> r = hessopt.top_eigenvalues(HessianOperator(model, loss, data, params=[fc.weight]), k=1)
        >>> low_rank_structure(r.eigenvectors[:, 0], fc.weight.shape).stable_rank   # ~1 when trained
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    target = _matrix_shape(x.shape if shape is None else shape)
    if x.numel() != target[0] * target[1]:
        raise ValueError(f"x has {x.numel()} entries, which do not fit the shape {tuple(shape)}")
    E = x.detach().reshape(target).double()
    s = torch.linalg.svdvals(E)
    total = float((s**2).sum())
    if not total > 0:
        raise ValueError("x is zero: its rank structure is undefined")
    top = float(s[0] ** 2)
    return LowRankStructure(target, s.cpu(), total / top, top / total, name)


def eigenvector_structures(
    eigenvectors: Any,
    shapes: Sequence[Sequence[int]],
    names: Optional[Sequence[str]] = None,
) -> List[LowRankStructure]:
    """:func:`low_rank_structure` of each eigenvector's piece in each matrix-shaped parameter.

    Args:
        eigenvectors: ``(n, k)`` flat eigenvectors over several parameters (or an
            :class:`hessopt.EigenResult`), laid out like ``op.params`` of a
            :class:`hessopt.HessianOperator`.
        shapes: the parameters' shapes (``op.shapes``); vector-shaped ones (biases) are skipped.
        names: the parameters' names (``op.param_names``), for labels.

    Returns:
        One :class:`LowRankStructure` per (eigenvector, matrix-shaped parameter), eigenvector-major,
        named ``"eigvec {i} / {param}"``.
    """
    V = as_basis(eigenvectors, "eigenvectors")
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if sum(sizes) != V.shape[0]:
        raise ValueError(f"the shapes hold {sum(sizes)} entries but the eigenvectors have {V.shape[0]}")
    names = [f"param{i}" for i in range(len(sizes))] if names is None else list(names)
    out = []
    for i in range(V.shape[1]):
        for piece, shape, pname in zip(V[:, i].split(sizes), shapes, names):
            if len(shape) >= 2:
                out.append(low_rank_structure(piece, shape, name=f"eigvec {i} / {pname}"))
    return out
