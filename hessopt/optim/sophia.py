r"""Sophia: a clipped, diagonally preconditioned step with curvature every k steps (Liu et al. 2023).

A sibling of :class:`hessopt.AdaHessian`: the same machinery (:mod:`hessopt.optim._base`:
curvature schedule, sources, the three driving forms, AMP, DDP, all-or-nothing steps, bit-exact
resume), its own kernel. In torch.optim's shape: the class gathers tensor lists, one functional
:func:`sophia` picks the kernel, :func:`_single_tensor_sophia` and :func:`_multi_tensor_sophia` each
hold the whole update.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional, Tuple

import torch

from .._checks import check_betas, check_number
from ._base import CurvatureOptimizer, KernelResult
from ._multi_tensor import (by_device_and_dtype, commit_in_place, curvature_flags, parameter_delta,
                            parameter_deltas)

__all__ = ["Sophia", "sophia", "SOPHIA_PRESETS"]

#: The paper's recipes (Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order
#: Optimizer for Language Model Pre-training", ICLR 2024; the authors' GPT-2 scripts): Sophia-G with
#: Gauss-Newton-Bartlett curvature, Sophia-H with Hutchinson, both every 10 steps, with gradient
#: clipping 1.0 and a warm-up + cosine schedule in the training loop.
SOPHIA_PRESETS = {
    "sophia-g": dict(curvature="gnb", betas=(0.965, 0.99), rho=0.05, weight_decay=0.2, update_each=10, eps=1e-12),
    "sophia-h": dict(curvature="hutchinson", betas=(0.965, 0.99), rho=0.05, weight_decay=0.2, update_each=10, eps=1e-12),
}


def sophia(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    hessians: List[torch.Tensor],
    curvatures: Optional[List[Optional[torch.Tensor]]],
    steps: List[int],
    curvature_updates: List[int],
    *,
    foreach: Optional[bool] = None,
    lr: float,
    beta1: float,
    beta2: float,
    rho: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    commit: bool = True,
) -> KernelResult:
    """Functional Sophia: one step for lists of tensors (see :class:`Sophia`); arguments as in
    :func:`hessopt.optim.adahessian.adahessian` (``hessians`` is the moment ``h``)."""
    if foreach is None:
        foreach = all(p.is_cuda for p in params)
    kernel = _multi_tensor_sophia if foreach else _single_tensor_sophia
    result = kernel(params, grads, exp_avgs, hessians, curvatures, steps, curvature_updates, lr=lr, beta1=beta1,
                    beta2=beta2, rho=rho, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction)
    if commit:
        commit_in_place(params, (exp_avgs, hessians), result)
    return result


def _prepare(curvatures, curvature_updates, steps, beta1, beta2, bias_correction, n):
    ds = list(curvatures) if curvatures is not None else [None] * n
    finite, _ = curvature_flags(ds)
    took = [d is not None and f for d, f in zip(ds, finite)]
    counts = [h + int(t) for h, t in zip(curvature_updates, took)]
    if bias_correction:
        bc1 = [1 - beta1 ** (t + 1) for t in steps]
        bc2 = [1 - beta2**h if h else 1.0 for h in counts]
    else:
        bc1, bc2 = [1.0] * n, [1.0] * n
    nonfinite = [d is not None and not f for d, f in zip(ds, finite)]
    return ds, took, counts, bc1, bc2, nonfinite


def _single_tensor_sophia(params, grads, exp_avgs, hessians, curvatures, steps, curvature_updates, *, lr, beta1,
                          beta2, rho, eps, weight_decay, bias_correction) -> KernelResult:
    """The reference kernel, tensor by tensor (all out of place: nothing is written)."""
    n = len(params)
    ds, took, counts, bc1, bc2, nonfinite = _prepare(curvatures, curvature_updates, steps, beta1, beta2,
                                                      bias_correction, n)
    new_m, new_h, deltas = list(exp_avgs), list(hessians), [None] * n
    for i, p in enumerate(params):
        if took[i]:
            new_h[i] = hessians[i].mul(beta2).add_(ds[i], alpha=1 - beta2)
        if counts[i] == 0:
            continue  # no curvature yet
        new_m[i] = exp_avgs[i].mul(beta1).add_(grads[i], alpha=1 - beta1)
        denom = new_h[i].mul(rho / bc2[i]).clamp_(min=eps)
        update = torch.div(new_m[i], denom).div_(bc1[i])
        deltas[i] = parameter_delta(update, p, clip=1.0, lr=lr, weight_decay=weight_decay)
    return KernelResult(deltas, [new_m, new_h], took, nonfinite, [False] * n)


def _multi_tensor_sophia(params, grads, exp_avgs, hessians, curvatures, steps, curvature_updates, *, lr, beta1,
                         beta2, rho, eps, weight_decay, bias_correction) -> KernelResult:
    """The same update with ``torch._foreach_*`` kernels."""
    n = len(params)
    ds, took, counts, bc1, bc2, nonfinite = _prepare(curvatures, curvature_updates, steps, beta1, beta2,
                                                      bias_correction, n)
    new_m, new_h, deltas = list(exp_avgs), list(hessians), [None] * n
    for idx in by_device_and_dtype(params).values():
        fresh = [i for i in idx if took[i]]
        if fresh:
            h = torch._foreach_mul([hessians[i] for i in fresh], beta2)
            torch._foreach_add_(h, [ds[i] for i in fresh], alpha=1 - beta2)
            for j, i in enumerate(fresh):
                new_h[i] = h[j]
        live = [i for i in idx if counts[i] > 0]
        if not live:
            continue
        m = torch._foreach_mul([exp_avgs[i] for i in live], beta1)
        torch._foreach_add_(m, [grads[i] for i in live], alpha=1 - beta1)
        denom = torch._foreach_mul([new_h[i] for i in live], [rho / bc2[i] for i in live])
        torch._foreach_clamp_min_(denom, eps)
        update = torch._foreach_div(m, denom)
        torch._foreach_div_(update, [bc1[i] for i in live])
        update = parameter_deltas(list(update), [params[i] for i in live], clip=1.0, lr=lr, weight_decay=weight_decay)
        for j, i in enumerate(live):
            new_m[i], deltas[i] = m[j], update[j]
    return KernelResult(deltas, [new_m, new_h], took, nonfinite, [False] * n)


class Sophia(CurvatureOptimizer):
    r"""Sophia (Liu, Li, Hall, Liang & Ma, ICLR 2024): clipped diagonal second-order steps.

    .. code-block:: text

        input: lr, (b1, b2), rho, eps, weight decay wd, update_each k
        for t = 1, 2, ...:
            m      <- b1 m + (1 - b1) g
            if a curvature step (t = 1, every k-th step):
                h  <- b2 h + (1 - b2) h_hat ;  n <- n + 1   # h_hat from the curvature source
            m', h' <- m / (1 - b1^t), h / (1 - b2^n)        # bias correction (bias_correction=False: m, h)
            theta  <- theta - lr clip(m' / max(rho h', eps), 1) - lr wd theta

    ``clip(x, 1)`` bounds every coordinate of the step by ``lr``; in flat or negatively curved
    directions (``rho h' <= eps``) the step is ``lr * sign(m)``. Where the clip does not bind, the
    step is a Newton step ``m' / (rho h')`` scaled by ``lr``: on a separable quadratic with exact
    curvature, ``lr = rho`` and ``betas = (0, 0)`` the first step lands on the minimum.

    Curvature sources (``curvature=``): ``"gnb"`` (Sophia-G, Gauss-Newton-Bartlett: labels sampled
    from the model's own softmax, found from the closure's cross-entropy call; one extra backward, no
    double backward: fused attention, ``torch.compile``), ``"hutchinson"`` (Sophia-H, one HVP by
    double backward), ``"finite_difference"`` (one extra gradient) or any source of
    :mod:`hessopt.optim.curvature`. Presets: :data:`SOPHIA_PRESETS` (``Sophia.from_preset``).

    Where this implementation differs from the authors' code, and why:

    * bias correction of ``m`` and ``h`` (``bias_correction=True``): the official code has none, so
      its first steps divide by ``h`` at 1% of its value and are sign steps of size ``lr``; pass
      ``bias_correction=False`` for the paper's rule.
    * labels are sampled inside the optimizer (the official code leaves it to the training loop);
      the estimate is ``B * g_hat^2`` with ``B`` the number of (non-ignored) predictions, so ``rho``
      needs no batch-size factor.
    * a parameter is never updated before its first curvature estimate.

    The other k-1 steps cost an AdamW step (``needs_curvature`` is False on them, and the closure
    runs plainly). Non-finite batches, all-or-nothing steps, DDP and state: as
    :class:`hessopt.AdaHessian` (:mod:`hessopt.optim._base`).

    Args:
        params: parameters or parameter groups (groups may override lr, betas, rho, eps, weight_decay).
        lr: learning rate (2e-4; the largest step of one coordinate).
        betas: ``(b1, b2)`` ((0.965, 0.99), the paper's).
        rho: the scale ``rho`` of the curvature (0.04; the paper tunes 0.01-0.05).
        eps: floor of the denominator (1e-12, the paper's).
        weight_decay: decoupled weight decay (0.1).
        update_each: curvature every ``k`` steps (10, the paper's).
        n_samples: sampled labels (``"gnb"``) or probes per curvature step (1).
        seed, distribution, nonfinite, foreach, distributed: as :class:`hessopt.AdaHessian`.
        curvature: ``"gnb"`` (default, Sophia-G), ``"hutchinson"`` (Sophia-H), or any source.
        bias_correction: see above (True).

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = hessopt.Sophia(model.parameters(), lr=1e-3, curvature="gnb")
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # curvature step: labels sampled from softmax(model(x))
    """

    _global_key = "sophia"
    _moment_names = ("exp_avg", "hessian")
    _default_curvature = "gnb"

    def __init__(
        self,
        params: Iterable,
        lr: Any = 2e-4,
        betas: Tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        eps: float = 1e-12,
        weight_decay: float = 0.1,
        update_each: int = 10,
        n_samples: int = 1,
        seed: int = 0,
        curvature: Any = None,
        bias_correction: bool = True,
        distribution: str = "rademacher",
        nonfinite: str = "skip",
        foreach: Optional[bool] = None,
        distributed: Any = None,
    ):
        if not isinstance(bias_correction, bool):
            raise TypeError(f"bias_correction must be a bool, got {type(bias_correction).__name__}")
        self.bias_correction = bias_correction
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, rho=rho,
                        eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, update_each=update_each, n_samples=n_samples, seed=seed,
                         distribution=distribution, curvature=curvature, foreach=foreach,
                         distributed=distributed, nonfinite=nonfinite)

    @classmethod
    def from_preset(cls, params: Iterable, preset: str, **overrides: Any) -> "Sophia":
        """``Sophia`` with one of :data:`SOPHIA_PRESETS` (``"sophia-g"``, ``"sophia-h"``), overridable."""
        if preset not in SOPHIA_PRESETS:
            raise ValueError(f"preset must be one of {sorted(SOPHIA_PRESETS)}, got {preset!r}")
        return cls(params, **{**SOPHIA_PRESETS[preset], **overrides})

    def _check_group(self, group) -> None:
        check_number("lr", group["lr"], allow_tensor=True)
        check_betas(group["betas"])
        check_number("rho", group["rho"])
        if not group["rho"] > 0:
            raise ValueError(f"rho must be positive, got {group['rho']!r}")
        check_number("eps", group["eps"])
        if not group["eps"] > 0:  # m = h = 0 would give 0/0
            raise ValueError(f"eps must be positive, got {group['eps']!r}")
        check_number("weight_decay", group["weight_decay"])

    def _compute(self, group, params, grads, moments, curvature, steps, curvature_updates) -> KernelResult:
        exp_avgs, hessians = moments
        return sophia(params, grads, exp_avgs, hessians, curvature, steps, curvature_updates,
                      foreach=self._multi_tensor(params), lr=float(group["lr"]), beta1=group["betas"][0],
                      beta2=group["betas"][1], rho=group["rho"], eps=group["eps"],
                      weight_decay=group["weight_decay"], bias_correction=self.bias_correction, commit=False)
