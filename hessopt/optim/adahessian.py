r"""AdaHessian: Adam with the squared gradient replaced by a Hessian-diagonal estimate.

See :class:`AdaHessian` for the update rule, its sources, and the three ways to drive it.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import threading
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from ..hvp import second_order_safe
from ._multi_tensor import finite_flags, update_hessian_moments
from .averaging import AVERAGING_POLICIES, average_curvature
from .curvature import make_curvature, needs_graph

__all__ = ["AdaHessian", "SecondOrderGraphError", "adahessian_update"]

_GLOBAL_KEY = "adahessian"  # optimizer-wide entry: self.state[_GLOBAL_KEY] in memory, param_groups[0][_GLOBAL_KEY] in state_dict()
_OPTIONS = ("update_each", "seed", "foreach", "curvature", "_warned_nonfinite", "_distributed_mode")  # kept by copies and pickles
_PICKLED_GENERATORS = "_adahessian_generator_states"


class SecondOrderGraphError(RuntimeError, ValueError):
    """A Hessian step found gradients without their graph (missing ``create_graph=True``)."""


_MISSING_GRAPH = (
    "AdaHessian needs the gradient's graph on this step to estimate the Hessian diagonal, but the "
    "gradients were computed without it. Either call loss.backward(create_graph=True) before "
    "opt.step() (check opt.needs_hessian to build the graph only on the steps that use it), or "
    "pass a closure, opt.step(closure), whose plain loss.backward() the optimizer turns into a "
    "graph-building one."
)

_NO_GRAPH_AFTER_CLOSURE = (
    "the closure's backward ran with create_graph=True, yet no gradient carries a graph, so there is "
    "no curvature to estimate. Either the loss is linear in every parameter (its Hessian is zero and "
    "AdaHessian would divide the step by eps alone: use a first-order optimizer such as "
    "torch.optim.AdamW), or the closure computes gradients without loss.backward() (e.g. "
    "torch.autograd.grad, or code that detaches .grad): call loss.backward() inside the closure."
)

_UNSCALED_AMP = (
    "GradScaler.unscale_(optimizer) was called before a Hessian step: the Hessian estimate goes "
    "through the scaled graph and AdaHessian unscales it together with the gradient, which needs "
    "the scaler to pass the loss scale. Call scaler.step(opt) without unscale_ on steps where "
    "opt.needs_hessian is True (e.g. clip gradients only on the other steps), or use bf16 autocast, "
    "which needs no loss scaling."
)

_FUSED_ATTENTION = (
    "the Hessian estimate went through a fused scaled-dot-product-attention kernel, whose backward "
    "PyTorch cannot differentiate again. Either pass a closure, opt.step(closure) (the optimizer then "
    "runs it under hessopt.second_order_safe()), or run the forward pass and "
    "loss.backward(create_graph=True) inside `with hessopt.second_order_safe():`."
)


def _explain_attention_errors(err: RuntimeError) -> RuntimeError:
    """The error to raise for ``err`` from the HVP: a clearer one for fused attention, else ``err``."""
    text = str(err)
    if "scaled_dot_product" in text and "not implemented" in text:
        return RuntimeError(_FUSED_ATTENTION)
    return err


# Bound against torch's own signature: a wrapper installed by other code may take (*args, **kwargs),
# where setting "create_graph" on the bound arguments would be silently dropped.
_BACKWARD_SIGNATURE = inspect.signature(torch.autograd.backward)


# One wrapper, installed while any thread runs a closure (reference-counted), that acts only for the
# threads inside a closure: another thread's backward at the same time is left as it was.
_closure_threads = threading.local()
_install_lock = threading.Lock()
_installs = 0
_torch_backward: Optional[Callable[..., Any]] = None


def _graph_building_backward(*args, **kwargs):
    """``torch.autograd.backward`` with ``create_graph=True`` in threads running an AdaHessian closure."""
    if getattr(_closure_threads, "depth", 0) > 0:
        bound = _BACKWARD_SIGNATURE.bind(*args, **kwargs)
        bound.arguments["create_graph"] = True
        return _torch_backward(*bound.args, **bound.kwargs)
    return _torch_backward(*args, **kwargs)


@contextlib.contextmanager
def _backward_builds_graph():
    """Inside the block, every ``backward()`` call of this thread builds the graph of the gradient
    (create_graph=True).

    ``Tensor.backward`` (and so GradScaler, Accelerate, Lightning, ...) goes through
    ``torch.autograd.backward``; this is the one place to turn a user's plain ``loss.backward()``
    in a closure into the graph-building backward a Hessian step needs. The replacement is
    installed while any thread is inside such a block and acts only on those threads. PyTorch's
    warning about the parameter-gradient reference cycle is silenced because the optimizer detaches
    the gradients after the step, which breaks that cycle.
    """
    global _installs, _torch_backward
    with _install_lock:
        if _installs == 0:
            _torch_backward = torch.autograd.backward
            torch.autograd.backward = _graph_building_backward
        _installs += 1
    _closure_threads.depth = getattr(_closure_threads, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle.*")
            yield
    finally:
        _closure_threads.depth -= 1
        with _install_lock:
            _installs -= 1
            # code that wrapped torch.autograd.backward after us keeps its wrapper (ours inside it
            # then passes every call through unchanged)
            if _installs == 0 and torch.autograd.backward is _graph_building_backward:
                torch.autograd.backward = _torch_backward


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
    eps=1e-4, hessian_power=1``. Reproducing the paper's recipes (Yao et al. 2021 and the authors'
    published scripts) with this class:

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
    * bias correction of ``v``: counts Hessian updates ``h``. With ``update_each > 1``, counting
      optimizer steps (as some peers do) under-corrects ``v``; with ``update_each=1`` the two agree.
    * Hessian power: 1 by default (the paper's choice); some default to 0.5.
    * spatial averaging: one rule per tensor shape (:mod:`hessopt.optim.averaging`), conv kernels of
      every dimensionality. The authors' fairseq code averages a 2-D tensor over blocks of the
      *flattened* tensor (which needs ``numel`` divisible by ``B``); here blocks run along the last
      dimension, which is the same wherever that dimension is divisible by ``B``, and a trailing
      partial block is averaged on its own.
    * probes: Rademacher from the optimizer's own seeded generator (saved in ``state_dict()``);
      PyTorch-optimizer's sampler ``randint_like(p, 0, 1) * 2 - 1`` is always -1 (row sums).
    * first step: a parameter is never updated before its first Hessian estimate, so the step never
      divides by ``eps`` alone.

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
       ``is_second_order = True`` makes timm's training loop pass ``create_graph=True``. Models
       with attention: run the forward pass inside ``with hessopt.second_order_safe():``.
    3. AMP: bf16 autocast as usual; fp16 with ``torch.amp.GradScaler``:
       ``scaler.scale(loss).backward(create_graph=True); scaler.step(opt); scaler.update()`` —
       the optimizer unscales the Hessian estimate together with the gradient and skips overflow
       steps without touching its state. (Do not call ``scaler.unscale_(opt)`` before a Hessian
       step: the scale is then lost for the Hessian estimate, and the step raises.)

    After every step the gradients are detached (their graph and the parameter<->gradient
    reference cycle are freed). ``torch.compile``d models cannot be differentiated twice: the step
    raises an error that says so; train the uncompiled module.

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
        curvature: the curvature source: ``None``/``"hutchinson"`` (default), ``"exact"`` (the
            exact Hessian diagonal, one HVP per parameter entry: tiny models and tests),
            ``"gradient"`` (``g`` itself: AdamW) or a callable (see :mod:`hessopt.optim.curvature`).
        foreach: use the multi-tensor (``torch._foreach_*``) kernels (default: when all parameters
            are on CUDA).
        distributed: ``None`` (default): when a ``torch.distributed`` process group is initialized
            (e.g. under ``torchrun`` with a ``DistributedDataParallel`` model), keep the gradient's
            graph away from DDP and average ``z * Hz`` over ranks, so every rank takes the step of
            the global batch (:class:`hessopt.distributed.OptimizerSync`, ``docs/distributed.md``);
            ``True``: the same, and a step without a process group raises; a
            ``torch.distributed.ProcessGroup``: average over that group (pass the group given to
            DDP's ``process_group=``); ``False``: never (independent optimizers per rank).

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
        distributed: Any = None,
    ):
        _check_hyperparameters(lr, betas, eps, weight_decay, hessian_power, averaging, block_length)
        for name, value in (("update_each", update_each), ("n_samples", n_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        _check_distributed(distributed)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            averaging=averaging,
            block_length=block_length,
        )
        super().__init__(params, defaults)  # validates every group through add_param_group
        self.update_each = update_each
        self.seed = seed
        self.foreach = foreach
        self.curvature = make_curvature(curvature, n_samples, distribution)
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._warned_nonfinite = False
        self.state[_GLOBAL_KEY] = {"step": 0, "seed": seed, "generator_states": {}, "curvature_pending": False}
        # Gradient hooks must be in place before the first backward, even if the process group is
        # initialized only after the optimizer is built; they are inert without one.
        self._distributed_mode = distributed
        self._distributed = _make_sync(self)

    # -- public state ----------------------------------------------------------------------------

    @property
    def needs_hessian(self) -> bool:
        """Whether the next :meth:`step` computes a Hessian estimate (so its backward needs ``create_graph=True``).

        True on the first step, every ``update_each``-th step after it, and after a step in which
        a parameter received a gradient but still has no (finite) Hessian estimate; always False for curvature
        sources that need no graph (``curvature="gradient"``). Explicit loops pass it on:
        ``loss.backward(create_graph=opt.needs_hessian)``.
        """
        return needs_graph(self.curvature) and self._curvature_due()

    def _curvature_due(self) -> bool:
        """Whether the next step is a Hessian step (whatever the curvature source).

        Off schedule only while a parameter that had a gradient on the last step still has no
        estimate (it first appeared on a lazy step, or its first estimate was not finite). Only the
        last step's parameters count: one that stops receiving gradients costs at most one extra
        Hessian step, not one on every step from then on.
        """
        glob = self.state[_GLOBAL_KEY]
        if glob["step"] % self.update_each == 0:
            return True
        return bool(glob.get("curvature_pending", False))

    def _generator(self, device: torch.device) -> torch.Generator:
        """The probe generator for ``device``: seeded with ``seed``, or resumed from a loaded state."""
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            saved = self.state[_GLOBAL_KEY]["generator_states"].pop(str(device), None)
            if saved is not None:
                gen.set_state(saved.cpu())  # set_state takes a CPU ByteTensor for every device type
            self._generators[device] = gen
        return gen

    def state_dict(self) -> Dict[str, Any]:
        """``torch.optim`` state dict. ``state`` holds the per-parameter tensors (by parameter index,
        as torch does); the optimizer-wide entry goes into the first parameter group as
        ``param_groups[0]["adahessian"]``: the step counter, the seed, the probe generators' states
        (a snapshot, unlike the per-parameter tensors, which torch returns by reference) and whether
        a Hessian step is pending. In ``state`` its string key would break tools that map every
        state key to a parameter name (``torch.distributed.checkpoint.state_dict``, FSDP)."""
        state_dict = super().state_dict()
        state_dict["state"].pop(_GLOBAL_KEY, None)
        state_dict["param_groups"][0][_GLOBAL_KEY] = self.global_state_snapshot()
        return state_dict

    def global_state_snapshot(self) -> Dict[str, Any]:
        """A copy of the optimizer-wide state: ``step``, ``seed``, ``generator_states`` (per device,
        live or loaded) and ``curvature_pending``; what :meth:`state_dict` saves beside the
        per-parameter state, and what the ranks compare under ``torch.distributed``."""
        glob = self.state[_GLOBAL_KEY]
        generator_states = {k: v.clone() for k, v in glob["generator_states"].items()}
        generator_states.update({str(d): g.get_state() for d, g in self._generators.items()})
        return {"step": glob["step"], "seed": self.seed, "generator_states": generator_states,
                "curvature_pending": bool(glob.get("curvature_pending", False))}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`; the run then continues bit-identically,
        with the saved seed and probe streams (whatever ``seed`` this optimizer was built with).
        State dicts of hessopt 0.1.0, which kept the optimizer-wide entry in ``state``, load too."""
        groups = state_dict.get("param_groups") or [{}]
        glob = groups[0].get(_GLOBAL_KEY, state_dict.get("state", {}).get(_GLOBAL_KEY))
        if not isinstance(glob, dict) or "generator_states" not in glob:
            raise ValueError(
                "this state_dict was not saved by hessopt.AdaHessian (it has no probe-generator state); "
                "load it into the optimizer type that saved it"
            )
        plain = dict(state_dict)  # torch's part: without the optimizer-wide entry, wherever it was
        plain["state"] = {k: v for k, v in state_dict["state"].items() if k != _GLOBAL_KEY}
        plain["param_groups"] = [{k: v for k, v in g.items() if k != _GLOBAL_KEY} for g in state_dict["param_groups"]]
        super().load_state_dict(plain)
        # A private copy: the step counter of two optimizers loaded from one dict must not be shared.
        self.seed = int(glob.get("seed", self.seed))
        self.state[_GLOBAL_KEY] = {
            "step": int(glob["step"]),
            "seed": self.seed,
            "generator_states": {k: v.detach().cpu().clone() for k, v in glob["generator_states"].items()},
            "curvature_pending": self._loaded_pending(glob),
        }
        self._generators = {}  # rebuilt from the loaded states on first use
        if getattr(self, "_distributed", None) is not None:
            self._distributed.recheck()  # the loaded seed must agree across ranks too

    def _loaded_pending(self, glob: Dict[str, Any]) -> bool:
        """The saved ``curvature_pending`` flag; for older state dicts without it, any loaded
        parameter still waiting for its first estimate."""
        if "curvature_pending" in glob:
            return bool(glob["curvature_pending"])
        return any(isinstance(p, torch.Tensor) and s.get("hessian_step", 1) == 0 for p, s in self.state.items())

    def _copy_state(self) -> Dict[str, Any]:
        """What a copy needs: torch's ``Optimizer.__getstate__`` keeps only ``defaults``, ``state``
        and ``param_groups``; a copy also needs the options and the probe generators (as states: a
        copy continues the same probe stream, independently)."""
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in _OPTIONS})
        state[_PICKLED_GENERATORS] = {str(d): g.get_state() for d, g in self._generators.items()}
        return state

    def __getstate__(self) -> Dict[str, Any]:
        """For pickling (see :meth:`_copy_state`). A ``ProcessGroup`` passed as ``distributed=``
        cannot leave its process: save ``state_dict()`` instead."""
        if not (self._distributed_mode is None or isinstance(self._distributed_mode, bool)):
            raise TypeError(
                "this AdaHessian was built with distributed=<a ProcessGroup>, which cannot be pickled "
                "(a process group does not travel between processes). Save opt.state_dict() instead: it "
                "holds everything a resumed run needs, and loads into an optimizer built on the new group"
            )
        return self._copy_state()

    def __deepcopy__(self, memo: Dict[int, Any]) -> "AdaHessian":
        """A deep copy with its own state and probe stream; a ``distributed=`` process group is
        shared, not copied (it is the same communicator)."""
        mode = self._distributed_mode
        if not (mode is None or isinstance(mode, bool)):
            memo[id(mode)] = mode
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._copy_state(), memo))
        return new

    def __setstate__(self, state: Dict[str, Any]) -> None:
        pickled = _PICKLED_GENERATORS in state
        live = state.pop(_PICKLED_GENERATORS, None)
        super().__setstate__(state)
        if pickled:  # a copy; torch's load_state_dict calls __setstate__ too, with only state and groups
            glob = self.state[_GLOBAL_KEY]
            glob["generator_states"] = {**glob["generator_states"], **live}
            self._generators = {}
            self._distributed = _make_sync(self)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group; its hyper-parameters are validated like the constructor's."""
        group = {**self.defaults, **param_group}  # checked before torch stores it
        _check_hyperparameters(
            group["lr"], group["betas"], group["eps"], group["weight_decay"],
            group["hessian_power"], group["averaging"], group["block_length"],
        )
        super().add_param_group(param_group)
        if getattr(self, "_distributed", None) is not None:  # groups added after construction
            self._distributed.watch()

    # -- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """Perform one optimization step (see the class docstring for the three calling conventions).

        Returns the closure's loss, detached: the graph it carried is of no use once the parameters
        have changed, and holding it would keep the forward pass's saved tensors alive.
        """
        hessian_step = self._curvature_due()
        try:
            loss = self._run_closure(closure, hessian_step)
            self._step(hessian_step, graph_forced=closure is not None and needs_graph(self.curvature))
        except BaseException:
            # GradScaler deletes grad_scale/found_inf only after a successful step(); stale ones
            # would be multiplied into the next scaler.step's grad_scale.
            for name in ("grad_scale", "found_inf"):
                self.__dict__.pop(name, None)
            raise
        finally:
            self._release_graphs()
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    def _run_closure(self, closure, hessian_step: bool):
        """Run the closure; on Hessian steps its backward() builds the graph, attention made safe."""
        if closure is None:
            return None
        with torch.enable_grad():
            if hessian_step and needs_graph(self.curvature):
                with second_order_safe(), _backward_builds_graph():
                    return closure()
            return closure()

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

    def _step(self, hessian_step: bool, graph_forced: bool = False) -> None:
        entries = self._entries()
        found_inf = getattr(self, "found_inf", None)
        if not entries or (found_inf is not None and float(found_inf) > 0):
            return  # nothing to do, or an fp16 overflow: GradScaler lowers the scale, nothing here changes
        params = [p for _, p in entries]
        dist_ctx = self._distributed_context()
        graph_grads = dist_ctx.graph_grads(params) if dist_ctx else [p.grad for p in params]
        if hessian_step:
            self._check_hessian_inputs(graph_grads, graph_forced)
        grad_scale = getattr(self, "grad_scale", None)
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
        glob = self.state[_GLOBAL_KEY]
        glob["step"] += 1
        glob["curvature_pending"] = any(self.state[p]["hessian_step"] == 0 for p in params)

    def _check_hessian_inputs(self, graph_grads, graph_forced: bool = False) -> None:
        """Raise before anything changes if this Hessian step cannot be computed correctly.

        ``graph_forced``: the gradients came from a closure whose backward this optimizer made
        graph-building, so a missing graph is not a forgotten ``create_graph=True``."""
        if needs_graph(self.curvature) and not any(g is not None and g.requires_grad for g in graph_grads):
            raise SecondOrderGraphError(_NO_GRAPH_AFTER_CLOSURE if graph_forced else _MISSING_GRAPH)
        if getattr(self, "found_inf", None) is not None and getattr(self, "grad_scale", None) is None:
            # GradScaler sets found_inf but no grad_scale after unscale_(): the scale is lost for z*Hz
            raise ValueError(_UNSCALED_AMP)

    def _estimate_curvature(self, params, graph_grads, inv_scale, dist_ctx) -> List[Optional[torch.Tensor]]:
        """The unscaled, rank-averaged curvature per parameter; ``None`` where it is not finite."""
        gens = {p.device: self._generator(p.device) for p in params}
        try:
            raw = self.curvature(params, graph_grads, gens)
        except RuntimeError as err:
            raise _explain_attention_errors(err) from err
        if len(raw) != len(params):
            raise ValueError(f"the curvature source returned {len(raw)} tensors for {len(params)} parameters")
        raw = [r.detach() for r in raw]
        if dist_ctx:
            raw = dist_ctx.average_curvature(params, raw)
        if inv_scale is not None:
            raw = torch._foreach_mul(raw, inv_scale)
        # one device-to-host transfer for all the flags instead of one sync per tensor
        if self._multi_tensor(params):
            finite = finite_flags(raw)
        else:
            device = raw[0].device
            finite = torch.stack([torch.isfinite(r).all().to(device) for r in raw]).tolist()
        return [r if ok else None for r, ok in zip(raw, finite)]

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
        """Hessian moments, then the update of every parameter of ``group`` that has curvature."""
        states = [self.state[p] or self._init_state(p) for p in params]
        if curvature is not None:
            if self._multi_tensor(params):
                self._update_hessian_moments(params, states, curvature, group)
            else:  # the reference, tensor by tensor
                for p, state, d in zip(params, states, curvature):
                    self._update_hessian_moment(p, state, d, group)
        chosen = []
        for j, state in enumerate(states):
            if state["hessian_step"] == 0:
                continue  # no curvature yet: never divide by eps alone; updated from the next Hessian step on
            state["step"] += 1
            chosen.append(j)
        if not chosen:
            return
        ps = [params[j] for j in chosen]
        states = [states[j] for j in chosen]
        foreach = self._multi_tensor(ps)
        # the multi-tensor kernels need tensors of one device and dtype per call
        batches = list(_by_device_and_dtype(ps).values()) if foreach else [list(range(len(ps)))]
        for idx in batches:
            adahessian_update(
                [ps[i] for i in idx],
                [grads[chosen[i]] for i in idx],
                [states[i]["exp_avg"] for i in idx],
                [states[i]["exp_hessian_diag_sq"] for i in idx],
                [states[i]["step"] for i in idx],
                [group["betas"][1] ** states[i]["hessian_step"] for i in idx],
                lr=float(group["lr"]),  # a tensor lr (schedulers, compile) as a plain number
                beta1=group["betas"][0],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                hessian_power=group["hessian_power"],
                foreach=foreach,
            )

    def _init_state(self, p) -> Dict[str, Any]:
        state = self.state[p]
        state.update(
            step=0,  # updates applied to p (bias correction of m)
            hessian_step=0,  # Hessian estimates folded into v (bias correction of v)
            nonfinite_hessian_skips=0,
            exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
            exp_hessian_diag_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
        )
        return state

    def _multi_tensor(self, params) -> bool:
        """Whether to use the multi-tensor kernels (``foreach``; default: all parameters on CUDA)."""
        return self.foreach if self.foreach is not None else all(p.is_cuda for p in params)

    def _update_hessian_moments(self, params, states, curvature, group) -> None:
        """:meth:`_update_hessian_moment` for all of ``params`` at once, with multi-tensor kernels."""
        live = []
        for p, state, d in zip(params, states, curvature):
            if d is None:
                self._update_hessian_moment(p, state, None, group)  # skipped, counted, warned about
            else:
                live.append((state, d))
        update_hessian_moments([state["exp_hessian_diag_sq"] for state, _ in live], [d for _, d in live],
                               group["betas"][1], group["averaging"], group["block_length"])
        for state, _ in live:
            state["hessian_step"] += 1

    def _update_hessian_moment(self, p, state, d: Optional[torch.Tensor], group) -> None:
        r"""``v <- b2 v + (1 - b2) average(|d|)^2`` and ``h <- h + 1``; a non-finite ``d`` (``None``) is
        skipped, counted and warned about once, so one bad batch cannot poison ``v`` forever."""
        if d is None:
            state["nonfinite_hessian_skips"] += 1
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                _warn_nonfinite(p)
            return
        beta2 = group["betas"][1]
        d = average_curvature(d.abs(), group["averaging"], group["block_length"])
        state["exp_hessian_diag_sq"].mul_(beta2).addcmul_(d, d, value=1 - beta2)
        state["hessian_step"] += 1

    # -- bookkeeping -----------------------------------------------------------------------------

    def _distributed_context(self):
        """The :class:`~hessopt.distributed.OptimizerSync` if this step runs under torch.distributed."""
        return None if self._distributed is None else self._distributed.for_step()

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


def _make_sync(optimizer: "AdaHessian"):
    """The optimizer's :class:`~hessopt.distributed.OptimizerSync` (``None`` with ``distributed=False``)."""
    import torch.distributed as dist

    if optimizer._distributed_mode is False or not dist.is_available():
        return None
    from ..distributed import OptimizerSync

    return OptimizerSync(optimizer, optimizer._distributed_mode)


def _check_distributed(distributed) -> None:
    if distributed is None or isinstance(distributed, bool):
        return
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(distributed, dist.ProcessGroup)):
        raise TypeError(
            "distributed must be None (automatic), True, False or a torch.distributed.ProcessGroup, "
            f"got {type(distributed).__name__}"
        )


def _by_device_and_dtype(params: List[torch.Tensor]) -> Dict[Tuple[torch.device, torch.dtype], List[int]]:
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return groups


def _warn_nonfinite(p: torch.Tensor) -> None:
    warnings.warn(
        f"AdaHessian: the Hessian-diagonal estimate of a parameter of shape {tuple(p.shape)} is "
        "not finite; its Hessian update is skipped (counted in state['nonfinite_hessian_skips']). "
        "This warning is shown once per optimizer.",
        RuntimeWarning,
        stacklevel=6,
    )


def _check_hyperparameters(lr, betas, eps, weight_decay, hessian_power, averaging, block_length) -> None:
    if not (isinstance(lr, (int, float)) or torch.is_tensor(lr)) or not lr >= 0:
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
