r"""What AdaHessian and Sophia share: the curvature schedule, the three driving forms, curvature
sources, all-or-nothing steps, non-finite batches, state and its copies.

A subclass supplies its hyper-parameter checks, the names of its two moments and one kernel
``_compute(group, params, grads, moments, curvature, steps, curvature_updates) -> KernelResult``
that computes the step *without writing anything*; this base commits it.

**A step is all or nothing.** Everything that can fail runs first and writes nothing: the
closure, the finiteness checks, the curvature source, the kernel (new moments and the parameter
deltas are computed out of place). The commit then writes the parameters with one multi-tensor
call per device and dtype (restored from a copy if a later bucket raises) and swaps the new moments
and counters into the state by plain assignments, with ``KeyboardInterrupt`` held back until it is
done. If anything raises before, the probe generators are rewound, so a retried step draws the
same probes as one that never failed.

**A non-finite batch changes nothing.** A NaN/Inf loss (closure form) or gradient skips the
whole step before the curvature is computed: parameters, moments, step counters and probe
generators stay as they were, the skip is counted (``opt.skipped_steps``) and warned about
(``nonfinite="skip"``, the default, as ``torch.amp.GradScaler`` does), or :class:`NonFiniteError` is
raised (``nonfinite="raise"``). A non-finite *curvature* estimate of one tensor skips only that
tensor's curvature update (counted per parameter in ``state[p]["nonfinite_curvature"]``), and an
estimate whose square would overflow the second moment is clipped to the largest safe value
(``state[p]["curvature_overflows"]``).

**Schedule.** A curvature step happens on the first step, every ``update_each`` steps after it,
and while a parameter that received a gradient within the last ``update_each`` steps still has no
estimate (it appears only on off-schedule steps, e.g. two tasks alternating). A parameter is never
updated before its first curvature estimate. One that stops receiving gradients costs at most
``update_each`` extra curvature steps.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch

from .._checks import check_positive_int
from .._patches import PatternMismatch, capture_cross_entropy, frozen_activations, graph_building_backward, replaying
from ..hvp import second_order_safe
from ._multi_tensor import commit_parameter_updates, finite_flags, interrupts_held
from .._sharded import Sharding, check_sharded_parameter, is_dtensor, like, local, sharding_of
from .curvature import CurvatureInputs, CurvatureSource, make_curvature, needs_graph

__all__ = ["CurvatureOptimizer", "KernelResult", "NonFiniteError", "SecondOrderGraphError"]

_PICKLED_GENERATORS = "_generator_states_of_copy"
# never copied with the optimizer: rebuilt (generators from their states, the distributed hooks)
_TRANSIENT = ("_generators", "_distributed", "_param_index", "_captured")


class SecondOrderGraphError(RuntimeError, ValueError):
    """A Hessian step found gradients without their graph (missing ``create_graph=True``)."""


class NonFiniteError(FloatingPointError):
    """The loss or a gradient of this step is NaN or infinite; nothing was changed."""


_MISSING_GRAPH = (
    "{name} needs the gradient's graph on this step to estimate the Hessian diagonal, but no gradient "
    "carries one. Either the backward ran without create_graph=True (call "
    "loss.backward(create_graph=opt.needs_hessian) before opt.step(), or pass a closure, "
    "opt.step(closure), whose plain loss.backward() the optimizer turns into a graph-building one), "
    "or the loss is linear in every parameter: its Hessian is zero and there is no curvature to "
    "estimate (use a first-order optimizer such as torch.optim.AdamW, or curvature='gnb')."
)

_NO_GRAPH_AFTER_CLOSURE = (
    "the closure's backward ran with create_graph=True, yet no gradient carries a graph, so there is "
    "no curvature to estimate. Either the loss is linear in every parameter (its Hessian is zero: use "
    "a first-order optimizer such as torch.optim.AdamW), or the closure computes gradients without "
    "loss.backward() (e.g. torch.autograd.grad, or code that detaches .grad): call loss.backward() "
    "inside the closure."
)

_UNSCALED_AMP = (
    "GradScaler.unscale_(optimizer) was called before a curvature step: the curvature estimate goes "
    "through the scaled graph and the optimizer unscales it together with the gradient, which needs "
    "the scaler to pass the loss scale. Call scaler.step(opt) without unscale_ on steps where "
    "opt.needs_hessian is True (e.g. clip gradients only on the other steps), or use bf16 autocast, "
    "which needs no loss scaling."
)

_FUSED_ATTENTION = (
    "the Hessian estimate went through a fused scaled-dot-product-attention kernel, whose backward "
    "PyTorch cannot differentiate again. Either pass a closure, opt.step(closure) (the optimizer then "
    "runs it under hessopt.second_order_safe()), run the forward pass and "
    "loss.backward(create_graph=True) inside `with hessopt.second_order_safe():`, or use a "
    "first-order curvature source (curvature='gnb' or 'finite_difference')."
)

_PATTERN_MISMATCH = (
    "curvature='finite_difference': the closure's ReLU / leaky-ReLU calls at the perturbed weights differ "
    "from those of the step's own evaluation (data-dependent control flow), so their on/off pattern "
    "could not be kept fixed; the differences are taken of the network as it is, and a unit whose kink "
    "lies within the step adds its gradient's jump divided by the step. Shown once per optimizer."
)

_NEEDS_CLOSURE = (
    "curvature={source!r} needs the closure on curvature steps ({why}): call opt.step(closure) "
    "with the standard closure (zero_grad, forward, loss.backward(), return loss)"
)


class KernelResult(NamedTuple):
    """A kernel's computed, uncommitted step for one parameter group (lists aligned with its params).

    ``deltas[i]`` is ``None`` for a parameter that is not updated (no curvature estimate yet);
    ``moments[j][i]`` are the new moment tensors; the flags say what happened to each estimate.
    """

    deltas: List[Optional[torch.Tensor]]
    moments: List[List[torch.Tensor]]
    took_curvature: List[bool]
    nonfinite: List[bool]
    overflows: List[bool]


@dataclass
class _ClosureRun:
    """What running the closure produced for this step."""

    loss: Any = None
    captures: List[dict] = field(default_factory=list)
    closure: Optional[Callable[[], Any]] = None
    rng_before: Optional[list] = None
    rng_after: Optional[list] = None
    #: the ReLU / leaky-ReLU on/off pattern of the step's own evaluation (sources that re-evaluate)
    activations: List[torch.Tensor] = field(default_factory=list)


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base of :class:`hessopt.AdaHessian` and :class:`hessopt.Sophia` (see the module docstring)."""

    _global_key = "curvature_optimizer"  # optimizer-wide entry: self.state[key]; param_groups[0][key] in state_dict()
    _moment_names: Sequence[str] = ()
    _default_curvature = "hutchinson"
    # GradScaler then hands the loss scale and the overflow flag to step() instead of unscaling
    # p.grad itself: the curvature estimate must be unscaled too, and only the optimizer can.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, defaults: Dict[str, Any], *, update_each: int, n_samples: int,
                 seed: int, distribution: str, curvature: Any, foreach: Optional[bool], distributed: Any,
                 nonfinite: str):
        check_positive_int("update_each", update_each)
        check_positive_int("n_samples", n_samples)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None or a bool, got {type(foreach).__name__}")
        _check_distributed(distributed)
        source = make_curvature(curvature, n_samples, distribution, default=self._default_curvature)
        self.curvature: CurvatureSource = source  # add_param_group checks sharded parameters against it
        super().__init__(params, defaults)  # validates every group through add_param_group
        self.update_each = update_each
        self.seed = seed
        self.foreach = foreach
        self.nonfinite = nonfinite
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._warned: set = set()
        self.state[self._global_key] = _fresh_global(seed)
        self._param_index: Optional[Dict[int, int]] = None
        # Gradient hooks must be in place before the first backward, even if the process group is
        # initialized only after the optimizer is built; they are inert without one.
        self._distributed_mode = distributed
        self._distributed = _make_sync(self)

    # -- subclass interface ----------------------------------------------------------------------

    def _check_group(self, group: Dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _compute(self, group, params, grads, moments, curvature, steps, curvature_updates) -> KernelResult:  # pragma: no cover
        raise NotImplementedError

    # -- public state ----------------------------------------------------------------------------

    @property
    def is_second_order(self) -> bool:
        """Whether curvature steps need ``backward(create_graph=True)`` (timm reads this)."""
        return needs_graph(self.curvature)

    @property
    def needs_curvature(self) -> bool:
        """Whether the next :meth:`step` computes a curvature estimate (whatever the source)."""
        return self._curvature_due()

    @property
    def needs_hessian(self) -> bool:
        """Whether the next :meth:`step`'s backward needs ``create_graph=True``: a curvature step
        with a double-backward source. Explicit loops pass it on:
        ``loss.backward(create_graph=opt.needs_hessian)``."""
        return needs_graph(self.curvature) and self._curvature_due()

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because their loss or gradient was not finite."""
        return int(self.state[self._global_key]["skipped_steps"])

    def _curvature_due(self) -> bool:
        glob = self.state[self._global_key]
        return glob["step"] % self.update_each == 0 or bool(glob["waiting"])

    def _generator(self, device: torch.device) -> torch.Generator:
        """The probe generator for ``device``: seeded with ``seed``, or resumed from a loaded state."""
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            saved = self.state[self._global_key]["generator_states"].pop(str(device), None)
            if saved is not None:
                gen.set_state(saved.cpu())  # set_state takes a CPU ByteTensor for every device type
            self._generators[device] = gen
        return gen

    # -- parameter groups ------------------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group; its hyper-parameters and parameters are checked before anything is stored."""
        group = {**self.defaults, **param_group}
        self._check_group(group)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            _check_parameter(p, type(self).__name__)
            check_sharded_parameter(p, type(self).__name__, self.curvature, needs_graph(self.curvature))
        super().add_param_group({**param_group, "params": params})
        self._param_index = None
        if getattr(self, "_distributed", None) is not None:  # groups added after construction
            self._distributed.watch()

    def _index(self) -> Dict[int, int]:
        """Parameter -> its index in ``state_dict()`` order (all groups, in order)."""
        if self._param_index is None:
            order = (p for g in self.param_groups for p in g["params"])
            self._param_index = {id(p): i for i, p in enumerate(order)}
        return self._param_index

    # -- the explicit form -----------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self):
        """The explicit form for every source: run the forward pass and ``backward()`` inside the
        block, then call :meth:`step` (no closure)::

            with opt.capture():
                loss = F.cross_entropy(model(x), y)
                scaler.scale(loss).backward()   # or loss.backward()
            scaler.step(opt)                    # or opt.step()

        On curvature steps the block does what the closure form does: double-backward sources get a
        graph-building ``backward()`` under :func:`hessopt.second_order_safe`; ``"gnb"`` records the
        cross-entropy logits and keeps their graph for the step. On other steps it does nothing.
        (``"finite_difference"`` evaluates the loss again and needs the closure form.)
        """
        source = self.curvature
        if not self._curvature_due():
            yield
            return
        if needs_graph(source):
            with second_order_safe(), graph_building_backward(create_graph=True):
                yield
        elif source.needs_logits:
            with capture_cross_entropy() as captures, graph_building_backward(create_graph=False, retain_graph=True):
                yield
            self._captured = list(captures)
        else:
            yield

    # -- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One optimization step, all or nothing (see the module docstring).

        Returns the closure's loss, detached: the graph it carried is of no use once the parameters
        have changed, and holding it would keep the forward pass's saved tensors alive.
        """
        due = self._curvature_due()
        rewind = self._generator_snapshot() if due else None
        run = _ClosureRun()
        try:
            run = self._run_closure(closure, due)
            self._step(due, run, closure is not None)
        except BaseException:
            if rewind is not None:
                self._restore_generators(rewind)
            # GradScaler deletes grad_scale/found_inf only after a successful step(); stale ones
            # would be multiplied into the next scaler.step's grad_scale.
            for name in ("grad_scale", "found_inf"):
                self.__dict__.pop(name, None)
            raise
        finally:
            run.captures.clear()  # the captured logits hold the forward graph
            run.activations.clear()
            self._release_graphs()
        loss = run.loss
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    def _run_closure(self, closure, due: bool) -> _ClosureRun:
        """Run the closure; on curvature steps in the way the source needs."""
        captured, self._captured = getattr(self, "_captured", []), []
        if closure is None:
            return _ClosureRun(captures=captured if due else [])
        source = self.curvature
        with torch.enable_grad():
            if due and needs_graph(source):
                with second_order_safe(), graph_building_backward(create_graph=True):
                    return _ClosureRun(loss=closure())
            if due and source.needs_logits:
                with capture_cross_entropy() as captures, graph_building_backward(create_graph=False, retain_graph=True):
                    loss = closure()
                return _ClosureRun(loss=loss, captures=list(captures))
            if due and source.needs_closure:
                devices = self._devices()
                before = _rng_states(devices)
                # the pattern at theta, which the re-evaluations replay (see _gradients_again)
                with frozen_activations() as activations:
                    loss = closure()
                return _ClosureRun(loss=loss, closure=closure, rng_before=before, rng_after=_rng_states(devices),
                                   activations=activations)
            return _ClosureRun(loss=closure())

    def _devices(self) -> List[torch.device]:
        return sorted({p.device for g in self.param_groups for p in g["params"]}, key=str)

    def _entries(self):
        """(group, param) for every parameter that has a gradient this step, validated."""
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue  # unused or frozen: no update, no state
                if p.grad.is_sparse:
                    raise ValueError(
                        f"{type(self).__name__} does not support sparse gradients (e.g. "
                        "nn.Embedding(sparse=True)); use dense gradients (sparse=False)"
                    )
                entries.append((group, p))
        return entries

    def _step(self, due: bool, run: _ClosureRun, has_closure: bool) -> None:
        entries = self._entries()
        found_inf = getattr(self, "found_inf", None)
        if not entries or (found_inf is not None and float(found_inf) > 0):
            return  # nothing to do, or an fp16 overflow: GradScaler lowers the scale, nothing here changes
        params = [p for _, p in entries]
        # FSDP2: the computation runs on the rank-local chunks of the DTensor parameters and gradients
        sharding = sharding_of(params)
        dist_ctx = self._distributed_context()
        graph_grads = dist_ctx.graph_grads(params) if dist_ctx else [p.grad for p in params]
        if due:
            self._check_curvature_inputs(graph_grads, has_closure, run)
        grad_scale = getattr(self, "grad_scale", None)
        inv_scale = None if grad_scale is None else 1.0 / float(grad_scale)
        grads = [local(p.grad.detach()) for p in params]
        if inv_scale is not None:
            grads = torch._foreach_mul(grads, inv_scale)
        if dist_ctx:
            grads = dist_ctx.average_gradients(grads)
        loss = run.loss if isinstance(run.loss, torch.Tensor) and run.loss.numel() == 1 else None
        finite = all(finite_flags([*grads, loss]))
        if sharding is not None:  # one rank's non-finite chunk or loss stops every rank
            finite = sharding.all_true(finite)
        if not finite:
            self._skip_nonfinite(loss)
            return
        if sharding is not None:
            graph_grads = [local(g) for g in graph_grads]
        curvature = self._estimate(params, graph_grads, inv_scale, dist_ctx, run, sharding) if due else None
        results = self._compute_groups(entries, grads, curvature)
        with interrupts_held():
            warn = self._commit(results)
        self._warn_about(*warn)

    def _check_curvature_inputs(self, graph_grads, has_closure: bool, run: _ClosureRun) -> None:
        """Raise before anything changes if this curvature step cannot be computed correctly."""
        source = self.curvature
        name = type(self).__name__
        if needs_graph(source) and not any(g is not None and g.requires_grad for g in graph_grads):
            raise SecondOrderGraphError(_NO_GRAPH_AFTER_CLOSURE if has_closure else _MISSING_GRAPH.format(name=name))
        if source.needs_closure and not has_closure:
            raise ValueError(_NEEDS_CLOSURE.format(source=source, why="it evaluates the gradient again at perturbed weights"))
        if source.needs_logits and not has_closure and not run.captures:
            raise ValueError(_NEEDS_CLOSURE.format(source=source, why="it samples labels from the logits of the closure's cross-entropy call and backpropagates them once") + "; or run the forward pass and backward() inside `with opt.capture():` before opt.step()")
        if (getattr(self, "found_inf", None) is not None and getattr(self, "grad_scale", None) is None
                and source.scaled_by_loss_scale):
            # GradScaler sets found_inf but no grad_scale after unscale_(): the scale is lost for the estimate
            raise ValueError(_UNSCALED_AMP)

    def _skip_nonfinite(self, loss) -> None:
        what = "loss" if loss is not None and not torch.isfinite(loss).all() else "gradient"
        message = (f"{type(self).__name__}: the {what} of this step is not finite (NaN or Inf); the step "
                   "changed nothing (parameters, moments, counters, probe generators)")
        if self.nonfinite == "raise":
            raise NonFiniteError(message + ". Pass nonfinite='skip' to skip such steps and go on.")
        glob = self.state[self._global_key]
        glob["skipped_steps"] += 1
        count = glob["skipped_steps"]
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th, ... skip
            warnings.warn(f"{message}, and was skipped ({count} skipped so far, opt.skipped_steps). "
                          "Pass nonfinite='raise' to stop at the first one.", RuntimeWarning, stacklevel=4)

    def _estimate(self, params, graph_grads, inv_scale, dist_ctx, run: _ClosureRun,
                  sharding: Optional[Sharding] = None) -> List[torch.Tensor]:
        """The unscaled, rank-averaged curvature estimate per parameter (may hold non-finite values;
        rank-local chunks for sharded parameters)."""
        source = self.curvature
        inputs = CurvatureInputs(
            params=params, grads=graph_grads,
            generators={p.device: self._generator(p.device) for p in params},
            captures=run.captures,
            gradients_again=self._gradients_again(run, params) if run.closure is not None else None,
            sharding=sharding,
        )
        try:
            with torch.enable_grad():  # step() runs under no_grad; sources differentiate
                raw = source.estimate(inputs)
        except RuntimeError as err:
            text = str(err)
            if "scaled_dot_product" in text and "not implemented" in text:
                raise RuntimeError(_FUSED_ATTENTION) from err
            raise
        if len(raw) != len(params):
            raise ValueError(f"the curvature source returned {len(raw)} tensors for {len(params)} parameters")
        raw = [r.detach() for r in raw]
        if dist_ctx:
            raw = dist_ctx.average_curvature(params, raw)
        if inv_scale is not None and source.scaled_by_loss_scale:
            raw = torch._foreach_mul(raw, inv_scale)
        return raw

    def _gradients_again(self, run: _ClosureRun, params: List[torch.Tensor]) -> Callable[[], List[torch.Tensor]]:
        """Evaluate the closure again at the current weights, with the step's own random numbers and
        its ReLU / leaky-ReLU on/off pattern (:func:`hessopt._patches.frozen_activations`: a
        difference of gradients across a kink would count the gradient's jump divided by the
        step); return the gradients of ``params`` and put the step's own gradients and RNG back."""

        def evaluate(pattern) -> None:
            _set_rng_states(self._devices(), run.rng_before)
            with torch.enable_grad(), replaying(pattern):
                run.closure()

        def again() -> List[torch.Tensor]:
            kept = [p.grad for p in params]
            devices = self._devices()
            for p in params:
                p.grad = None
            try:
                try:
                    evaluate(run.activations or None)
                except PatternMismatch:
                    # the closure calls its activations differently each time (data-dependent
                    # control flow): differences of the unfrozen network, said once
                    self._warn_once("pattern", _PATTERN_MISMATCH)
                    for p in params:
                        p.grad = None
                    run.activations = []
                    evaluate(None)
                return [torch.zeros_like(local(p)) if p.grad is None else local(p.grad.detach()) for p in params]
            finally:
                for p, g in zip(params, kept):
                    p.grad = g
                _set_rng_states(devices, run.rng_after)

        return again

    def _compute_groups(self, entries, grads, curvature) -> List[tuple]:
        """Run the kernel for every group; nothing is written. Returns (group, indices, states, result)."""
        by_group: Dict[int, List[int]] = {}
        for i, (group, _) in enumerate(entries):
            by_group.setdefault(id(group), []).append(i)
        out = []
        for indices in by_group.values():
            group = entries[indices[0]][0]
            params = [entries[i][1] for i in indices]
            states = [self.state.get(p) or self._fresh_state(p) for p in params]
            # the kernels see plain tensors: a sharded parameter's and its moments' local chunks
            result = self._compute(
                group, [local(p) for p in params], [grads[i] for i in indices],
                [[local(s[name]) for s in states] for name in self._moment_names],
                None if curvature is None else [curvature[i] for i in indices],
                [s["step"] for s in states], [s["curvature_updates"] for s in states],
            )
            out.append((group, params, states, result))
        return out

    def _commit(self, results):
        """Write the computed step: parameters (all or nothing), then moments and counters (plain assignments)."""
        moved = [(local(p), d) for _, params, _, r in results for p, d in zip(params, r.deltas) if d is not None]
        if moved:
            commit_parameter_updates([p for p, _ in moved], [d for _, d in moved])
        glob = self.state[self._global_key]
        index = self._index()
        t = glob["step"]
        nonfinite, overflows = [], []
        for group, params, states, r in results:
            for i, (p, state) in enumerate(zip(params, states)):
                for name, values in zip(self._moment_names, r.moments):
                    state[name] = like(values[i], p)  # a DTensor again for a sharded parameter
                state["curvature_updates"] += int(r.took_curvature[i])
                state["step"] += int(r.deltas[i] is not None)
                state["nonfinite_curvature"] += int(r.nonfinite[i])
                state["curvature_overflows"] += int(r.overflows[i])
                self.state[p] = state
                if state["curvature_updates"] == 0:
                    glob["waiting"][index[id(p)]] = t
                else:
                    glob["waiting"].pop(index[id(p)], None)
                if r.nonfinite[i]:
                    nonfinite.append(p)
                if r.overflows[i]:
                    overflows.append(p)
        glob["step"] = t + 1
        glob["waiting"] = {i: s for i, s in glob["waiting"].items() if t + 1 - s <= self.update_each}
        return nonfinite, overflows

    def _warn_about(self, nonfinite, overflows) -> None:
        """Warnings for the committed step (after the commit: a warning turned into an error must not cut it)."""
        name = type(self).__name__
        if nonfinite:
            self._warn_once("nonfinite", f"{name}: the curvature estimate of a parameter of shape "
                            f"{tuple(nonfinite[0].shape)} is not finite; its curvature update is skipped (counted in "
                            "state[p]['nonfinite_curvature']). Shown once per optimizer.")
        if overflows:
            self._warn_once("overflow", f"{name}: the curvature estimate of a parameter of shape "
                            f"{tuple(overflows[0].shape)} is so large that its square overflows "
                            f"{overflows[0].dtype}; it was clipped to the largest safe value (counted in "
                            "state[p]['curvature_overflows']). Check the initialization or the learning rate. "
                            "Shown once per optimizer.")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=5)

    def _fresh_state(self, p: torch.Tensor) -> Dict[str, Any]:
        """A new parameter's state (inserted into ``self.state`` only when the step commits)."""
        state: Dict[str, Any] = dict(step=0, curvature_updates=0, nonfinite_curvature=0, curvature_overflows=0)
        for name in self._moment_names:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _multi_tensor(self, params) -> bool:
        """Whether to use the multi-tensor kernels (``foreach``; default: all parameters on CUDA)."""
        return self.foreach if self.foreach is not None else all(p.is_cuda for p in params)

    # -- generators ------------------------------------------------------------------------------

    def _generator_snapshot(self):
        glob = self.state[self._global_key]
        return ({d: g.get_state() for d, g in self._generators.items()}, dict(glob["generator_states"]))

    def _restore_generators(self, snapshot) -> None:
        live, loaded = snapshot
        self._generators = {d: g for d, g in self._generators.items() if d in live}
        for d, s in live.items():
            self._generators[d].set_state(s)
        self.state[self._global_key]["generator_states"] = loaded

    # -- state dicts and copies ------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """``torch.optim`` state dict. ``state`` holds the per-parameter tensors (by parameter index,
        as torch does); the optimizer-wide entry (:meth:`global_state_snapshot`) goes into the first
        parameter group under the optimizer's key (``"adahessian"``, ``"sophia"``): in ``state`` its
        string key would break tools that map every state key to a parameter name
        (``torch.distributed.checkpoint.state_dict``, FSDP). With sharded (FSDP2) parameters the
        dict is complete from the start (zero states for parameters not stepped yet, every device's
        probe generator), since ``torch.distributed.checkpoint.load`` fills only the entries the
        resuming optimizer's dict already has."""
        params = [p for g in self.param_groups for p in g["params"]]
        sharded = any(is_dtensor(p) for p in params)
        if sharded:  # every device's generator is in the dict (see below)
            for device in self._devices():
                self._generator(device)
        state_dict = super().state_dict()
        state_dict["state"].pop(self._global_key, None)
        if sharded:
            # torch.distributed.checkpoint loads *into* the state dict of the resuming optimizer, so
            # a fresh one must already hold every tensor: the state a parameter gets at its first
            # step (zero moments, zero counters: loading it changes nothing) and every generator.
            for i, p in enumerate(params):
                if p.requires_grad and i not in state_dict["state"]:
                    state_dict["state"][i] = self._fresh_state(p)
        state_dict["param_groups"][0][self._global_key] = self.global_state_snapshot()
        return state_dict

    def global_state_snapshot(self) -> Dict[str, Any]:
        """A copy of the optimizer-wide state: ``step``, ``seed``, ``generator_states`` (per device,
        live or loaded), ``waiting`` (parameters still without an estimate: index -> step of their
        last gradient) and ``skipped_steps``; what :meth:`state_dict` saves beside the per-parameter
        state, and what the ranks compare under ``torch.distributed``."""
        glob = self.state[self._global_key]
        generator_states = {k: v.clone() for k, v in glob["generator_states"].items()}
        generator_states.update({str(d): g.get_state() for d, g in self._generators.items()})
        return {"step": glob["step"], "seed": self.seed, "generator_states": generator_states,
                "waiting": [[i, s] for i, s in sorted(glob["waiting"].items())], "skipped_steps": glob["skipped_steps"]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`; the run then continues bit-identically,
        with the saved seed and probe streams (whatever ``seed`` this optimizer was built with).
        Everything is checked before anything is changed."""
        name = type(self).__name__
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        glob = groups[0].get(self._global_key) if groups and isinstance(groups[0], dict) else None
        if not isinstance(glob, dict) or not {"step", "generator_states", "waiting"} <= set(glob):
            raise ValueError(
                f"this state_dict was not saved by hessopt.{name} (param_groups[0] has no "
                f"{self._global_key!r} entry); load it into the optimizer type that saved it"
            )
        self._check_loaded_shapes(state_dict)
        plain = dict(state_dict)
        plain["param_groups"] = [{k: v for k, v in g.items() if k != self._global_key} for g in groups]
        for g in plain["param_groups"]:
            self._check_group({**self.defaults, **g})
        super().load_state_dict(plain)
        # A private copy: the step counter of two optimizers loaded from one dict must not be shared.
        self.seed = int(glob.get("seed", self.seed))
        self.state[self._global_key] = {
            "step": int(glob["step"]),
            "seed": self.seed,
            "generator_states": {k: v.detach().cpu().clone() for k, v in glob["generator_states"].items()},
            "waiting": {int(i): int(s) for i, s in glob["waiting"]},
            "skipped_steps": int(glob.get("skipped_steps", 0)),
        }
        self._generators = {}  # rebuilt from the loaded states on first use
        if getattr(self, "_distributed", None) is not None:
            self._distributed.recheck()  # the loaded seed must agree across ranks too

    def _check_loaded_shapes(self, state_dict: Dict[str, Any]) -> None:
        """Refuse a state whose moments do not match the parameters' shapes (torch checks only counts)."""
        params = [p for g in self.param_groups for p in g["params"]]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError("the loaded state dict has a different number of parameter groups or of parameters per group")
        ids = [i for s in saved_groups for i in s["params"]]
        by_id = dict(zip(ids, params))
        for key, pstate in state_dict.get("state", {}).items():
            p = by_id.get(key)
            if p is None or not isinstance(pstate, dict):
                continue
            for name in self._moment_names:
                t = pstate.get(name)
                if t is None:
                    raise ValueError(f"the loaded state of parameter {key} has no {name!r}: it was not saved by hessopt.{type(self).__name__}")
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"the loaded {name!r} of parameter {key} has shape {tuple(t.shape)}, but the "
                                     f"parameter has shape {tuple(p.shape)}: the state dict belongs to another model")

    def _copy_state(self) -> Dict[str, Any]:
        """What a copy needs: every attribute but the transient ones and torch's hook registries
        (so a new option can never be silently lost), plus the probe generators as states (a copy
        continues the same probe stream, independently)."""
        state = super().__getstate__()
        for key, value in self.__dict__.items():
            if key in state or key in _TRANSIENT or key.startswith("_optimizer_") or key == "_zero_grad_profile_name":
                continue
            state[key] = value
        state[_PICKLED_GENERATORS] = {str(d): g.get_state() for d, g in self._generators.items()}
        return state

    def __getstate__(self) -> Dict[str, Any]:
        """For pickling (see :meth:`_copy_state`). A ``ProcessGroup`` passed as ``distributed=``
        cannot leave its process: save ``state_dict()`` instead."""
        if not (self._distributed_mode is None or isinstance(self._distributed_mode, bool)):
            raise TypeError(
                f"this {type(self).__name__} was built with distributed=<a ProcessGroup>, which cannot be "
                "pickled (a process group does not travel between processes). Save opt.state_dict() "
                "instead: it holds everything a resumed run needs, and loads into an optimizer built on "
                "the new group"
            )
        return self._copy_state()

    def __deepcopy__(self, memo: Dict[int, Any]) -> "CurvatureOptimizer":
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
            glob = self.state[self._global_key]
            glob["generator_states"] = {**glob["generator_states"], **live}
            self._generators = {}
            self._param_index = None
            self._distributed = _make_sync(self)

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


def _fresh_global(seed: int) -> Dict[str, Any]:
    return {"step": 0, "seed": seed, "generator_states": {}, "waiting": {}, "skipped_steps": 0}


def _check_parameter(p: Any, name: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} got a {type(p).__name__} among the parameters; pass tensors (model.parameters())")
    if p.is_complex():
        raise TypeError(
            f"{name} does not support complex parameters (shape {tuple(p.shape)}, {p.dtype}): the "
            "Hessian diagonal of a real loss in complex coordinates is not defined by these estimators. "
            "Optimize torch.view_as_real(p) as a real parameter instead"
        )
    if p.layout != torch.strided:
        raise TypeError(f"{name} supports dense (strided) parameters only, got layout {p.layout}")


def _rng_states(devices: Sequence[torch.device]) -> list:
    """The global RNG states that a closure may use (CPU, and each CUDA device of the parameters)."""
    states = [torch.get_rng_state()]
    for d in devices:
        if d.type == "cuda":
            states.append(torch.cuda.get_rng_state(d))
    return states


def _set_rng_states(devices: Sequence[torch.device], states: list) -> None:
    torch.set_rng_state(states[0])
    cuda = [d for d in devices if d.type == "cuda"]
    for d, s in zip(cuda, states[1:]):
        torch.cuda.set_rng_state(s, d)


def _make_sync(optimizer: CurvatureOptimizer):
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
