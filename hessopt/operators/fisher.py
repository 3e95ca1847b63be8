r""":class:`EmpiricalFisherOperator`: :math:`F = \frac{1}{N} \sum_n g_n g_n^\top` from per-sample gradients.

:math:`g_n = \nabla_\theta \ell(f(x_n; \theta), y_n)` is the gradient of sample :math:`n`'s loss
alone (the loss on a batch of one), and :math:`N` the number of samples over all batches (and all
ranks). The empirical Fisher is positive semi-definite, has rank at most :math:`N`, and is what
Adam-style second moments and "natural gradient" approximations square; it is *not* the Fisher
information (which samples labels from the model; see Kunstner, Balles & Hennig 2019, "Limitations
of the empirical Fisher approximation") nor the GGN, and it differs from the Hessian away from a
minimum. :math:`Fv = \frac{1}{N} G^\top (G v)` with :math:`G` the ``(N, P)`` matrix of per-sample
gradients.

Per-sample gradients come from ``torch.func.vmap(torch.func.grad(...))`` over the batch dimension
(one vectorized backward per batch) where the model allows it, and from a loop of one backward per
sample otherwise (in-place operations on captured tensors, data-dependent control flow, ``.item()``
calls, ...): ``per_sample="auto"`` tries vmap once and falls back to the loop for good.

**BatchNorm in train mode** couples the samples of a batch (each output depends on the batch's
mean and variance), so a "per-sample gradient" of a train-mode network is not defined by the
sample alone, and a batch of one has no variance. ``bn_mode="train"`` is therefore refused for
models with normalization layers that use batch statistics; ``bn_mode="eval"`` (running statistics,
the default) makes the samples independent.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .. import _batches
from ..hvp import second_order_safe
from ._model import ModelOperator, ParamSpec, operator_mode, preserved_module_tensors
from .base import NonFiniteCurvatureError, flatten

__all__ = ["EmpiricalFisherOperator", "PER_SAMPLE_METHODS"]

PER_SAMPLE_METHODS = ("auto", "vmap", "loop")


def _unsqueeze_batched(obj: Any, dims: Any) -> Any:
    """Inside vmap a sample has lost its batch dimension: give it back (size 1) where it had one."""
    if isinstance(obj, torch.Tensor):
        return obj.unsqueeze(0) if dims == 0 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_unsqueeze_batched(o, d) for o, d in zip(obj, dims))
    if isinstance(obj, dict):
        return {k: _unsqueeze_batched(v, dims[k]) for k, v in obj.items()}
    return obj


class EmpiricalFisherOperator(ModelOperator):
    r"""The empirical Fisher :math:`\frac{1}{N}\sum_n g_n g_n^\top` of a model's per-sample losses.

    Args:
        model, loss_fn, data, params, distributed, progress, loss_form, batch_size: as for
            :class:`hessopt.HessianOperator` (:class:`hessopt.operators.ModelOperator`). ``loss_fn``
            is applied to one sample at a time (a batch of one), so it must be a mean (or sum) over
            the batch dimension, as ``nn.CrossEntropyLoss()`` is.
        bn_mode: ``"eval"`` only for models with batch-statistics normalization (see the module
            docstring); ``"train"`` is accepted for models without such layers (it then only means
            that nothing is switched), and refused otherwise.
        per_sample: ``"auto"`` (vmap, falling back to a loop if the model does not allow it),
            ``"vmap"`` (raise if it fails) or ``"loop"``. ``op.per_sample_method`` tells which ran.
        cache_gradients: keep each batch's ``(n_b, P)`` per-sample gradients between products, so a
            product is two matrix-vector products. Default: on for a single batch. Call
            :meth:`clear_cache` after changing the parameters.

    Example:
        >>> op = hessopt.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (x, y))
        >>> hessopt.trace(op, num_matvecs=30).estimate     # = mean squared per-sample gradient norm
    """

    _matrix_name = "empirical Fisher"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Optional[Callable[..., torch.Tensor]],
        data: Any,
        params: ParamSpec = None,
        bn_mode: str = "eval",
        cache_gradients: Optional[bool] = None,
        distributed: Optional[bool] = None,
        progress: bool = False,
        *,
        per_sample: str = "auto",
        loss_form: str = "outputs",
        batch_size: Optional[Callable[[Any], int]] = None,
    ):
        super().__init__(model, loss_fn, data, params=params, bn_mode=bn_mode, distributed=distributed,
                         progress=progress, loss_form=loss_form, batch_size=batch_size)
        if per_sample not in PER_SAMPLE_METHODS:
            raise ValueError(f"per_sample must be one of {PER_SAMPLE_METHODS}, got {per_sample!r}")
        if bn_mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            raise ValueError(
                "EmpiricalFisherOperator with bn_mode='train': batch normalization with batch "
                "statistics couples the samples of a batch, so per-sample gradients are not defined "
                "by each sample alone (and a batch of one has no variance); use bn_mode='eval'"
            )
        self.per_sample = per_sample
        self.per_sample_method: Optional[str] = None if per_sample == "auto" else per_sample
        if per_sample != "loop":
            self._functional()  # vmap swaps the model's own parameters: refuse foreign ones now
        self.cache_gradients = self._single if cache_gradients is None else bool(cache_gradients)
        self._cache: Optional[List[Tuple[torch.Tensor, float]]] = None

    def clear_cache(self) -> None:
        """Drop the cached per-sample gradients (call after changing the parameters)."""
        self._cache = None

    # -- per-sample gradients ------------------------------------------------------------------

    def _vmap_gradients(self, batch: Any, n: int) -> torch.Tensor:
        dims = _batches.sample_dims(batch, n)
        loss = self._functional_loss_of_sample(dims)
        primals = tuple(p.detach() for p in self.params)
        grad = torch.func.grad(loss, argnums=tuple(range(len(primals))))
        with operator_mode(self.model, self.bn_mode):
            per_sample = torch.func.vmap(grad, in_dims=(None,) * len(primals) + (dims,))(*primals, batch)
        return torch.cat([g.reshape(n, -1) for g in per_sample], dim=1)

    def _functional_loss_of_sample(self, dims: Any) -> Callable[..., torch.Tensor]:
        def loss(*args: Any) -> torch.Tensor:
            *tensors, sample = args
            return self._functional_loss(_unsqueeze_batched(sample, dims))(*tensors)

        return loss

    def _loop_gradients(self, batch: Any, n: int) -> torch.Tensor:
        rows = []
        for i in range(n):
            sample = _batches.select_sample(batch, i, n)
            with operator_mode(self.model, self.bn_mode), second_order_safe():
                loss = self._check_loss(_batches.evaluate_loss(self.model, self.loss_fn, sample, self.loss_form))
            grads = torch.autograd.grad(loss.reshape(()), self.params, allow_unused=True)
            rows.append(flatten([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]))
        return torch.stack(rows) if rows else torch.zeros(0, self.num_params, dtype=self.dtype, device=self.device)

    def per_sample_gradients(self, batch: Any) -> Tuple[torch.Tensor, int]:
        """``(G, n)``: the ``(n, P)`` per-sample gradients of one batch (moved to the device)."""
        batch, n = self._prepare(batch)
        method = self.per_sample_method
        with self._rng_guard(), preserved_module_tensors(self.model):
            if method in (None, "vmap"):
                try:
                    grads = self._vmap_gradients(batch, n)
                    self.per_sample_method = "vmap"
                except Exception:
                    if method == "vmap":
                        raise
                    self.per_sample_method = "loop"  # the model does not allow vmap: loop from now on
                    grads = self._loop_gradients(batch, n)
            else:
                grads = self._loop_gradients(batch, n)
        if not bool(torch.isfinite(grads).all()):
            raise NonFiniteCurvatureError("a per-sample gradient is not finite: the empirical Fisher is undefined here")
        return grads.detach(), n

    def _gradient_blocks(self) -> Iterator[Tuple[torch.Tensor, float]]:
        if not self.cache_gradients:
            for batch in self._batches():
                grads, n = self.per_sample_gradients(batch)
                yield grads, float(n)
            return
        if self._cache is None:
            self._cache = [(g, float(n)) for g, n in map(self.per_sample_gradients, self._batches())]
        yield from self._cache

    def _products(self, vectors: List[torch.Tensor]) -> Iterator[Tuple[List[torch.Tensor], float]]:
        v = flatten(vectors)
        for grads, n in self._gradient_blocks():
            if n == 0:
                continue
            yield [grads.T @ (grads @ v) / n], n
