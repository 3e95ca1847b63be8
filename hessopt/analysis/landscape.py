r"""Loss along 1-D lines and 2-D planes through the current parameters.

For directions :math:`d_1` (and :math:`d_2`) in parameter space the landscape is

.. math::  f(\alpha) = L(\theta + \alpha d_1), \qquad f(\alpha, \beta) = L(\theta + \alpha d_1 + \beta d_2)

on a grid of :math:`\alpha, \beta`. Two kinds of directions are common:

* **top Hessian eigenvectors** (unit norm): the sharpest directions, as in PyHessian (Yao et al. 2020);
  near a minimum :math:`f(\alpha) \approx L + \frac12\lambda_1\alpha^2` for small :math:`\alpha`;
* **random filter-normalized directions** (Li, Xu, Taylor, Studer & Goldstein, "Visualizing the
  Loss Landscape of Neural Nets", 2018): a Gaussian direction rescaled, for every filter (each
  output unit/channel: a row of a weight's ``reshape(out, -1)``), to the norm of the corresponding
  filter of the weights, which removes the scale invariance that BatchNorm and ReLU create;
  vector-shaped parameters (biases, norm scales) get direction 0, as in that paper.

Every point is evaluated from the saved original values (``theta + alpha d``, never by adding
steps), and the parameters are copied back bit for bit afterwards, also when the loss raises. The
loss is evaluated like :meth:`hessopt.HessianOperator.loss`: dropout off, BatchNorm with running
statistics (``bn_mode="eval"``) or batch statistics without touching the running ones
(``"train"``), the model's train/eval flags restored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .._checks import check_positive_int
from ..operators import HessianOperator, _select_params, flatten, unflatten
from ..probes import GeneratorLike, make_generator
from ..spectrum import top_eigenvalues
from ..results import dataclass_dict

__all__ = ["Landscape", "loss_landscape", "random_directions"]


@dataclasses.dataclass(frozen=True)
class Landscape:
    """Loss on a 1-D or 2-D grid of coordinates along given directions.

    Attributes:
        alphas: ``(steps,)`` float64 coordinates along the first direction.
        betas: ``(steps,)`` coordinates along the second direction, or ``None`` for a 1-D landscape.
        losses: ``(steps,)`` (1-D) or ``(steps, steps)`` with ``losses[i, j]`` at
            ``(alphas[i], betas[j])``; float64.
        center_loss: the loss at the current parameters.
        kind: ``"top"``, ``"random"`` or ``"given"``.
        direction_norms: the norm of each direction.
        eigenvalues: the directions' eigenvalues when they are top eigenvectors, else ``None``.
    """

    alphas: torch.Tensor
    betas: Optional[torch.Tensor]
    losses: torch.Tensor
    center_loss: float
    kind: str
    direction_norms: Tuple[float, ...]
    eigenvalues: Optional[torch.Tensor] = None

    @property
    def ndim(self) -> int:
        return 1 if self.betas is None else 2

    def to_dict(self) -> Dict[str, Any]:
        return dataclass_dict(self)


def random_directions(
    model: nn.Module,
    num: int = 1,
    params: Any = None,
    filter_normalize: bool = True,
    generator: GeneratorLike = None,
) -> torch.Tensor:
    """Random directions ``(n, num)`` over the model's trainable parameters (or ``params``).

    With ``filter_normalize`` (default, Li et al. 2018) each filter of each matrix-or-higher-shaped
    parameter gets the norm of the same filter of the weights and vector-shaped parameters get 0;
    without it, the directions are unit-norm Gaussian vectors.
    """
    check_positive_int("num", num)
    _, ps = _select_params(model, params)
    gen = make_generator(generator, "cpu")
    cols = []
    for _ in range(num):
        pieces = []
        for p in ps:
            d = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
            if filter_normalize:
                if p.dim() <= 1:
                    d = torch.zeros_like(d)
                else:
                    w = p.detach().reshape(p.shape[0], -1)
                    dd = d.reshape(p.shape[0], -1)
                    scale = w.norm(dim=1, keepdim=True) / dd.norm(dim=1, keepdim=True).clamp_min(1e-30)
                    d = (dd * scale).reshape(p.shape)
            pieces.append(d)
        v = flatten(pieces)
        if not filter_normalize:
            v = v / v.norm()
        cols.append(v)
    return torch.stack(cols, dim=1)


def _as_directions(directions: Any, n: int) -> torch.Tensor:
    if isinstance(directions, (list, tuple)):
        if not all(isinstance(d, torch.Tensor) for d in directions):
            raise TypeError("directions must be tensors")
        directions = torch.stack([d.reshape(-1) for d in directions], dim=1)
    if not isinstance(directions, torch.Tensor):
        raise TypeError(
            f"directions must be 'top', 'random', a flat tensor, an (n, 1|2) tensor or a list of tensors, "
            f"got {type(directions).__name__}"
        )
    if directions.dim() == 1:
        directions = directions[:, None]
    if directions.dim() != 2 or directions.shape[0] != n or directions.shape[1] not in (1, 2):
        raise ValueError(f"directions must have shape ({n},), ({n}, 1) or ({n}, 2), got {tuple(directions.shape)}")
    if not bool(torch.isfinite(directions).all()):
        raise ValueError("directions contain NaN/Inf")
    return directions


def _coords(distance: Union[float, Tuple[float, float]], steps: int) -> torch.Tensor:
    if isinstance(distance, (tuple, list)):
        lo, hi = float(distance[0]), float(distance[1])
    else:
        lo, hi = -float(distance), float(distance)
    if not hi > lo:
        raise ValueError(f"distance must be positive (or a (low, high) pair with low < high), got {distance!r}")
    return torch.linspace(lo, hi, steps, dtype=torch.float64)


def loss_landscape(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: Any,
    directions: Any = "top",
    num_directions: int = 1,
    steps: int = 21,
    distance: Union[float, Tuple[float, float]] = 1.0,
    params: Any = None,
    bn_mode: str = "eval",
    filter_normalize: bool = True,
    generator: GeneratorLike = None,
    progress: bool = False,
) -> Landscape:
    r"""Loss on a line (1 direction) or plane (2 directions) through the current parameters.

    Args:
        model, loss_fn, data, params, bn_mode: as for :class:`hessopt.HessianOperator`
            (``params`` selects the parameters that move; the others stay fixed).
        directions: ``"top"`` (the top ``num_directions`` Hessian eigenvectors, unit norm),
            ``"random"`` (:func:`random_directions`, filter-normalized by default), or given
            directions: a flat tensor, an ``(n, 1)``/``(n, 2)`` tensor, or a list of flat tensors.
        num_directions: 1 or 2, for ``"top"`` and ``"random"``.
        steps: grid points per direction (odd numbers include the center).
        distance: coordinates in ``[-distance, distance]``, or a ``(low, high)`` pair. The units are
            those of the directions: parameter-space norm for eigenvectors, multiples of the
            weights' filter norms for filter-normalized directions (Li et al. plot ``[-1, 1]``).
        filter_normalize, generator: for ``"random"`` (and the Lanczos start of ``"top"``).
        progress: a tqdm bar over grid points.

    Returns:
        :class:`Landscape`. The parameters are restored bit-exactly afterwards.

    Example:
        >>> ls = loss_landscape(model, nn.CrossEntropyLoss(), (x, y), "top", steps=41, distance=0.5)
        >>> plot_landscape(ls, path="landscape.png")
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    if num_directions not in (1, 2):
        raise ValueError(f"num_directions must be 1 or 2, got {num_directions!r}")
    op = HessianOperator(model, loss_fn, data, params=params, bn_mode=bn_mode)
    eigenvalues = None
    if isinstance(directions, str):
        if directions == "top":
            res = top_eigenvalues(op, k=num_directions, tol=1e-3, generator=generator)
            op.clear_cache()  # the cached graph would keep the batch's activations alive
            D, eigenvalues, kind = res.eigenvectors.detach(), res.eigenvalues, "top"
        elif directions == "random":
            D, kind = random_directions(model, num_directions, params=op.params, filter_normalize=filter_normalize,
                                        generator=generator), "random"
        else:
            raise ValueError(f"directions={directions!r}: use 'top', 'random' or a tensor of directions")
    else:
        D, kind = _as_directions(directions, op.num_params), "given"
    D = D.to(device=op.device, dtype=op.dtype)
    alphas = _coords(distance, steps)
    betas = alphas.clone() if D.shape[1] == 2 else None
    grid = [(float(a), None) for a in alphas] if betas is None else [(float(a), float(b)) for a in alphas for b in betas]
    saved = [p.detach().clone() for p in op.params]
    d1 = unflatten(D[:, 0].contiguous(), op.shapes)
    d2 = unflatten(D[:, 1].contiguous(), op.shapes) if D.shape[1] == 2 else None
    from tqdm.auto import tqdm

    values: List[float] = []
    try:
        center = op.loss()
        for a, b in tqdm(grid, desc="loss landscape", disable=not progress, leave=False):
            with torch.no_grad():
                for i, p in enumerate(op.params):
                    new = saved[i] + a * d1[i]
                    if d2 is not None:
                        new = new + b * d2[i]
                    p.copy_(new)
            values.append(op.loss())
    finally:
        with torch.no_grad():
            for p, s in zip(op.params, saved):
                p.copy_(s)
    losses = torch.tensor(values, dtype=torch.float64)
    if betas is not None:
        losses = losses.reshape(steps, steps)
    norms = tuple(float(D[:, i].double().norm()) for i in range(D.shape[1]))
    return Landscape(alphas, betas, losses, center, kind, norms, None if eigenvalues is None else eigenvalues.cpu())
