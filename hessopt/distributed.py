"""``torch.distributed`` helpers shared by the optimizer and the operators.

hessopt's distributed design (see ``docs/distributed.md``): every rank draws the same random probes
(identical seeded generators, checked once), and the per-rank curvature quantities (``z * Hz`` in
the optimizer, HVPs in :class:`hessopt.HessianOperator`) are summed or averaged with one
``all_reduce`` per dtype, so that every rank holds the full-data answer.

* :class:`OptimizerSync` is what :class:`hessopt.AdaHessian` uses under
  ``DistributedDataParallel`` (DDP): gradient hooks that keep the graph-carrying local gradient
  for the Hessian-vector product and hand DDP a plain one, the all-reduce of ``z * Hz``, and a
  one-time check that all ranks run the same optimizer on the same parameters.
* :class:`OperatorSync` is the operators' protocol (sample-weighted sums over ranks, failures
  raised on every rank, the check that all ranks multiplied the same vector).
* :func:`ranks_disagree_on` / :func:`agreement_stats` are the one rank-agreement check (float64
  checksums summed over ranks): the operators' vectors use it inside their reduction.
* :func:`all_reduce_sum` packs a list of tensors into one buffer per (dtype, device) and sums it
  over ranks with a single collective; :func:`broadcast_object` is rank 0's Python object on
  every rank (the estimators' probe seeds).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = [
    "is_initialized",
    "is_distributed",
    "world_size",
    "all_reduce_sum",
    "broadcast_object",
    "unwrap_data_parallel",
    "agreement_stats",
    "disagreeing",
    "ranks_disagree_on",
    "OperatorSync",
    "DistributedOperatorError",
    "OptimizerSync",
]


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` default process group is initialized (any number of processes)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one process is initialized."""
    import torch.distributed as dist

    return is_initialized() and dist.get_world_size() > 1


def world_size(group: Any = None) -> int:
    """The number of processes of ``group`` (default: the default group; 1 without one)."""
    return torch.distributed.get_world_size(group) if is_initialized() else 1


