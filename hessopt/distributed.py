"""``torch.distributed`` helpers shared by the optimizer and the operators.

hessopt's distributed design (see DESIGN.md): every rank draws the same random probes (identical
seeded generators, checked once), and the per-rank curvature quantities (``z * Hz`` in the
optimizer, HVPs in :class:`hessopt.HessianOperator`) are summed or averaged with one
``all_reduce`` so that every rank holds the full-data answer.
"""
from __future__ import annotations

from typing import Any, List, Sequence

import torch

__all__ = ["is_distributed", "world_size", "all_reduce_sum", "broadcast_object", "OptimizerSync"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one process is initialized."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Sum each tensor over all ranks with a single flattened ``all_reduce``; returns new tensors.

    The tensors are packed into one buffer per dtype (one collective instead of one per tensor) and
    the results are returned, never written into a temporary that the caller cannot see (the
    ``dist.all_reduce(x / n)`` pitfall).
    """
    import torch.distributed as dist

    out: List[torch.Tensor] = list(tensors)
    by_dtype: dict = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault((t.dtype, t.device), []).append(i)
    for indices in by_dtype.values():
        buffer = torch.cat([tensors[i].reshape(-1) for i in indices])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        offset = 0
        for i in indices:
            n = tensors[i].numel()
            out[i] = buffer[offset : offset + n].view_as(tensors[i])
            offset += n
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as held by rank ``src``, on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class OptimizerSync:
    """What :class:`hessopt.AdaHessian` needs to run under ``torch.distributed`` with unchanged user code.

    DistributedDataParallel cannot handle gradients that carry a graph (its reducer divides them
    in place and fails with "a leaf Variable that requires grad is being used in an in-place
    operation"; PyTorch issue 63929). A tensor hook on every parameter sees the incoming gradient
    before DDP's reducer and ``AccumulateGrad`` do: on a graph-building backward it keeps the local,
    graph-carrying gradient for the optimizer's HVP and passes a detached copy on, so DDP averages
    plain gradients into ``p.grad`` as usual. Gradient accumulation (several backwards, e.g. under
    ``no_sync()``) sums the kept gradients, matching what DDP accumulates in ``p.grad``.

    On a Hessian step every rank draws the same probes ``z`` (same seed, checked across ranks once)
    and computes ``z * H_local z`` on its own data; the average over ranks (one ``all_reduce``) is
    ``z * H z`` of the global batch for equal shards, so every rank takes the same step.
    """

    def __init__(self, optimizer):
        import torch.distributed as dist

        self._world = dist.get_world_size()
        self._seed = optimizer.seed
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._kept: dict = {}
        self._checked = False
        self._handles = [
            p.register_hook(self._make_hook(p)) for p in self._params if p.requires_grad
        ]

    def _make_hook(self, p):
        key = id(p)

        def keep_graph_gradient(grad):
            if not grad.requires_grad:
                return None  # a plain backward: nothing to keep, DDP proceeds as usual
            previous = self._kept.get(key)
            self._kept[key] = grad if previous is None else previous + grad
            return grad.detach()

        return keep_graph_gradient

    def _check_consistency(self) -> None:
        """Once: the probe seed and the parameter shapes must agree on all ranks."""
        import torch.distributed as dist

        mine = (self._seed, [tuple(p.shape) for p in self._params])
        everyone = [None] * self._world
        dist.all_gather_object(everyone, mine)
        seeds = [e[0] for e in everyone]
        if len(set(seeds)) > 1:
            raise ValueError(
                f"AdaHessian was built with different seeds on different ranks ({seeds}): the ranks "
                "would draw different probes and diverge. Pass the same seed= on every rank."
            )
        if any(e[1] != mine[1] for e in everyone):
            raise ValueError(
                "AdaHessian got different parameter lists on different ranks (number or shapes "
                "differ): build the optimizer from the same model on every rank"
            )
        self._checked = True

    def graph_grads(self, params):
        if not self._checked:
            self._check_consistency()
        return [self._kept.get(id(p), p.grad) for p in params]

    def average_gradients(self, grads):
        # DDP has already averaged p.grad over ranks (as for any optimizer).
        return grads

    def average_curvature(self, estimates):
        summed = all_reduce_sum(estimates)
        return [s / self._world for s in summed]

    def clear(self) -> None:
        self._kept.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
