r""":class:`HessianOperator`: the Hessian of a model's mean loss over one batch or a data set."""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..hvp import _hvp_forward_over_reverse, _hvp_from_grads, gradients_with_graph
from .._sharded import local
from ._finite_difference import Perturbation, check_fd_step
from ._model import ModelOperator, ParamSpec, operator_mode
from ._sharded_model import NEEDS_FINITE_DIFFERENCES

__all__ = ["HessianOperator", "HVP_METHODS"]

#: how :class:`HessianOperator` computes a product (its ``method=``)
HVP_METHODS = ("reverse", "forward_over_reverse", "finite_difference")


class HessianOperator(ModelOperator):
    r"""The Hessian of a model's mean loss, over one batch or a whole data set, as an operator.

    For batches :math:`B_1..B_m` of sizes :math:`n_b` and a ``loss_fn`` that returns the mean loss
    of a batch, the operator is the Hessian of the data-set mean loss,

    .. math::  H = \frac{\sum_b n_b H_b}{\sum_b n_b},

    so batches of 10 and 6 samples give exactly the Hessian of the 16 together.

    Args:
        model, loss_fn, data, params, bn_mode, distributed, progress, loss_form, batch_size: the
            conventions every model-based operator shares (:class:`hessopt.operators.ModelOperator`):
            ``loss_fn(outputs, targets)`` on ``(inputs, targets)`` pairs or dict batches
            (``model(**batch)``; ``loss_fn=None`` takes ``outputs.loss``), or ``loss_fn(model,
            batch)`` with ``loss_form="model"``; models left exactly as found.
        cache_graph: keep the gradient graph between products, so each ``op @ v`` costs one extra
            backward instead of forward + backward + extra backward. Default: on for a single batch,
            off for an iterable (with it on, every batch's graph is kept in memory). The cache
            assumes the parameters do not change; call :meth:`clear_cache` after modifying them.
        method: how each product is computed:

            * ``"reverse"`` (default): reverse-over-reverse, a double backward through the
              gradient's graph, which ``cache_graph`` can keep; inside
              :func:`hessopt.second_order_safe` (fused attention, weight norm).
            * ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``: no backward
              graph is stored, so it needs less memory and no cache; attention runs the composite
              kernel. Same products as ``"reverse"`` (tested in float64, BatchNorm in both modes,
              LayerNorm, attention, a module registered twice).
            * ``"finite_difference"``: central differences of two first-order gradients,
              :math:`Hv \approx (g(\theta + \epsilon v) - g(\theta - \epsilon v)) / (2\epsilon)`;
              no second derivative at all, so it works where double backward does not (FSDP-like
              wrappers, ``torch.compile``'d code, kernels without a double backward). See
              ``fd_step``.
        fd_step: the relative step :math:`r` of ``method="finite_difference"``: the parameters move
            by :math:`\pm\epsilon v` with :math:`\epsilon = r \max(\|\theta\|, 1) / \|v\|`, a step
            of norm :math:`r \max(\|\theta\|, 1)` (:math:`\theta`: the selected parameters). The
            default :math:`r = \epsilon_{mach}^{1/3}` (6.1e-6 in float64, 4.9e-3 in float32)
            balances the truncation error :math:`\tfrac{\epsilon^2}{6} \|\nabla^3 L[v, v, \cdot]\|`
            against the rounding error :math:`\sim \epsilon_{mach} \|g\| / \epsilon`, so the
            relative error is of order :math:`\epsilon_{mach}^{2/3}` (about 4e-11 in float64, 3e-5
            in float32, at unit third-derivative scale). The parameters are written in place
            (through ``p.data``, so no version counter changes and a graph the user holds stays
            valid) and restored bit-exactly afterwards by copying the saved tensors back, never
            by subtracting :math:`\epsilon v`. **Piecewise-linear activations** (ReLU, leaky ReLU, max pooling):
            both gradients are taken with the on/off pattern of the units frozen at :math:`\theta`
            (recorded by one forward pass without gradient, kept between products of a single
            batch while the parameters are unchanged; :mod:`hessopt.operators._finite_difference`),
            so the difference is that of the polynomial the network is on its piece, whose Hessian
            is the one autograd computes; without this, every unit whose kink lies between
            :math:`\theta \pm \epsilon v` adds the gradient's jump divided by :math:`2\epsilon`,
            an error that does not shrink with :math:`\epsilon` (measured on a 1.9M-parameter
            ReLU MLP: 331x the product). Max pooling's window choices are frozen the same way (474x
            off without, measured on a small CNN); ``hardtanh``/``relu6``, ``abs``, ``clamp`` and
            other kinks are not.

    Attributes:
        params, param_names, shapes, num_params, dtype, device.

    Example:
        >>> op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
        >>> hessopt.top_eigenvalues(op, k=5).eigenvalues
    """

    _matrix_name = "Hessian"
    _may_shard = True  # with method="finite_difference" only (checked in __init__)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Optional[Callable[..., torch.Tensor]],
        data: Any,
        params: ParamSpec = None,
        bn_mode: str = "eval",
        cache_graph: Optional[bool] = None,
        distributed: Optional[bool] = None,
        progress: bool = False,
        method: str = "reverse",
        *,
        loss_form: str = "outputs",
        batch_size: Optional[Callable[[Any], int]] = None,
        fd_step: Optional[float] = None,
    ):
        super().__init__(model, loss_fn, data, params=params, bn_mode=bn_mode, distributed=distributed,
                         progress=progress, loss_form=loss_form, batch_size=batch_size)
        self.cache_graph = self._single if cache_graph is None else bool(cache_graph)
        if method not in HVP_METHODS:
            raise ValueError(f"method must be one of {HVP_METHODS}, got {method!r}")
        if self.is_sharded and method != "finite_difference":
            raise TypeError(NEEDS_FINITE_DIFFERENCES.format(
                name="HessianOperator", what=f"a Hessian-vector product by method={method!r} (double backward)"))
        if method == "forward_over_reverse":
            self._functional()  # refuses parameters the model does not own, now rather than later
        if method != "reverse":
            self.cache_graph = False  # there is no graph to keep
        self._fd = Perturbation(self, check_fd_step(fd_step, self.dtype))
        self.method = method
        self._cache: Optional[List[Tuple[List[Optional[torch.Tensor]], float]]] = None

    @property
    def fd_step(self) -> float:
        """The relative step :math:`r` of ``method="finite_difference"`` (see the class docstring)."""
        return self._fd.fd_step

    def clear_cache(self) -> None:
        """Drop the cached gradient graph and activation pattern (call after changing the parameters)."""
        self._cache = None
        self._fd.clear()

    def _batch_grads(self, batch: Any) -> Tuple[List[Optional[torch.Tensor]], float, torch.Tensor]:
        loss, n = self._forward_loss(batch)
        return gradients_with_graph(loss, self.params), float(n), loss.detach()

    def _graphs(self) -> Iterator[Tuple[List[Optional[torch.Tensor]], float]]:
        """``(gradients with graph, batch size)`` per batch; built once and kept if ``cache_graph``."""
        if not self.cache_graph:
            for batch in self._batches():
                yield self._batch_grads(batch)[:2]
            return
        if self._cache is None:
            self._cache = [self._batch_grads(batch)[:2] for batch in self._batches()]
        yield from self._cache

    def _products(self, vectors: List[torch.Tensor]) -> Iterator[Tuple[List[torch.Tensor], float]]:
        """``(Hv of one batch's mean loss, batch size)`` for every batch, by the operator's method."""
        if self.method == "forward_over_reverse":
            for batch in self._batches():
                yield self._forward_over_reverse(batch, vectors)
            return
        if self.method == "finite_difference":
            yield from self._finite_differences(vectors)
            return
        for grads, n in self._graphs():
            yield _hvp_from_grads(grads, self.params, vectors, self.cache_graph, graph_was_built=True), n

    def _forward_over_reverse(self, batch: Any, vectors: List[torch.Tensor]) -> Tuple[List[torch.Tensor], float]:
        batch, n = self._prepare(batch)
        loss = self._functional_loss(batch)
        with operator_mode(self.model, self.bn_mode):
            return _hvp_forward_over_reverse(lambda ts: loss(*ts), self.params, vectors), float(n)

    # -- finite differences ------------------------------------------------------------------------

    def _plain_gradient(self, batch: Any) -> Tuple[List[torch.Tensor], float]:
        loss, n = self._forward_loss(batch, second_order=False)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)], float(n)

    def _sharded_gradient(self, batch: Any, weight: float) -> Tuple[List[torch.Tensor], float]:
        """This process's chunks of the weighted, process-averaged gradient (already weighted: 1)."""
        loss, _ = self._forward_loss(batch, second_order=False)
        return self._shards.gradient(loss * weight, self.params), 1.0

    def _finite_differences(self, vectors: List[torch.Tensor]) -> Iterator[Tuple[List[torch.Tensor], float]]:
        """Central differences of gradients (see the class docstring and :mod:`._finite_difference`);
        on sharded parameters on this process's chunks, from FSDP's averaged, weighted gradients."""
        fd, weights = self._fd, (self._shards.weights(self) if self.is_sharded else None)

        def gradient(i: int, batch: Any) -> Tuple[List[torch.Tensor], float]:
            return self._plain_gradient(batch) if weights is None else self._sharded_gradient(batch, weights[i])

        with fd.around(vectors) as eps:
            for i, batch in enumerate(self._batches()):
                if eps is None:  # a zero vector
                    yield [torch.zeros_like(local(p)) for p in self.params], (
                        1.0 if weights is not None else float(self._prepare(batch)[1]))
                    continue
                pattern = fd.pattern(batch, lambda b: self._forward_loss(b, second_order=False))
                fd.move(+1.0)
                with fd.frozen(pattern):  # one replay per evaluation
                    plus, n = gradient(i, batch)
                fd.move(-1.0)
                with fd.frozen(pattern):
                    minus, _ = gradient(i, batch)
                fd.restore()
                yield [(a - b) / (2.0 * eps) for a, b in zip(plus, minus)], n