def all_reduce_sum(tensors: Sequence[torch.Tensor], group: Any = None) -> List[torch.Tensor]:
    """Sum each tensor over the ranks of ``group`` (default: all); returns new tensors.

    The tensors are packed into one flat buffer per (dtype, device), so a list of any length costs
    one collective per dtype, not one per tensor. The sums are returned as views of that buffer,
    never written into a temporary the caller cannot see (``dist.all_reduce(x / n)`` reduces the
    temporary ``x / n`` and leaves ``x`` as it was: a silent no-op). The inputs are not modified.
    Without a process group of more than one process the tensors are returned as they are.
    """
    out: List[torch.Tensor] = list(tensors)
    if world_size(group) == 1:
        return out
    import torch.distributed as dist

    by_kind: Dict[Any, List[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.dtype, t.device), []).append(i)
    for indices in by_kind.values():
        buffer = torch.cat([tensors[i].reshape(-1) for i in indices])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for i in indices:
            n = tensors[i].numel()
            out[i] = buffer[offset : offset + n].view_as(tensors[i])
            offset += n
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as held by rank ``src``, on every rank (``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap_data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (``model`` otherwise).

    Hessian-vector products must not run through DDP's forward: DDP then expects a gradient
    reduction that ``torch.autograd.grad`` never triggers, and the next training forward fails.
    The wrapped module has the same parameters, so nothing is lost by unwrapping.
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


# --------------------------------------------------------------------------------------------------
# The one rank-agreement check: do all ranks hold the same tensors?
# --------------------------------------------------------------------------------------------------

#: entries per tensor in :func:`agreement_stats`
_STATS_PER_TENSOR = 5


def agreement_stats(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Float64 checksums of each tensor, to be *summed* over ranks and read by :func:`disagreeing`.

    Per tensor: its sum and a ramp-weighted sum (so that a permutation or a sign flip of entries is
    seen), their squares, and its l1 norm (the scale of the tolerance). Summed over ranks, a sum and
    its square give the checksum's spread across ranks, so one ``all_reduce`` (which can carry other
    numbers in the same buffer) tells every rank whether the ranks agree: no object gather, and every
    rank reaches the same verdict, so all raise together and none is left waiting in a collective.
    """
    rows = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        if not flat.is_floating_point():
            flat = flat.double()
        ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=flat.dtype, device=flat.device)
        sums = torch.stack([flat.sum(dtype=torch.float64), (flat * ramp).sum(dtype=torch.float64)])
        scale = torch.linalg.vector_norm(flat, 1, dtype=torch.float64).reshape(1)
        rows.append(torch.cat([sums, sums * sums, scale]))
    if not rows:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(rows)


def disagreeing(reduced: Sequence[float], world: int) -> List[int]:
    """Indices of the tensors whose :func:`agreement_stats`, summed over ``world`` ranks, differ.

    Identical tensors leave a spread of rounding size (about 1e-8 of a checksum, from cancellation
    in ``E[s^2] - E[s]^2``); tensors that differ by less than about 1e-6 of a checksum pass
    (summation-order differences between unlike machines).
    """
    values = list(reduced)
    out = []
    for index in range(len(values) // _STATS_PER_TENSOR):
        s = values[index * _STATS_PER_TENSOR : (index + 1) * _STATS_PER_TENSOR]
        scale = s[4] / world
        for total_sum, total_sq in ((s[0], s[2]), (s[1], s[3])):
            mean = total_sum / world
            spread = max(total_sq / world - mean * mean, 0.0) ** 0.5
            if spread > 1e-6 * abs(mean) + 1e-9 * scale:
                out.append(index)
                break
    return out


def ranks_disagree_on(tensors: Sequence[torch.Tensor], group: Any = None) -> List[int]:
    """Indices of ``tensors`` that are not the same on every rank of ``group`` (one ``all_reduce``).

    The same answer on every rank (so that all of them can raise together). ``[]`` without a
    process group of more than one process.
    """
    world = world_size(group)
    if world == 1 or not tensors:
        return []
    stats = agreement_stats(tensors).to(tensors[0].device)
    (reduced,) = all_reduce_sum([stats], group)
    return disagreeing(reduced.tolist(), world)


# --------------------------------------------------------------------------------------------------
# The operators' protocol: sample-weighted sums over ranks, failures raised on every rank
# --------------------------------------------------------------------------------------------------


class DistributedOperatorError(RuntimeError):
    """Another rank failed while computing its share of a distributed operator's product."""


class OperatorSync:
    """How a model-based operator (:class:`hessopt.HessianOperator`, :class:`hessopt.GGNOperator`,
    :class:`hessopt.EmpiricalFisherOperator`) averages over the ranks of ``torch.distributed``.

    Each rank computes the sample-weighted sum of its batches' products (or gradients, or losses)
    and its number of samples; one ``all_reduce`` per dtype sums both, and the operator divides:
    the full-data average, whatever the shard sizes (an empty shard weighs 0). The float64 buffer
    that carries the count also carries a failure flag and, for products, the checksums of the
    vector (:func:`agreement_stats`), so every rank learns in the same collective whether some rank
    failed or multiplied another vector, and all of them raise together.

    ``enabled``: ``None`` (active when a process group of more than one process is initialized),
    ``True`` (required: raises without a process group), ``False`` (this process's data only).
    """

    def __init__(self, enabled: Optional[bool], name: str = "operator"):
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"distributed must be None, True or False, got {enabled!r}")
        self.enabled = enabled
        self.name = name

    @property
    def active(self) -> bool:
        initialized = is_initialized()
        if self.enabled is None:
            return initialized and torch.distributed.get_world_size() > 1
        if self.enabled and not initialized:
            raise ValueError(
                "distributed=True but no torch.distributed process group is initialized: call "
                "torch.distributed.init_process_group first (or launch with torchrun)"
            )
        return bool(self.enabled)

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's seed on every rank, so that all ranks draw the same random probes."""
        return broadcast_object(seed, src=0) if self.active else seed

    def local_then_reduce(self, accumulate, total: torch.Tensor, v: Optional[torch.Tensor] = None):
        """``accumulate(total)`` (adds this rank's sample-weighted sum into the zeroed ``total`` and
        returns its sample count), then :meth:`reduce`; returns ``(total, count)``.

        Distributed, an error in this rank's share is not raised at once: the other ranks would
        wait forever in the collective. The rank joins the reduction with a zeroed ``total`` and a
        failure flag instead, and then every rank raises: the failing ranks their own error, the
        others a :class:`DistributedOperatorError` that names the failing ranks and quotes them."""
        if not self.active:
            return total, accumulate(total)
        failure: Optional[BaseException] = None
        try:
            count = accumulate(total)
        except Exception as err:  # noqa: BLE001 - re-raised below, after the collective
            total.zero_()  # a partial sum must not reach the other ranks
            count, failure = 0.0, err
        return self.reduce(total, count, v, failure)

    def reduce(self, total: torch.Tensor, count: float, v: Optional[torch.Tensor] = None,
               failure: Optional[BaseException] = None):
        """Sum ``total`` and ``count`` over ranks (one collective per dtype); see the class docstring.
        A sample count of zero over all ranks (every shard empty) raises on every rank."""
        if not self.active:
            return total, count
        import torch.distributed as dist

        head = torch.tensor([float(count), float(failure is not None)], dtype=torch.float64, device=total.device)
        stats = [head] if v is None else [head, agreement_stats([v]).to(total.device)]
        total, reduced = all_reduce_sum([total, torch.cat(stats)])
        values = reduced.tolist()
        if values[1] > 0:
            self._raise_rank_failures(failure)
        if values[0] == 0:
            raise ValueError(
                "data is empty on every rank: pass at least one (inputs, targets) batch on some rank"
            )
        if v is not None and disagreeing(values[2:], dist.get_world_size()):
            raise ValueError(
                f"the ranks multiplied this distributed {self.name} by different vectors; "
                "its product sums the ranks' products, so every rank must pass the same vector. "
                "Use generator=None or an int seed in the estimators (rank 0's seed is "
                "broadcast), seed an explicit torch.Generator alike on every rank, pass "
                "identical probes=, or use distributed=False for a per-rank operator"
            )
        return total, values[0]

    def _raise_rank_failures(self, failure: Optional[BaseException]) -> None:
        """Every rank raises after a failure anywhere: the failing ranks their own error, the others a
        :class:`DistributedOperatorError` quoting them (gathered once, on this rare path only)."""
        import torch.distributed as dist

        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        reports: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(reports, mine)
        if failure is not None:
            raise failure
        failed = {rank: text for rank, text in enumerate(reports) if text is not None}
        raise DistributedOperatorError(
            f"rank(s) {sorted(failed)} failed while computing their share of this distributed "
            f"{self.name}'s product, so this rank stops too (no rank is left waiting): "
            + "; ".join(f"rank {r}: {text}" for r, text in failed.items())
        )


