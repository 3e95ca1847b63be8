r"""Sharded parameters: FSDP2's ``fully_shard`` (DTensor parameters on a 1-D mesh), for the optimizers
and the operators (:mod:`hessopt.operators._sharded_model`).

Under FSDP2 every parameter is a :class:`torch.distributed.tensor.DTensor` whose rank-local part is
its ``Shard(0)`` chunk (``torch.chunk`` semantics: the last chunks may be shorter or empty), and its
gradient arrives as a DTensor of the same layout, *already averaged over the data-parallel ranks*
by FSDP's reduce-scatter after a plain ``backward()``. The optimizers therefore compute on the local
chunks (plain tensors: the kernels, the finiteness flags, the commit) and keep their moments as
DTensors shaped like the parameters, so that ``torch.distributed.checkpoint`` saves and loads them
sharded. Three things need the other ranks, each one small collective over the mesh's group:

* the finiteness of the loss and the gradients: one rank's NaN in its own chunk must skip (or
  raise on) every rank, or the ranks' parameters would part;
* the global sums of squares of the finite-difference step size (parameter and probe norms);
* the number of predictions of the Gauss-Newton-Bartlett estimate.

**Probes are a function of the global parameter, not of the shard layout**: the full-size probe is
drawn from the optimizer's seeded generator (identical on every rank) and each rank keeps its own
chunk, cut exactly as the parameter is (:func:`torch.distributed.tensor.distribute_tensor` with
``src_data_rank=None``, which takes the local chunk of the rank's own full tensor and does not
communicate). So a 2-rank run draws the probes of a 1-process run; the price is one full-size
probe drawn per parameter at a time (freed after the chunk is copied out), not a full copy of the
model.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

__all__ = ["is_dtensor", "local", "Sharding", "sharding_of", "check_sharded_parameter", "SHARDED_NEEDS_FIRST_ORDER",
           "fsdp_modules", "reshard"]

#: the message for a double-backward source on sharded parameters (the prefix is what tests match)
SHARDED_NEEDS_FIRST_ORDER = (
    "{name} got a sharded DTensor parameter (FSDP2's fully_shard, or tensor parallelism) with the "
    "double-backward curvature source {source!r}: under FSDP2 the gradient of a shard is "
    "reduce-scattered outside autograd, so no graph leads from the loss to it and no "
    "Hessian-vector product can be taken. Use a first-order source, curvature='gnb' "
    "(Gauss-Newton-Bartlett, for cross-entropy losses) or curvature='finite_difference' "
    "(any loss, closure form), or train with DistributedDataParallel (replicated parameters); see "
    "docs/distributed.md."
)


_DTENSOR: Any = None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a :class:`torch.distributed.tensor.DTensor` (checked on every step: kept cheap)."""
    global _DTENSOR
    if _DTENSOR is None:
        try:
            from torch.distributed.tensor import DTensor as _DTENSOR  # noqa: N811
        except ImportError:  # pragma: no cover - torch without distributed
            _DTENSOR = ()
    return isinstance(t, _DTENSOR)


def local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The rank-local part of a DTensor (sharing its storage: in-place writes reach the DTensor), else ``t``."""
    if t is None or not is_dtensor(t):
        return t
    with torch.no_grad():  # to_local() without grad mode returns the local tensor itself
        return t.to_local()


def like(local_tensor: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` (this rank's chunk) as a DTensor laid out like ``p``; ``local_tensor`` if ``p`` is plain."""
    if not is_dtensor(p):
        return local_tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_tensor, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def shard_of(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of the full-size tensor ``full``, cut as ``p`` is sharded (no communication)."""
    if not is_dtensor(p):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local().clone()


def check_sharded_parameter(p: torch.Tensor, name: str, source: Any, needs_graph: bool) -> None:
    """Refuse what the sharded path does not handle: double-backward sources, meshes beyond 1-D."""
    if not is_dtensor(p):
        return
    if needs_graph:
        raise TypeError(SHARDED_NEEDS_FIRST_ORDER.format(name=name, source=_source_name(source)))
    from torch.distributed.tensor import Shard

    mesh = p.device_mesh
    if mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
        raise TypeError(
            f"{name} supports DTensor parameters sharded on a 1-D device mesh (FSDP2's fully_shard over "
            f"one data-parallel group), got placements {tuple(p.placements)} on a {mesh.ndim}-D mesh. "
            "Use fully_shard(model) over a 1-D mesh, or DistributedDataParallel"
        )


def _source_name(source: Any) -> str:
    names = {"Hutchinson": "hutchinson", "ExactDiagonal": "exact"}
    return names.get(type(source).__name__, repr(source))


class Sharding:
    """The collectives of a step on sharded parameters (the process group of their 1-D mesh)."""

    def __init__(self, params: Sequence[torch.Tensor]):
        first = next(p for p in params if is_dtensor(p))
        self.group = first.device_mesh.get_group()
        self.device = local(first).device
        self.params = list(params)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one all-reduce of one byte)."""
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (a new tensor)."""
        import torch.distributed as dist

        out = values.detach().clone().to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def squared_norms(self, tensors: Sequence[torch.Tensor], sharded: Sequence[bool]) -> List[float]:
        """Global ``||t||^2`` of each tensor (local chunks of sharded ones summed over ranks), float64."""
        sq = torch.stack([torch.linalg.vector_norm(t.detach().double()).square().to(self.device) for t in tensors])
        mask = torch.tensor(list(sharded), dtype=torch.bool, device=self.device)
        total = self.sum_over_ranks(torch.where(mask, sq, torch.zeros_like(sq)))
        return torch.where(mask, total, sq).tolist()

    def count(self, n: int) -> int:
        """``n`` summed over the ranks."""
        return int(self.sum_over_ranks(torch.tensor([n], dtype=torch.float64)).item())

    def probe(self, p: torch.Tensor, generator: torch.Generator, distribution: str,
              dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """This rank's chunk of a full-size probe for ``p`` (every rank draws the same full probe;
        in ``p``'s dtype unless ``dtype`` is given)."""
        from .probes import probe

        lp = local(p)
        full = probe(tuple(p.shape), generator, dtype=lp.dtype if dtype is None else dtype, device=lp.device,
                     distribution=distribution)
        return shard_of(full, p)

    @staticmethod
    def backward_grads(loss: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool) -> List[torch.Tensor]:
        """The local gradient chunks of ``loss`` by a plain ``backward()`` (FSDP reduce-scatters, i.e.
        averages them over the ranks), with the step's own ``p.grad`` stashed and put back."""
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            loss.backward(retain_graph=retain_graph)
            return [torch.zeros_like(local(p)) if p.grad is None else local(p.grad).detach().clone() for p in params]
        finally:
            for p, g in zip(params, kept):
                p.grad = g


def fsdp_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to (none for a plain model)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(modules: Sequence[torch.nn.Module]) -> None:
    """Put FSDP2 modules back in their sharded state (DTensor parameters registered).

    A forward without a backward (``torch.no_grad()``, an evaluation) leaves the root module's
    unsharded parameters registered (FSDP2 keeps them for the backward it expects), so
    ``model.parameters()`` would yield plain tensors until the next forward. Free of communication.
    """
    for m in modules:
        m.reshard()


def sharding_of(params: Sequence[torch.Tensor]) -> Optional[Sharding]:
    """A :class:`Sharding` if any of ``params`` is a DTensor, else ``None``."""
    return Sharding(params) if any(is_dtensor(p) for p in params) else None
