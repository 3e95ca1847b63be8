r"""Model operators on sharded parameters (FSDP2's ``fully_shard``): the vectors stay sharded.

Under FSDP2 every parameter is a DTensor whose process-local part is its ``Shard(0)`` chunk, and a
plain ``backward()`` leaves in ``p.grad`` this process's chunk of the gradient *averaged over the
processes* (FSDP's reduce-scatter). ``torch.autograd.grad`` cannot reach the shards (the unsharded
parameters that the forward uses are rebuilt from them outside autograd), so only first-order
products work: :class:`hessopt.HessianOperator` with ``method="finite_difference"`` (two gradients
per product at :math:`\theta \pm \epsilon v`) and :class:`hessopt.GGNOperator` with
``method="finite_difference"`` (the outputs at :math:`\theta \pm \epsilon v`, then one backward).
What this module adds to a model operator:

* **Vectors are shards.** A vector of the operator is the concatenation of this process's chunks
  of the per-parameter blocks (``local_size`` entries; ``num_params`` stays the global dimension),
  so the estimators' memory per process (Lanczos basis, Hutch++ sketch) falls with the number of
  processes. Inner products are local partial sums completed by one ``all_reduce``
  (:meth:`ShardedModel.reduce_sum`).
* **Probes are a function of the global vector, not of the layout**: for each parameter in turn
  the full-size block is drawn from the generator (the same on every process) and this process
  keeps its chunk (cut exactly as the parameter is), so any number of processes draws the probe
  that one process drawing per parameter would (one parameter's full block is the transient cost).
* **The data average.** Each process iterates its own batches; for batch :math:`b` process
  :math:`r` has :math:`n_{rb}` samples, :math:`N = \sum_{rb} n_{rb}` and :math:`W` processes. FSDP
  averages the processes' gradients, so each process backpropagates its batch's mean loss times
  :math:`W n_{rb} / N`; summed over batches that is exactly the gradient of the mean loss over all
  :math:`N` samples (uneven shards of data weigh right). Every process must run the same number
  of batches (FSDP's collectives pair them up): checked once, together, before the first product.
* **Nothing lost, no hang.** The users' ``p.grad`` of every parameter of the model are stashed and
  put back around each product; the weights are restored bit-exactly. Checks that can fail on
  one process only (a non-finite product or loss, mismatched batch counts) are agreed through an
  ``all_reduce`` so that every process raises the same error. An exception raised inside one
  process's forward or backward (its loss function, its data) cannot be agreed on: that process
  raises and, once it exits, the others' pending FSDP collective fails instead of waiting.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn

from .._sharded import Sharding, check_sharded_parameter, fsdp_modules, is_dtensor, local, reshard
from .base import NonFiniteCurvatureError, _is_finite

__all__ = ["ShardedModel", "sharded_model_of", "NEEDS_FINITE_DIFFERENCES"]

#: why an operator that needs second derivatives through the network refuses sharded parameters
NEEDS_FINITE_DIFFERENCES = (
    "{name} got sharded DTensor parameters (FSDP2's fully_shard): under FSDP2 the gradient reaches "
    "the shards through FSDP's reduce-scatter, outside autograd, so {what} cannot be computed through "
    "them. Use hessopt.HessianOperator(model, loss_fn, data, method='finite_difference') (two "
    "first-order gradients per product) or hessopt.GGNOperator(model, loss_fn, data, "
    "method='finite_difference') (two forwards and a backward): their products and vectors stay "
    "sharded; or build the operator on an unsharded copy of the model; see docs/distributed.md"
)


class ShardedModel:
    """The sharded vector space and data protocol of one model operator (see the module docstring)."""

    def __init__(self, op, name: str):
        for n, p in zip(op.param_names, op.params):
            if not is_dtensor(p):
                raise TypeError(
                    f"{name}: parameter {n!r} is a plain tensor while others are sharded DTensors; "
                    "apply fully_shard to the whole model (every selected parameter sharded)"
                )
            check_sharded_parameter(p, name, None, needs_graph=False)
        self.name = name
        self.fsdp_modules = fsdp_modules(op.model)
        self.sharding = Sharding(op.params)
        self.local_shapes = [local(p).shape for p in op.params]
        self.local_size = sum(int(s.numel()) for s in self.local_shapes)
        self.world = torch.distributed.get_world_size(self.sharding.group)
        self._weights: Optional[List[float]] = None

    # -- the vector space ------------------------------------------------------------------------

    def reduce_sum(self, partial: torch.Tensor) -> torch.Tensor:
        return self.sharding.sum_over_ranks(partial)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(self.reduce_sum(torch.dot(a, b).reshape(1)).item())

    def norm(self, a: torch.Tensor) -> float:
        sq = torch.linalg.vector_norm(a, dtype=torch.float64).square().reshape(1)
        return float(self.reduce_sum(sq).sqrt().item())

    def all_true(self, flag: bool) -> bool:
        return self.sharding.all_true(flag)

    def probe(self, params: Sequence[torch.Tensor], generator: torch.Generator, dtype: torch.dtype,
              distribution: str) -> torch.Tensor:
        """This process's part of a random vector: each parameter's full-size block drawn in turn
        (identically on every process), of which the process keeps its chunk."""
        chunks = [self.sharding.probe(p, generator, distribution, dtype).reshape(-1) for p in params]
        return torch.cat(chunks) if chunks else torch.zeros(0, dtype=dtype)

    def broadcast_seed(self, seed: int) -> int:
        obj = [seed]
        torch.distributed.broadcast_object_list(obj, src=torch.distributed.get_global_rank(self.sharding.group, 0),
                                                group=self.sharding.group)
        return int(obj[0])

    # -- the data average --------------------------------------------------------------------------

    def weights(self, op) -> List[float]:
        """``W n_rb / N`` for each of this process's batches (computed once; see the module docstring).

        Two ``all_reduce``s, once: the sum of the samples, and the maximum of (-batches, batches, a
        failure flag), i.e. the fewest and most batches over the processes and whether some process
        could not size its batches; every process raises together when the counts differ, when there
        are no samples at all, or on such a failure.
        """
        if self._weights is not None:
            return self._weights
        sizes, failure = [], None
        try:
            sizes = [op._batch_size(batch) for batch in op._data]
        except Exception as err:  # noqa: BLE001 - raised below, after every process has joined
            failure = err
        import torch.distributed as dist

        device = self.sharding.device
        total = float(self.reduce_sum(torch.tensor([float(sum(sizes))], dtype=torch.float64, device=device)))
        extremes = torch.tensor([-len(sizes), len(sizes), failure is not None], dtype=torch.float64, device=device)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.sharding.group)
        fewest, most, failed = -float(extremes[0]), float(extremes[1]), float(extremes[2])
        if failure is not None:
            raise failure
        if failed > 0:
            raise RuntimeError(f"{self.name}: another process could not read its batches (see its error)")
        if fewest != most:
            raise ValueError(
                f"{self.name} on sharded parameters: the processes hold between {fewest:.0f} and {most:.0f} "
                "batches; FSDP pairs every process's forward and backward with the others', so every "
                "process must pass the same number of batches (their sizes may differ)"
            )
        if total == 0:
            raise ValueError(f"{self.name}: data is empty on every process: pass at least one batch")
        self._weights = [self.world * n / total for n in sizes]
        return self._weights

    @contextlib.contextmanager
    def grads_stashed(self, model: nn.Module) -> Iterator[None]:
        """Every parameter's ``.grad`` of ``model`` set aside for the products, put back on exit, and
        the model resharded (:func:`hessopt._sharded.reshard`) on entry and exit: ``model.parameters()``
        yields the DTensors the user holds, before and after."""
        reshard(self.fsdp_modules)
        params = list(model.parameters())
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            yield
        finally:
            reshard(self.fsdp_modules)
            for p, g in zip(params, kept):
                p.grad = g

    @contextlib.contextmanager
    def forward_without_backward(self) -> Iterator[None]:
        """Around a forward pass that no backward follows: afterwards the model is resharded, since
        FSDP2's root keeps its unsharded parameters registered for the backward it expects, and its
        next forward would use them as gathered now (stale once the parameters have moved)."""
        try:
            yield
        finally:
            reshard(self.fsdp_modules)

    def gradient(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """This process's chunks of the gradient of ``loss`` (averaged over processes by FSDP), by a
        plain ``backward()`` (:meth:`hessopt._sharded.Sharding.backward_grads`; inside
        :meth:`grads_stashed`, which puts every parameter's own ``.grad`` back)."""
        return self.sharding.backward_grads(loss, params, retain_graph=False)

    def check_finite(self, value: torch.Tensor, what: str) -> None:
        """Raise on every process when ``value`` is not finite on some process."""
        if not self.all_true(_is_finite(value)):
            raise NonFiniteCurvatureError(
                f"{self.name} produced NaN/Inf ({what}) on some process: the loss or its curvature is not "
                "finite at these parameters (check the loss values and the inputs of every process)"
            )


def sharded_model_of(op, name: str) -> Optional[ShardedModel]:
    """A :class:`ShardedModel` when the operator's parameters are DTensors, else ``None``."""
    return ShardedModel(op, name) if any(is_dtensor(p) for p in op.params) else None