_SEEDS_DIFFER = (
    "AdaHessian was built with different seeds on different ranks ({seeds}): the ranks would draw "
    "different probes and their curvature estimates would not average to the full batch's. Pass "
    "the same seed= on every rank (e.g. a seed from the command line, not one derived from the rank)."
)
_OPTIONS_DIFFER = (
    "AdaHessian has different {name} on different ranks ({values}): the ranks would estimate the "
    "Hessian at different steps (or with different probes) and their all-reduces would not match. "
    "Build the optimizer with the same arguments on every rank."
)
_STATE_DIFFERS = (
    "AdaHessian's state differs between ranks (step counts {steps}, or the probe generators' "
    "states): e.g. a checkpoint's optimizer state was loaded on some ranks only. Load the same "
    "state dict on every rank (a state dict saved on rank 0 is the same for all ranks)."
)
_PARAMS_DIFFER = (
    "AdaHessian got different parameter lists on different ranks (rank {rank} has {theirs} tensors "
    "of shapes {their_shapes}, rank 0 has {mine} of shapes {my_shapes}): build the optimizer from "
    "the same model, with the same parameter groups in the same order, on every rank."
)
_VALUES_DIFFER = (
    "the optimizer's parameters differ between ranks at the first step (parameter "
    "{index}, shape {shape}): the ranks are not training one replicated model. Wrap the model in "
    "DistributedDataParallel (it broadcasts rank 0's parameters when it is built) or initialize it "
    "with the same seed on every rank; to run independent optimizers per rank, pass "
    "AdaHessian(..., distributed=False)."
)
_NO_GROUP_UNDER_LAUNCHER = (
    "AdaHessian: this process was started by a launcher for {world} processes (WORLD_SIZE={world}) "
    "but no torch.distributed process group is initialized, so each process trains on its own data "
    "with its own steps. Call torch.distributed.init_process_group and wrap the model in "
    "DistributedDataParallel, or pass AdaHessian(..., distributed=False) if independent processes "
    "are intended. (Shown once.)"
)
_NO_GROUP = (
    "AdaHessian(distributed=True) but no torch.distributed process group is initialized: call "
    "torch.distributed.init_process_group (torchrun sets the environment it reads) before the first "
    "step, or leave distributed=None."
)


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # older torch
        return False
    return isinstance(p, DTensor)


