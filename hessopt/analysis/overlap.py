r"""Overlap of two subspaces (e.g. top Hessian eigenspaces of two models, or of two layers' Hessians).

For orthonormal bases :math:`V_1 \in \mathbb R^{n\times k_1}` and :math:`V_2 \in \mathbb R^{n\times k_2}`
the overlap is

.. math::  \operatorname{overlap}(V_1, V_2) = \frac{\|V_1^\top V_2\|_F^2}{\min(k_1, k_2)}
           = \frac{1}{\min(k_1,k_2)} \sum_i \cos^2\theta_i ,

the mean squared cosine of the principal angles :math:`\theta_i` between the two subspaces
(Gur-Ari, Roberts & Dyer 2018; Wu, Zhu et al., *Dissecting Hessian*, 2020). It is 1 when one
subspace contains the other (the same subspace when :math:`k_1 = k_2`), 0 when they are
orthogonal, does not depend on the choice of bases, and for a uniformly random :math:`k`-dimensional
subspace of :math:`\mathbb R^n` its expectation against a fixed one is :math:`k/n` (the chance level
to compare a measured overlap with).

:func:`layerwise_overlap` compares the layer-wise top-:math:`k` eigenspaces of two models of the
same architecture (different seeds, checkpoints, or with/without a change), the measurement of the
Dissecting Hessian paper.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..results import dataclass_dict
from ._common import as_basis, check_orthonormal

__all__ = ["eigenspace_overlap", "layerwise_overlap", "LayerwiseOverlap"]


def eigenspace_overlap(
    V1: Any,
    V2: Any,
    orthonormalize: bool = False,
    tol: float = 1e-3,
) -> float:
    r"""``||V1^T V2||_F^2 / min(k1, k2)`` for orthonormal bases ``V1`` (n, k1) and ``V2`` (n, k2).

    Args:
        V1, V2: column bases (a tensor ``(n, k)``, a single vector ``(n,)``, or an
            :class:`hessopt.EigenResult`, whose eigenvectors are used).
        orthonormalize: orthonormalize each basis first (QR in float64), e.g. for vectors that are
            only approximately orthogonal; by default non-orthonormal input is an error.
        tol: tolerance of the orthonormality check (max entry of ``|V^T V - I|``).

    Returns:
        A float in [0, 1]: 1 for the same subspace (or nested subspaces), 0 for orthogonal ones.

    Example:
        >>> a = hessopt.top_eigenvalues(op_a, k=10).eigenvectors
        >>> b = hessopt.top_eigenvalues(op_b, k=10).eigenvectors
        >>> eigenspace_overlap(a, b)   # chance level: 10 / op_a.num_params
    """
    V1, V2 = as_basis(V1, "V1"), as_basis(V2, "V2")
    if V1.shape[0] != V2.shape[0]:
        raise ValueError(
            f"the bases live in different spaces: V1 has {V1.shape[0]} rows, V2 has {V2.shape[0]}; "
            "compare eigenvectors of operators over the same parameters"
        )
    V1, V2 = V1.double(), V2.to(device=V1.device, dtype=torch.float64)
    if orthonormalize:
        V1, V2 = torch.linalg.qr(V1)[0], torch.linalg.qr(V2)[0]
    else:
        check_orthonormal(V1, "V1", tol)
        check_orthonormal(V2, "V2", tol)
    k = min(V1.shape[1], V2.shape[1])
    value = float((V1.T @ V2).pow(2).sum()) / k
    return min(max(value, 0.0), 1.0)  # round-off can step a hair outside [0, 1]


@dataclasses.dataclass(frozen=True)
class LayerwiseOverlap:
    """Per-layer overlap of two models' top eigenspaces.

    Attributes:
        names: layer (block) names, in model order.
        overlaps: the overlap of each layer's top-``k`` eigenspaces (``eigenspace_overlap``).
        k: number of eigenvectors compared per layer (capped at the layer's dimension).
        num_params: each layer's dimension.
        chance: the expected overlap of random subspaces, ``k / num_params``, per layer.
    """

    names: Tuple[str, ...]
    overlaps: Tuple[float, ...]
    k: Tuple[int, ...]
    num_params: Tuple[int, ...]
    chance: Tuple[float, ...]

    def to_dict(self) -> Dict[str, Any]:
        return dataclass_dict(self)

    def __getitem__(self, name: str) -> float:
        try:
            return self.overlaps[self.names.index(name)]
        except ValueError:
            raise KeyError(f"no layer named {name!r}; layers are {list(self.names)}") from None


def layerwise_overlap(
    a: Any,
    b: Any,
    loss_fn: Optional[Callable] = None,
    data: Any = None,
    data_b: Any = None,
    blocks: Any = None,
    k: int = 10,
    **layerwise_kwargs: Any,
) -> LayerwiseOverlap:
    r"""Overlap of the layer-wise top-``k`` Hessian eigenspaces of two models (or two tables).

    ``a`` and ``b`` are either two models of the same architecture (their layer-wise Hessians are
    computed here with :func:`hessopt.analysis.layerwise` on ``data``, or on ``data`` and
    ``data_b``), or two :class:`~hessopt.analysis.LayerwiseSpectrum` tables computed with
    ``keep_eigenvectors=True``. To compare two checkpoints, load each into a model first
    (``model.load_state_dict(torch.load(path)["model"])``).

    Note that hidden units of independently trained networks are permuted relative to each other,
    so a high overlap is only expected where a layer's inputs or outputs have a fixed meaning
    (inputs of the first layer, logits of the last), or under a structure such as the Kronecker
    factorization (see :mod:`hessopt.analysis.kronecker`).

    Example:
        >>> res = layerwise_overlap(model_seed0, model_seed1, nn.CrossEntropyLoss(), (x, y), k=10)
        >>> dict(zip(res.names, res.overlaps))
    """
    from .layerwise import LayerwiseSpectrum, layerwise

    if isinstance(a, nn.Module) != isinstance(b, nn.Module):
        raise TypeError("pass two models or two LayerwiseSpectrum tables, not one of each")
    if isinstance(a, nn.Module):
        if loss_fn is None or data is None:
            raise ValueError("comparing two models needs loss_fn and data (the batch(es) the Hessians are taken on)")
        layerwise_kwargs.setdefault("trace_matvecs", 0)
        a = layerwise(a, loss_fn, data, blocks=blocks, k=k, keep_eigenvectors=True, **layerwise_kwargs)
        b = layerwise(b, loss_fn, data if data_b is None else data_b, blocks=blocks, k=k,
                      keep_eigenvectors=True, **layerwise_kwargs)
    if not (isinstance(a, LayerwiseSpectrum) and isinstance(b, LayerwiseSpectrum)):
        raise TypeError(f"expected two models or two LayerwiseSpectrum tables, got {type(a).__name__} and {type(b).__name__}")
    if a.names != b.names:
        raise ValueError(f"the tables have different layers: {list(a.names)} vs {list(b.names)}; use models of the same architecture")
    names, overlaps, ks, sizes, chance = [], [], [], [], []
    for la, lb in zip(a.layers, b.layers):
        if la.eigenvectors is None or lb.eigenvectors is None:
            raise ValueError(f"layer {la.name!r} has no eigenvectors: compute the tables with keep_eigenvectors=True")
        if la.num_params != lb.num_params:
            raise ValueError(f"layer {la.name!r} has {la.num_params} parameters in one model and {lb.num_params} in the other")
        kk = min(k, la.eigenvectors.shape[1], lb.eigenvectors.shape[1])
        names.append(la.name)
        overlaps.append(eigenspace_overlap(la.eigenvectors[:, :kk], lb.eigenvectors[:, :kk], orthonormalize=True))
        ks.append(kk)
        sizes.append(la.num_params)
        chance.append(kk / la.num_params)
    return LayerwiseOverlap(tuple(names), tuple(overlaps), tuple(ks), tuple(sizes), tuple(chance))
