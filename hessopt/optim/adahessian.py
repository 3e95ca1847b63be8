r"""AdaHessian: Adam with the squared gradient replaced by a Hessian-diagonal estimate.

See :class:`AdaHessian` for the update rule, its sources, and the three ways to drive it.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from ..hvp import second_order_safe
from .averaging import AVERAGING_POLICIES, average_curvature
from .curvature import GradientCurvature, Hutchinson, needs_graph

__all__ = ["AdaHessian", "SecondOrderGraphError", "adahessian_update"]

_GLOBAL_KEY = "adahessian"  # the optimizer-wide entry in self.state (step counter, probe generators)


class SecondOrderGraphError(RuntimeError, ValueError):
    """A Hessian step found gradients without their graph (missing ``create_graph=True``)."""


_MISSING_GRAPH = (
    "AdaHessian needs the gradient's graph on this step to estimate the Hessian diagonal, but the "
    "gradients were computed without it. Either call loss.backward(create_graph=True) before "
    "opt.step() (check opt.needs_hessian to build the graph only on the steps that use it), or "
    "pass a closure, opt.step(closure), whose plain loss.backward() the optimizer turns into a "
    "graph-building one."
)

_UNSCALED_AMP = (
    "GradScaler.unscale_(optimizer) was called before a Hessian step: the Hessian estimate goes "
    "through the scaled graph and AdaHessian unscales it together with the gradient, which needs "
    "the scaler to pass the loss scale. Call scaler.step(opt) without unscale_ on steps where "
    "opt.needs_hessian is True (e.g. clip gradients only on the other steps), or use bf16 autocast, "
    "which needs no loss scaling."
)


@contextlib.contextmanager
def _backward_builds_graph():
    """Inside the block, every ``backward()`` call builds the graph of the gradient (create_graph=True).

    ``Tensor.backward`` (and so GradScaler, Accelerate, Lightning, ...) goes through
    ``torch.autograd.backward``; this is the one place to turn a user's plain ``loss.backward()``
    in a closure into the graph-building backward a Hessian step needs. PyTorch's warning about the
    parameter-gradient reference cycle is silenced because the optimizer detaches the gradients
    after the step, which breaks that cycle.
    """
    original = torch.autograd.backward
    signature = inspect.signature(original)

    def backward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["create_graph"] = True
        return original(*bound.args, **bound.kwargs)

    torch.autograd.backward = backward
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle.*")
            yield
    finally:
        torch.autograd.backward = original


def adahessian_update(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_hessian_diag_sqs: List[torch.Tensor],
    steps: List[int],
    beta2_powers: List[float],
    *,
    lr: float,
    beta1: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
    foreach: bool,
) -> None:
    r"""The parameter update given gradients and (already updated) second moments.

    ``theta *= 1 - lr * weight_decay``;
    ``theta -= lr / (1 - beta1^t) * m / ((sqrt(v) / sqrt(1 - beta2^h))^k + eps)``,
    with ``t`` the parameter's step count (``steps``) and ``h`` its number of Hessian updates
    (``beta2_powers`` holds ``beta2^h``). ``m`` is updated here; ``v`` is updated by the caller on
    Hessian steps only.
    """
    if not params:
        return
    bc1 = [1 - beta1**t for t in steps]
    denom_scale = [math.sqrt(1 - b2h) for b2h in beta2_powers]
    if foreach:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        if weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        denoms = torch._foreach_sqrt(exp_hessian_diag_sqs)
        torch._foreach_div_(denoms, denom_scale)
        if hessian_power != 1:
            torch._foreach_pow_(denoms, hessian_power)
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / b for b in bc1])
        return
    for i, p in enumerate(params):
        exp_avgs[i].mul_(beta1).add_(grads[i], alpha=1 - beta1)
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        denom = exp_hessian_diag_sqs[i].sqrt().div_(denom_scale[i])
        if hessian_power != 1:
            denom.pow_(hessian_power)
        p.addcdiv_(exp_avgs[i], denom.add_(eps), value=-lr / bc1[i])


class AdaHessian(torch.optim.Optimizer):
    r"""AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, AAAI 2021), a drop-in torch optimizer.

    Adam's second moment of the gradient is replaced by the second moment of a Hutchinson estimate
    of the Hessian diagonal, so the step is preconditioned by curvature rather than by gradient
    magnitude.

    .. code-block:: text

        input: lr, (b1, b2), eps, weight decay wd, Hessian power k, update_each K, n_samples S
        for t = 1, 2, ...:
            g      <- gradient of the loss (unscaled if a GradScaler scaled it)
            m      <- b1 m + (1 - b1) g
            if t = 1 or (t - 1) mod K = 0:                  # a Hessian step
                D  <- (1/S) sum_s z_s * (H z_s)             # Hutchinson, z_s Rademacher, one HVP each
                D  <- average(|D|)                          # spatial averaging, per tensor shape
                v  <- b2 v + (1 - b2) D^2 ;  h <- h + 1     # h counts Hessian updates
            theta  <- theta (1 - lr wd)                     # decoupled weight decay
            theta  <- theta - lr/(1 - b1^t) * m / ((sqrt(v / (1 - b2^h)))^k + eps)

    Defaults come from the paper's image-classification recipe: ``lr=0.15, betas=(0.9, 0.999),
    eps=1e-4, hessian_power=1``. Reproducing the paper's recipes with the decoupled weight decay:

    * CIFAR-10 ResNets: the paper applies ``theta -= lr * (update + (5e-4 / lr0) * theta)`` with
      ``lr0 = 0.15``, i.e. ``weight_decay = 5e-4 / 0.15 = 3.33e-3``; batch 256, 160 epochs, lr x0.1
      at epochs 80 and 120.
    * fairseq Transformer (IWSLT14/WMT14): ``lr=0.047, betas=(0.9, 0.98), eps=1e-4,
      block_length=32`` with inverse-sqrt schedule and 8k warm-up; its ``theta -= lr * 1e-4 *
      theta`` is ``weight_decay=1e-4``.

    Where implementations differ (FIELD_NOTES.md): the estimate is ``|z * Hz|`` here as in the
    paper (some use the signed value); eps is added after the power (as in the paper and timm);
    bias correction of ``v`` counts Hessian updates ``h``, not steps (with lazy updates counting
    steps under-corrects); Hessian power defaults to 1 (the paper's choice; some default to 0.5).
    PyTorch-optimizer's Rademacher sampler ``randint_like(p, 0, 1) * 2 - 1`` is always -1 and
    estimates row sums: here probes come from the optimizer's own seeded generator.

    Driving it (all three are equivalent and tested to give the same trajectory):

    1. The standard torch closure, unchanged::

           def closure():
               opt.zero_grad()
               loss = loss_fn(model(x), y)
               loss.backward()
               return loss
           opt.step(closure)

       On Hessian steps the optimizer runs the closure with every ``backward()`` building the
       gradient's graph and under :func:`hessopt.second_order_safe` (fused attention works).
    2. Explicit: ``loss.backward(create_graph=opt.needs_hessian); opt.step()``.
       ``is_second_order = True`` makes timm's training loop pass ``create_graph=True``.
    3. AMP: bf16 autocast as usual; fp16 with ``torch.amp.GradScaler``:
       ``scaler.scale(loss).backward(create_graph=True); scaler.step(opt); scaler.update()`` —
       the optimizer unscales the Hessian estimate together with the gradient and skips overflow
       steps without touching its state.

    Args:
        params: parameters or parameter groups (groups may override lr, betas, eps, weight_decay,
            hessian_power, averaging, block_length).
        lr: learning rate (0.15).
        betas: ``(b1, b2)`` decay rates of the gradient and Hessian moments ((0.9, 0.999)).
        eps: added to the denominator (1e-4, the paper's value).
        weight_decay: decoupled weight decay ``wd`` (0).
        hessian_power: ``k`` in ``[0, 1]`` (1).
        update_each: compute the Hessian estimate every ``K`` steps (1); the others reuse ``v``.
        n_samples: Hutchinson probes per Hessian step ``S`` (1).
        seed: seed of the optimizer's probe generator (0). Its state is in ``state_dict()``, so a
            resumed run is bit-identical.
        averaging: ``"auto"`` (spatial averaging by tensor shape, see :mod:`hessopt.optim.averaging`)
            or ``"none"``.
        block_length: block size for averaging 2-D weights (``None``: no averaging of 2-D weights).
        distribution: probe distribution, ``"rademacher"`` or ``"gaussian"``.
        curvature: a curvature source replacing the Hutchinson estimate (see
            :mod:`hessopt.optim.curvature`; e.g. ``"gradient"`` gives AdamW).
        foreach: use the multi-tensor (``torch._foreach_*``) kernels (default: when all parameters
            are on CUDA).

    Example:
        >>> opt = hessopt.AdaHessian(model.parameters(), lr=0.15, weight_decay=5e-4 / 0.15)
        >>> for x, y in loader:
        ...     def closure():
        ...         opt.zero_grad()
        ...         loss = F.cross_entropy(model(x), y)
        ...         loss.backward()
        ...         return loss
        ...     opt.step(closure)
    """

    is_second_order = True
    # GradScaler then hands the loss scale and the overflow flag to step() instead of unscaling
    # p.grad itself: the Hessian estimate must be unscaled too, and only the optimizer can.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.15,
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
        foreach: Optional[bool] = None,
    ):
        _check_hyperparameters(lr, betas, eps, weight_decay, hessian_power, averaging, block_length)
        for name, value in (("update_each", update_each), ("n_samples", n_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            averaging=averaging,
            block_length=block_length,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyperparameters(
                group["lr"], group["betas"], group["eps"], group["weight_decay"],
                group["hessian_power"], group["averaging"], group["block_length"],
            )
        self.update_each = update_each
        self.seed = seed
        self.foreach = foreach
        if curvature is None:
            curvature = Hutchinson(n_samples, distribution)
        elif curvature == "gradient":
            curvature = GradientCurvature()
        elif curvature == "hutchinson":
            curvature = Hutchinson(n_samples, distribution)
        elif not callable(curvature):
            raise TypeError(
                "curvature must be None, 'hutchinson', 'gradient' or a callable "
                "(params, grads, generators) -> list of tensors"
            )
        self.curvature = curvature
        self._generators: Dict[torch.device, torch.Generator] = {}
        self.state[_GLOBAL_KEY] = {"step": 0, "generator_states": {}}
        # Under torch.distributed, gradient hooks must be in place before the first backward.
        self._distributed = None
        self._distributed_context()

    # -- public state ----------------------------------------------------------------------------

    @property
    def needs_hessian(self) -> bool:
        """Whether the next :meth:`step` computes a Hessian estimate (so its backward needs ``create_graph=True``).

        True on the first step, every ``update_each``-th step after it, and whenever a parameter
        has received gradients but no Hessian estimate yet.
        """
        return needs_graph(self.curvature) and self._curvature_due()

    def _curvature_due(self) -> bool:
        if self.state[_GLOBAL_KEY]["step"] % self.update_each == 0:
            return True
        return any(
            isinstance(p, torch.Tensor) and s.get("hessian_step", 1) == 0 for p, s in self.state.items()
        )

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            saved = self.state[_GLOBAL_KEY]["generator_states"].get(str(device))
            if saved is not None:
                gen.set_state(saved)
            self._generators[device] = gen
        return gen

    def state_dict(self) -> Dict[str, Any]:
        glob = self.state[_GLOBAL_KEY]
        for device, gen in self._generators.items():
            glob["generator_states"][str(device)] = gen.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if _GLOBAL_KEY not in state_dict.get("state", {}):
            raise ValueError(
                "this state_dict was not saved by hessopt.AdaHessian (it has no probe-generator state); "
                "load it into the optimizer type that saved it"
            )
        super().load_state_dict(state_dict)
        glob = self.state[_GLOBAL_KEY]
        glob["generator_states"] = {k: v.clone() for k, v in glob["generator_states"].items()}
        self._generators = {}  # rebuilt from the loaded states on first use

    # -- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """Perform one optimization step (see the class docstring for the three calling conventions)."""
        hessian_step = self._curvature_due()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                if hessian_step and needs_graph(self.curvature):
                    with second_order_safe(), _backward_builds_graph():
                        loss = closure()
                else:
                    loss = closure()
        try:
            self._step(hessian_step)
        finally:
            self._release_graphs()
        return loss

    def _entries(self):
        """(group, param) for every parameter that has a gradient this step, validated."""
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue  # unused or frozen: no update, no state
                if p.grad.is_sparse:
                    raise ValueError(
                        "AdaHessian does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                        "use dense gradients (sparse=False)"
                    )
                entries.append((group, p))
        return entries

    def _step(self, hessian_step: bool) -> None:
        entries = self._entries()
        if not entries:
            return
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) > 0:
            return  # fp16 overflow: GradScaler lowers the scale; nothing here changes
        params = [p for _, p in entries]
        dist_ctx = self._distributed_context()
        graph_grads = dist_ctx.graph_grads(params) if dist_ctx else [p.grad for p in params]
        if hessian_step:
            if needs_graph(self.curvature) and not any(g is not None and g.requires_grad for g in graph_grads):
                raise SecondOrderGraphError(_MISSING_GRAPH)
            if found_inf is not None and grad_scale is None:
                raise ValueError(_UNSCALED_AMP)
        inv_scale = None if grad_scale is None else 1.0 / float(grad_scale)
        grads = [p.grad.detach() for p in params]
        if inv_scale is not None:
            grads = torch._foreach_mul(grads, inv_scale)
        if dist_ctx:
            grads = dist_ctx.average_gradients(grads)
        curvature = None
        if hessian_step:
            curvature = self._estimate_curvature(params, graph_grads, inv_scale, dist_ctx)
        self._apply(entries, grads, curvature)
        self.state[_GLOBAL_KEY]["step"] += 1

    def _estimate_curvature(self, params, graph_grads, inv_scale, dist_ctx) -> List[torch.Tensor]:
        gens = {p.device: self._generator(p.device) for p in params}
        raw = self.curvature(params, graph_grads, gens)
        if len(raw) != len(params):
            raise ValueError(f"the curvature source returned {len(raw)} tensors for {len(params)} parameters")
        raw = [r.detach() for r in raw]
        if dist_ctx:
            raw = dist_ctx.average_curvature(raw)
        if inv_scale is not None:
            raw = torch._foreach_mul(raw, inv_scale)
        return raw

    def _apply(self, entries, grads, curvature) -> None:
        """Update moments and parameters, group by group."""
        by_group: Dict[int, List[int]] = {}
        for i, (group, _) in enumerate(entries):
            by_group.setdefault(id(group), []).append(i)
        for indices in by_group.values():
            group = entries[indices[0]][0]
            self._apply_group(group, [entries[i][1] for i in indices], [grads[i] for i in indices],
                              None if curvature is None else [curvature[i] for i in indices])

    def _apply_group(self, group, params, grads, curvature) -> None:
        beta1, beta2 = group["betas"]
        chosen = []
        for j, p in enumerate(params):
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["hessian_step"] = 0
                state["nonfinite_hessian_skips"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_hessian_diag_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if curvature is not None:
                d = curvature[j]
                if bool(torch.isfinite(d).all()):
                    d = average_curvature(d.abs(), group["averaging"], group["block_length"])
                    state["exp_hessian_diag_sq"].mul_(beta2).addcmul_(d, d, value=1 - beta2)
                    state["hessian_step"] += 1
                else:
                    state["nonfinite_hessian_skips"] += 1
                    _warn_nonfinite_once(p)
            if state["hessian_step"] == 0:
                continue  # no curvature yet: never divide by eps alone; updated from the next Hessian step on
            state["step"] += 1
            chosen.append(j)
        if not chosen:
            return
        ps = [params[j] for j in chosen]
        states = [self.state[p] for p in ps]
        foreach = self.foreach if self.foreach is not None else all(p.is_cuda for p in ps)
        # the multi-tensor kernels need tensors of one device and dtype per call
        batches = list(_by_device_and_dtype(ps).values()) if foreach else [list(range(len(ps)))]
        for idx in batches:
            adahessian_update(
                [ps[i] for i in idx],
                [grads[chosen[i]] for i in idx],
                [states[i]["exp_avg"] for i in idx],
                [states[i]["exp_hessian_diag_sq"] for i in idx],
                [states[i]["step"] for i in idx],
                [beta2 ** states[i]["hessian_step"] for i in idx],
                lr=group["lr"],
                beta1=beta1,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                hessian_power=group["hessian_power"],
                foreach=foreach,
            )

    # -- bookkeeping -----------------------------------------------------------------------------

    def _distributed_context(self):
        from ..distributed import is_distributed

        if not is_distributed():
            return None
        if self._distributed is None:
            from ..distributed import OptimizerSync

            self._distributed = OptimizerSync(self)
        return self._distributed

    def _release_graphs(self) -> None:
        """Detach every gradient: frees the double-backward graph and the param<->grad reference cycle."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach()
        if self._distributed is not None:
            self._distributed.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if self._distributed is not None:
            self._distributed.clear()


def _by_device_and_dtype(params: List[torch.Tensor]) -> Dict[Tuple[torch.device, torch.dtype], List[int]]:
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return groups


_warned_nonfinite = False


def _warn_nonfinite_once(p: torch.Tensor) -> None:
    global _warned_nonfinite
    if not _warned_nonfinite:
        _warned_nonfinite = True
        warnings.warn(
            f"AdaHessian: the Hessian-diagonal estimate of a parameter of shape {tuple(p.shape)} is "
            "not finite; its Hessian update is skipped (counted in state['nonfinite_hessian_skips']). "
            "This warning is shown once.",
            RuntimeWarning,
            stacklevel=4,
        )


def _check_hyperparameters(lr, betas, eps, weight_decay, hessian_power, averaging, block_length) -> None:
    if not (isinstance(lr, (int, float)) or torch.is_tensor(lr)) or lr < 0:
        raise ValueError(f"lr must be a non-negative number, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
    if not 0.0 <= hessian_power <= 1.0:
        raise ValueError(f"hessian_power must be in [0, 1] (the paper's range), got {hessian_power!r}")
    if averaging not in AVERAGING_POLICIES:
        raise ValueError(f"averaging must be one of {AVERAGING_POLICIES}, got {averaging!r}")
    if block_length is not None and (isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1):
        raise ValueError(f"block_length must be None or a positive int, got {block_length!r}")
