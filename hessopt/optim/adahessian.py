r"""AdaHessian: Adam with the squared gradient replaced by a Hessian-diagonal estimate.

In torch.optim's shape: the class :class:`AdaHessian` gathers the tensor lists (its machinery is
shared with :class:`hessopt.Sophia` in :mod:`hessopt.optim._base`); one functional
:func:`adahessian` picks the kernel once; :func:`_single_tensor_adahessian` and
:func:`_multi_tensor_adahessian` each hold the whole update (finiteness of the estimate,
``|D|``, spatial averaging, ``v``, ``m``, decay, ``theta``).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, List, Optional, Tuple

import torch

from .._checks import check_betas, check_number
from ._base import CurvatureOptimizer, KernelResult, NonFiniteError, SecondOrderGraphError
from ._multi_tensor import (by_device_and_dtype, commit_in_place, curvature_flags, overflow_limit, parameter_delta,
                            parameter_deltas)
from .averaging import AVERAGING_POLICIES, average_curvature

__all__ = ["AdaHessian", "adahessian", "SecondOrderGraphError", "NonFiniteError"]


def adahessian(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_hessian_diag_sqs: List[torch.Tensor],
    curvatures: Optional[List[Optional[torch.Tensor]]],
    steps: List[int],
    curvature_updates: List[int],
    *,
    foreach: Optional[bool] = None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
    clip: Optional[float],
    averaging: str = "auto",
    block_length: Optional[int] = None,
    commit: bool = True,
) -> KernelResult:
    r"""Functional AdaHessian: one step for lists of tensors (see :class:`AdaHessian` for the rule).

    ``curvatures`` holds this step's raw estimates (``None`` on steps without one, or ``None``
    entries for parameters without one); ``steps`` and ``curvature_updates`` are the counts
    *before* this step (bias corrections of ``m`` and ``v``). Picks the kernel once (``foreach``:
    multi-tensor; default: when every tensor is on CUDA). With ``commit=True`` the parameters and
    moments are updated in place, all or nothing; with ``commit=False`` nothing is written and the
    returned :class:`~hessopt.optim._base.KernelResult` holds the step (what the class uses, to
    commit every group at once).
    """
    if foreach is None:
        foreach = all(p.is_cuda for p in params)
    kernel = _multi_tensor_adahessian if foreach else _single_tensor_adahessian
    result = kernel(params, grads, exp_avgs, exp_hessian_diag_sqs, curvatures, steps, curvature_updates,
                    lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    hessian_power=hessian_power, clip=clip, averaging=averaging, block_length=block_length)
    if commit:
        commit_in_place(params, (exp_avgs, exp_hessian_diag_sqs), result)
    return result


def _prepare(curvatures, curvature_updates, steps, beta1, beta2, n):
    """What both kernels need first: the estimates per parameter (``None`` where absent), which are
    taken (present and finite), which overflow, the curvature-update counts after this step, the
    bias corrections ``1 - b1^t`` and ``sqrt(1 - b2^h)``, and which estimates were not finite."""
    ds = list(curvatures) if curvatures is not None else [None] * n
    finite, over = curvature_flags(ds)
    took = [d is not None and f for d, f in zip(ds, finite)]
    counts = [h + int(t) for h, t in zip(curvature_updates, took)]
    bc1 = [1 - beta1 ** (t + 1) for t in steps]
    bc2 = [math.sqrt(1 - beta2**h) if h else 1.0 for h in counts]
    nonfinite = [d is not None and not f for d, f in zip(ds, finite)]
    return ds, took, [t and o for t, o in zip(took, over)], counts, bc1, bc2, nonfinite


def _single_tensor_adahessian(params, grads, exp_avgs, vs, curvatures, steps, curvature_updates, *, lr, beta1,
                              beta2, eps, weight_decay, hessian_power, clip, averaging, block_length) -> KernelResult:
    """The reference kernel, tensor by tensor (all out of place: nothing is written)."""
    n = len(params)
    ds, took, over, counts, bc1, bc2, nonfinite = _prepare(curvatures, curvature_updates, steps, beta1, beta2, n)
    new_m, new_v, deltas = list(exp_avgs), list(vs), [None] * n
    for i, p in enumerate(params):
        if took[i]:
            D = average_curvature(ds[i].abs(), averaging, block_length)
            if over[i]:
                D = D.clamp(max=overflow_limit(p.dtype))
            new_v[i] = vs[i].mul(beta2).addcmul_(D, D, value=1 - beta2)
        if counts[i] == 0:
            continue  # no curvature yet: never divide by eps alone; updated from the first estimate on
        new_m[i] = exp_avgs[i].mul(beta1).add_(grads[i], alpha=1 - beta1)
        denom = new_v[i].sqrt().div_(bc2[i])
        if hessian_power != 1:
            denom.pow_(hessian_power)
        update = torch.div(new_m[i], denom.add_(eps)).div_(bc1[i])
        deltas[i] = parameter_delta(update, p, clip=clip, lr=lr, weight_decay=weight_decay)
    return KernelResult(deltas, [new_m, new_v], took, nonfinite, over)


def _multi_tensor_adahessian(params, grads, exp_avgs, vs, curvatures, steps, curvature_updates, *, lr, beta1,
                             beta2, eps, weight_decay, hessian_power, clip, averaging, block_length) -> KernelResult:
    """The same update with ``torch._foreach_*`` kernels, one call per (device, dtype) for each operation."""
    n = len(params)
    ds, took, over, counts, bc1, bc2, nonfinite = _prepare(curvatures, curvature_updates, steps, beta1, beta2, n)
    new_m, new_v, deltas = list(exp_avgs), list(vs), [None] * n
    for idx in by_device_and_dtype(params).values():
        fresh = [i for i in idx if took[i]]
        if fresh:
            Ds = list(torch._foreach_abs([ds[i] for i in fresh]))
            for j, i in enumerate(fresh):
                averaged = average_curvature(Ds[j], averaging, block_length)
                if over[i]:
                    averaged = averaged.clamp(max=overflow_limit(params[i].dtype))
                # averaging returns a broadcast view; the multi-tensor kernels need dense tensors
                Ds[j] = averaged.contiguous() if averaged is not Ds[j] else averaged
            v = torch._foreach_mul([vs[i] for i in fresh], beta2)
            torch._foreach_addcmul_(v, Ds, Ds, value=1 - beta2)
            for j, i in enumerate(fresh):
                new_v[i] = v[j]
        live = [i for i in idx if counts[i] > 0]
        if not live:
            continue
        m = torch._foreach_mul([exp_avgs[i] for i in live], beta1)
        torch._foreach_add_(m, [grads[i] for i in live], alpha=1 - beta1)
        denom = torch._foreach_sqrt([new_v[i] for i in live])
        torch._foreach_div_(denom, [bc2[i] for i in live])
        if hessian_power != 1:
            torch._foreach_pow_(denom, hessian_power)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(m, denom)
        torch._foreach_div_(update, [bc1[i] for i in live])
        update = parameter_deltas(list(update), [params[i] for i in live], clip=clip, lr=lr, weight_decay=weight_decay)
        for j, i in enumerate(live):
            new_m[i], deltas[i] = m[j], update[j]
    return KernelResult(deltas, [new_m, new_v], took, nonfinite, over)


class AdaHessian(CurvatureOptimizer):
    r"""AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, AAAI 2021), a drop-in torch optimizer.

    Adam's second moment of the gradient is replaced by the second moment of a Hutchinson estimate
    of the Hessian diagonal, so the step is preconditioned by curvature rather than by gradient
    magnitude.

    .. code-block:: text

        input: lr, (b1, b2), eps, weight decay wd, Hessian power k, clip c, update_each K, n_samples S
        for t = 1, 2, ...:
            g      <- gradient of the loss (unscaled if a GradScaler scaled it)
            m      <- b1 m + (1 - b1) g
            if a curvature step (t = 1, every K-th step, see below):
                D  <- (1/S) sum_s z_s * (H z_s)             # Hutchinson, z_s Rademacher, one HVP each
                D  <- average(|D|)                          # spatial averaging, per tensor shape
                v  <- b2 v + (1 - b2) D^2 ;  h <- h + 1     # h counts curvature updates
            u      <- m / (1 - b1^t) / ((sqrt(v / (1 - b2^h)))^k + eps)
            u      <- clamp(u, -c, c)                       # bounded step (c = None: the paper's rule)
            theta  <- theta - lr u - lr wd theta             # decoupled weight decay

    Defaults come from the paper's image-classification recipe: ``lr=0.15, betas=(0.9, 0.999),
    eps=1e-4, hessian_power=1``; ``clip=1.0`` is this implementation's safety bound (below).
    Reproducing the paper's recipes (Yao et al. 2021 and the authors' published scripts):

    * CIFAR-10 ResNets: ``AdaHessian(params, lr=0.15, betas=(0.9, 0.999), eps=1e-4,
      weight_decay=5e-4 / 0.15)`` (conv kernels are averaged over their spatial positions by
      default), batch 256, 160 epochs, lr x0.1 at epochs 80 and 120. The paper applies weight decay
      as ``theta -= lr * (update + (5e-4 / lr0) * theta)`` with ``lr0 = 0.15``, which is exactly
      the decoupled ``theta *= 1 - lr * wd`` with ``wd = 5e-4 / 0.15 = 3.33e-3`` (scheduled ``lr``).
    * fairseq Transformer (IWSLT14 de-en / WMT14): ``AdaHessian(params, lr=0.047, betas=(0.9, 0.98),
      eps=1e-4, weight_decay=1e-4, block_length=32)``, inverse-sqrt schedule with 8k warm-up
      updates (warm-up start lr 3.13e-6), no gradient clipping; its ``theta -= lr * 1e-4 * theta``
      is ``weight_decay=1e-4``.

    Where implementations differ, and what this one does:

    * estimate: ``|z * Hz|`` (the paper); some implementations use the signed value.
    * eps: added after the power, ``(sqrt(v_hat))^k + eps`` (the paper, timm); defaults elsewhere
      range from 1e-16 to 1e-2.
    * **bounded step** (``clip=1.0``): every coordinate of the preconditioned update ``u`` is
      clipped to ``[-clip, clip]`` before it is scaled by ``lr``, as Sophia does (Liu et al. 2023).
      Without it, a parameter whose curvature is exactly zero while the rest of the model has some
      (an L1 regression; a BatchNorm bias under a sum loss) steps by ``lr * m / eps``: an L1
      regression jumps from loss 1.7 to hundreds in one step, in every public AdaHessian.
      ``clip=None`` is the paper's unbounded rule.
    * bias correction of ``v``: counts curvature updates ``h``. With ``update_each > 1``, counting
      optimizer steps (as some peers do) under-corrects ``v``; with ``update_each=1`` the two agree.
    * Hessian power: 1 by default (the paper's choice); some default to 0.5.
    * spatial averaging: one rule per tensor shape (:mod:`hessopt.optim.averaging`), conv kernels of
      every dimensionality. The authors' fairseq code averages a 2-D tensor over blocks of the
      *flattened* tensor (which needs ``numel`` divisible by ``B``); here blocks run along the last
      dimension, which is the same wherever that dimension is divisible by ``B``, and a trailing
      partial block is averaged on its own.
    * probes: Rademacher from the optimizer's own seeded generator (saved in ``state_dict()``);
      PyTorch-optimizer's sampler ``randint_like(p, 0, 1) * 2 - 1`` is always -1 (row sums).
    * first step: a parameter is never updated before its first curvature estimate, so the step
      never divides by ``eps`` alone.

    Curvature steps, non-finite batches and all-or-nothing steps: see :mod:`hessopt.optim._base`
    (the first step, every ``update_each``-th, and while a parameter that had a gradient recently
    has no estimate yet; a NaN/Inf loss or gradient changes nothing and is skipped and counted, or
    raises :class:`NonFiniteError` with ``nonfinite="raise"``).

    Driving it (all three are equivalent and tested to give the same trajectory):

    1. The standard torch closure, unchanged::

           def closure():
               opt.zero_grad()
               loss = loss_fn(model(x), y)
               loss.backward()
               return loss
           opt.step(closure)

       On curvature steps the optimizer runs the closure as its source needs: with every
       ``backward()`` building the gradient's graph under :func:`hessopt.second_order_safe`
       (``"hutchinson"``; fused attention works), with the cross-entropy logits captured
       (``"gnb"``), or again at perturbed weights (``"finite_difference"``).
    2. Explicit (double-backward sources): ``loss.backward(create_graph=opt.needs_hessian); opt.step()``.
       ``is_second_order`` makes timm's training loop pass ``create_graph=True``. Models
       with attention: run the forward pass inside ``with hessopt.second_order_safe():``.
    3. AMP: bf16 autocast as usual; fp16 with ``torch.amp.GradScaler``:
       ``scaler.scale(loss).backward(create_graph=True); scaler.step(opt); scaler.update()`` —
       the optimizer unscales the curvature estimate together with the gradient and skips overflow
       steps without touching its state. (Do not call ``scaler.unscale_(opt)`` before a curvature
       step: the scale is then lost for the estimate, and the step raises.)

    After every step the gradients are detached (their graph and the parameter<->gradient
    reference cycle are freed). ``torch.compile``\ d models cannot be differentiated twice: use
    ``curvature="gnb"`` or ``"finite_difference"`` with them.

    Args:
        params: parameters or parameter groups (groups may override lr, betas, eps, weight_decay,
            hessian_power, clip, averaging, block_length).
        lr: learning rate (0.15).
        betas: ``(b1, b2)`` decay rates of the gradient and curvature moments ((0.9, 0.999)).
        eps: added to the denominator (1e-4, the paper's value).
        weight_decay: decoupled weight decay ``wd`` (0).
        hessian_power: ``k`` in ``[0, 1]`` (1).
        clip: bound on each coordinate of the preconditioned update (1.0), or ``None`` (the paper).
        update_each: compute the curvature estimate every ``K`` steps (1); the others reuse ``v``.
        n_samples: probes (or sampled labels) per curvature step ``S`` (1).
        seed: seed of the optimizer's probe generator (0). Its state is in ``state_dict()``, so a
            resumed run is bit-identical.
        averaging: ``"auto"`` (spatial averaging by tensor shape, see :mod:`hessopt.optim.averaging`)
            or ``"none"``.
        block_length: block size for averaging 2-D weights (``None``: no averaging of 2-D weights).
        distribution: probe distribution, ``"rademacher"`` or ``"gaussian"``.
        curvature: the curvature source (:mod:`hessopt.optim.curvature`): ``"hutchinson"`` (default,
            double backward), ``"gnb"`` (Gauss-Newton-Bartlett, cross-entropy losses, one extra
            backward), ``"finite_difference"`` (one extra gradient), ``"exact"`` (tiny models, tests),
            ``"gradient"`` (``g`` itself: AdamW), a :class:`~hessopt.optim.curvature.CurvatureSource`
            or a callable ``(params, grads, generators) -> list of tensors``.
        nonfinite: ``"skip"`` (default: a step whose loss or gradient is NaN/Inf changes nothing and
            is counted and warned about) or ``"raise"`` (:class:`NonFiniteError`).
        foreach: use the multi-tensor (``torch._foreach_*``) kernels (default: when all parameters
            are on CUDA).
        distributed: ``None`` (default): when a ``torch.distributed`` process group is initialized
            (e.g. under ``torchrun`` with a ``DistributedDataParallel`` model), keep the gradient's
            graph away from DDP and average the curvature estimate over ranks, so every rank takes
            the step of the global batch (:class:`hessopt.distributed.OptimizerSync`,
            ``docs/distributed.md``); ``True``: the same, and a step without a process group raises;
            a ``torch.distributed.ProcessGroup``: average over that group (pass the group given to
            DDP's ``process_group=``); ``False``: never (independent optimizers per rank).
            A model sharded with FSDP2's ``fully_shard`` (DTensor parameters) works with
            ``curvature="gnb"`` or ``"finite_difference"`` (the double-backward sources refuse it):
            the step runs on each rank's chunks, probes are the 1-process probes' chunks, state is
            sharded like the parameters (``docs/distributed.md``).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = hessopt.AdaHessian(model.parameters(), lr=0.15, weight_decay=5e-4 / 0.15)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
    """

    _global_key = "adahessian"
    _moment_names = ("exp_avg", "exp_hessian_diag_sq")

    def __init__(
        self,
        params: Iterable,
        lr: Any = 0.15,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        n_samples: int = 1,
        seed: int = 0,
        averaging: str = "auto",
        block_length: Optional[int] = None,
        distribution: str = "rademacher",
        curvature: Any = None,
        clip: Optional[float] = 1.0,
        nonfinite: str = "skip",
        foreach: Optional[bool] = None,
        distributed: Any = None,
    ):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
                        weight_decay=weight_decay, hessian_power=hessian_power, clip=clip,
                        averaging=averaging, block_length=block_length)
        super().__init__(params, defaults, update_each=update_each, n_samples=n_samples, seed=seed,
                         distribution=distribution, curvature=curvature, foreach=foreach,
                         distributed=distributed, nonfinite=nonfinite)

    def _check_group(self, group) -> None:
        check_number("lr", group["lr"], allow_tensor=True)
        check_betas(group["betas"])
        check_number("eps", group["eps"])
        check_number("weight_decay", group["weight_decay"])
        check_number("hessian_power", group["hessian_power"], high=1.0)
        if group["clip"] is not None:
            check_number("clip", group["clip"])
            if not group["clip"] > 0:
                raise ValueError(f"clip must be positive or None, got {group['clip']!r}")
        if group["averaging"] not in AVERAGING_POLICIES:
            raise ValueError(f"averaging must be one of {AVERAGING_POLICIES}, got {group['averaging']!r}")
        b = group["block_length"]
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"block_length must be None or a positive int, got {b!r}")

    def _compute(self, group, params, grads, moments, curvature, steps, curvature_updates) -> KernelResult:
        exp_avgs, vs = moments
        return adahessian(
            params, grads, exp_avgs, vs, curvature, steps, curvature_updates,
            foreach=self._multi_tensor(params),
            lr=float(group["lr"]),  # a tensor lr (schedulers, compile) as a plain number
            beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
            weight_decay=group["weight_decay"], hessian_power=group["hessian_power"], clip=group["clip"],
            averaging=group["averaging"], block_length=group["block_length"], commit=False,
        )