def _launched_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (and torch.distributed.launch, SLURM wrappers), else 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _optimizer_state_digest(opt) -> tuple:
    """The optimizer's step count and a digest of its probe generators' states (live or loaded)."""
    import hashlib

    glob = opt.global_state_snapshot()
    digest = hashlib.sha256()
    for name, state in sorted(glob.get("generator_states", {}).items()):
        digest.update(name.encode())
        digest.update(bytes(state.cpu().to(torch.uint8).tolist()))  # no numpy: not a dependency
    return (glob.get("step", 0), digest.hexdigest())


class OptimizerSync:
    """What :class:`hessopt.AdaHessian` needs to run under ``torch.distributed`` with unchanged user code.

    **Gradients.** DistributedDataParallel cannot handle gradients that carry a graph: its reducer
    divides them in place and fails with "a leaf Variable that requires grad is being used in an
    in-place operation" (PyTorch issue 63929), and it would not synchronize grad-of-grad anyway. A
    pre-hook on each parameter's gradient accumulator (``AccumulateGrad`` node) sees the incoming
    gradient of a ``backward(create_graph=True)`` before it is accumulated into ``p.grad`` and
    before DDP's reducer, which runs after accumulation: the hook keeps the local, graph-carrying
    gradient for the optimizer's HVP and passes a detached copy on, so DDP averages plain
    gradients into ``p.grad`` as it does for any optimizer. Being on the accumulator (not a tensor
    hook), it does not fire for ``torch.autograd.grad`` calls on the same parameters (a
    :class:`hessopt.HessianOperator` or a :class:`hessopt.CurvatureMonitor` during training).

    **Accumulation.** Several backwards before one step (gradient accumulation, with or without
    ``DDP.no_sync()``) add up the kept gradients, exactly as autograd adds up ``p.grad``; the sum
    restarts when ``p.grad`` is ``None`` at a backward (after ``zero_grad()``, the default
    ``set_to_none=True``) and after every step.

    **Curvature.** On a Hessian step every rank draws the same probes ``z`` (same seed, checked
    once) and computes ``z * H_r z`` with ``H_r`` the Hessian of its own loss; the average over
    ranks (one ``all_reduce`` per dtype, :func:`all_reduce_sum`) is ``z * H z`` for the Hessian of
    the rank-averaged loss, the loss whose gradient DDP averages. So every rank takes the same step,
    equal to one process on the union of the ranks' batches when the shards have equal size.

    **Checks.** At the first step with more than one process, the ranks compare (one
    ``all_gather_object``) the seed, ``update_each``, the curvature source, the step count and the
    probe generators' states, the parameter shapes and float64 checksums of the parameter values;
    any difference raises a ``ValueError`` on every rank (rather than a hang or a silent
    divergence). They are compared again at the first step after :meth:`AdaHessian.load_state_dict`.

    **FSDP2.** With sharded DTensor parameters (``fully_shard``) only first-order sources are
    accepted (:meth:`watch` raises a ``TypeError`` naming ``"gnb"`` and ``"finite_difference"``);
    the gradients and curvature estimates of the shards are already rank averages (FSDP's
    reduce-scatter) and are not averaged again, and the first-step check compares everything but
    the values of the shards (see ``hessopt._sharded``).

    **When.** ``enabled=None`` (the optimizer's ``distributed=None``): active whenever a default
    process group is initialized at the time of a backward or step, with any number of processes
    (DDP with one process has the same in-place problem); the curvature is averaged over all
    processes. The hooks are installed when the optimizer is built and cost one Python call per
    parameter per backward while inactive, so an optimizer built before ``init_process_group``
    still works. ``enabled=True``: like ``None``, but a step without a process group raises.
    ``enabled=<ProcessGroup>``: average over that group, the one given to DDP as
    ``process_group=`` (e.g. the data-parallel group of a job that also shards the model another
    way). The optimizer passes ``distributed=False`` as no ``OptimizerSync`` at all.
    """

    def __init__(self, optimizer, enabled: Any = None):
        self.enabled = enabled
        self.group = None if enabled is None or isinstance(enabled, bool) else enabled
        self._optimizer = optimizer
        self._kept: Dict[int, torch.Tensor] = {}
        self._hooked: Dict[int, Any] = {}  # id(p) -> (accumulator node, hook handle)
        self._checked = False
        self._warned = False
        self.watch()

    # -- hooks -------------------------------------------------------------------------------------

    def _params(self) -> List[torch.Tensor]:
        return [p for group in self._optimizer.param_groups for p in group["params"]]

    def watch(self) -> None:
        """Install the gradient hook on every parameter that does not have one yet (new groups)."""
        for p in self._params():
            if id(p) in self._hooked or not p.requires_grad:
                continue
            if _is_dtensor(p) and getattr(self._optimizer.curvature, "needs_graph", True):
                from ._sharded import check_sharded_parameter

                # raises a TypeError naming the first-order sources that do work under FSDP2
                check_sharded_parameter(p, type(self._optimizer).__name__, self._optimizer.curvature, True)
            # Holding the node keeps it the parameter's accumulator for every later graph
            # (autograd keeps only a weak reference to it), as DDP's reducer does.
            node = torch.autograd.graph.get_gradient_edge(p).node
            self._hooked[id(p)] = (node, node.register_prehook(self._make_hook(p)))

    @property
    def active(self) -> bool:
        """Whether the hooks act now: not disabled and a default process group is initialized."""
        return self.enabled is not False and is_initialized()

    def _make_hook(self, p: torch.Tensor):
        key = id(p)

        def keep_graph_gradient(grad_outputs):
            grad = grad_outputs[0]
            if grad is None or not grad.requires_grad or not self.active:
                return None  # a plain backward, or not distributed: autograd and DDP as usual
            previous = None if p.grad is None else self._kept.get(key)
            self._kept[key] = grad if previous is None else previous + grad
            return (grad.detach(),)

        return keep_graph_gradient

    def remove(self) -> None:
        """Remove all hooks (the optimizer then behaves as with ``distributed=False``)."""
        for _, handle in self._hooked.values():
            handle.remove()
        self._hooked = {}
        self._kept.clear()

    # -- the step ----------------------------------------------------------------------------------

    def for_step(self) -> Optional["OptimizerSync"]:
        """``self`` when this step is distributed, ``None`` otherwise (raises if required and absent)."""
        if self.active:
            return self
        if self.enabled:
            raise ValueError(_NO_GROUP)
        if self.enabled is None and not self._warned and _launched_world_size() > 1:
            self._warned = True
            warnings.warn(_NO_GROUP_UNDER_LAUNCHER.format(world=_launched_world_size()), RuntimeWarning, stacklevel=5)
        return None

    def recheck(self) -> None:
        """Compare the ranks again at the next step (after loading a state dict)."""
        self._checked = False

    def _check_consistency(self) -> None:
        """Once: seed, options, parameter shapes and values must agree on all ranks."""
        import torch.distributed as dist

        world = dist.get_world_size(self.group)
        if world == 1:
            self._checked = True
            return
        opt = self._optimizer
        params = self._params()
        mine = {
            "seed": opt.seed,
            "update_each": opt.update_each,
            "curvature": repr(opt.curvature),
            "state": _optimizer_state_digest(opt),
            "shapes": [tuple(p.shape) for p in params],
        }
        everyone: List[Any] = [None] * world
        dist.all_gather_object(everyone, mine, group=self.group)
        seeds = [e["seed"] for e in everyone]
        if len(set(seeds)) > 1:
            raise ValueError(_SEEDS_DIFFER.format(seeds=seeds))
        for name in ("update_each", "curvature"):
            values = [e[name] for e in everyone]
            if len(set(values)) > 1:
                raise ValueError(_OPTIONS_DIFFER.format(name=name, values=values))
        states = [e["state"] for e in everyone]
        if any(state != states[0] for state in states):
            raise ValueError(_STATE_DIFFERS.format(steps=[state[0] for state in states]))
        first = everyone[0]
        for rank, e in enumerate(everyone):
            if e["shapes"] != first["shapes"]:
                raise ValueError(_PARAMS_DIFFER.format(
                    rank=rank, theirs=len(e["shapes"]), their_shapes=e["shapes"][:8],
                    mine=len(first["shapes"]), my_shapes=first["shapes"][:8]))
        # the one rank-agreement check of the package (a shard holds its own chunk: nothing to compare)
        plain = [i for i, p in enumerate(params) if not _is_dtensor(p)]
        differ = ranks_disagree_on([params[i].detach() for i in plain], self.group)
        if differ:
            index = plain[differ[0]]
            raise ValueError(_VALUES_DIFFER.format(index=index, shape=tuple(params[index].shape)))
        self._checked = True  # only once passed: after an error, the next step checks again

    def graph_grads(self, params: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """The gradients with their graph (kept by the hooks), else ``p.grad``; checks the ranks once."""
        if not self._checked:
            self._check_consistency()
        return [self._kept.get(id(p), p.grad) for p in params]

    def average_gradients(self, grads: List[torch.Tensor]) -> List[torch.Tensor]:
        """The gradients as they are: DDP (or the user) has averaged ``p.grad`` over ranks already."""
        return grads

    def average_curvature(
        self, params: Sequence[torch.Tensor], estimates: Sequence[torch.Tensor]
    ) -> List[torch.Tensor]:
        """The rank average of the per-parameter estimates, with one ``all_reduce`` per dtype.

        The buffer covers every parameter of the optimizer in a fixed order (zeros for those without
        a gradient on this rank), so ranks whose sets of gradients differ still exchange buffers of
        one layout instead of hanging on mismatched sizes.

        Sharded (FSDP2 DTensor) parameters are left out and their estimates returned as they are:
        they are this rank's chunks, computed from gradients that FSDP's reduce-scatter has already
        averaged over the ranks (finite differences of averaged gradients; Gauss-Newton-Bartlett
        from the averaged gradient of the sampled loss), and the other ranks hold other chunks.
        """
        import torch.distributed as dist

        world = dist.get_world_size(self.group)
        if world == 1:
            return list(estimates)
        given = {id(p): e for p, e in zip(params, estimates)}
        every = [p for p in self._params() if (p.requires_grad or id(p) in given) and not _is_dtensor(p)]
        if not every:
            return list(estimates)
        full = [given[id(p)] if id(p) in given else torch.zeros_like(p) for p in every]
        summed = dict(zip((id(p) for p in every), all_reduce_sum(full, self.group)))
        return [given[id(p)] if _is_dtensor(p) else summed[id(p)] / world for p in params]

    def clear(self) -> None:
        """Forget the kept gradients (after a step, at ``zero_grad``)."""
        self._kept.clear()
