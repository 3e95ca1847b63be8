r""":class:`GGNOperator`: the generalized Gauss-Newton matrix :math:`J^\top H_L J` of a model and loss.

Write the model as :math:`z = f(\theta)` (the network's outputs on a batch) and the loss as
:math:`L(\theta) = \ell(f(\theta))`. The Hessian splits into

.. math::  \nabla^2 L = J^\top H_\ell J + \sum_k \frac{\partial \ell}{\partial z_k} \nabla^2 z_k,
           \qquad J = \frac{\partial z}{\partial \theta},\; H_\ell = \nabla_z^2 \ell ,

and the generalized Gauss-Newton matrix (GGN; Schraudolph 2002, Martens 2010) keeps the first
term. It is positive semi-definite whenever the loss is convex in the outputs (cross-entropy, MSE),
so it is the matrix of Newton-CG / Hessian-free steps, damped preconditioners and influence
functions; for cross-entropy with a softmax it equals the Fisher information of the model's
predictive distribution (Martens 2014), and for a model linear in its parameters it equals the
Hessian.

A product costs one Jacobian-vector product (forward mode, ``torch.func.jvp``: a forward pass
carrying tangents), one product with :math:`H_\ell` on the outputs (closed form for cross-entropy
and MSE, else a double backward through the *loss only*), and one vector-Jacobian product (a
backward pass). Nothing is differentiated twice through the network, so fused kernels without a
double backward are no obstacle (attention runs the composite kernel in the forward-mode pass,
which fused kernels do not support).

``method="finite_difference"`` takes the Jacobian-vector product as a central difference of the
outputs, :math:`Jv \approx (f(\theta+\epsilon v) - f(\theta-\epsilon v)) / 2\epsilon` (two forward
passes without gradient, the step rule and frozen ReLU patterns of
:mod:`hessopt.operators._finite_difference`), and :math:`J^\top u` as the gradient of
:math:`\langle f(\theta), u\rangle` by a plain backward: no ``torch.func`` at all, so it runs on
FSDP2-sharded models (products and vectors sharded, FSDP averaging the backward) and on kernels
without forward-mode derivatives.

Closed forms (per batch, :math:`u = Jv` shaped like the outputs):

* cross-entropy over classes in dimension 1 (``nn.CrossEntropyLoss``/``F.cross_entropy``,
  ``"cross_entropy"``): with :math:`p = \mathrm{softmax}(z)` per row,
  :math:`H_\ell u = (p \odot u - p \langle p, u\rangle) / m` per row, where rows whose target is
  ``ignore_index`` contribute nothing and :math:`m` is the number of counted rows
  (``reduction="mean"``; :math:`m = 1` for ``"sum"``). Label smoothing does not change
  :math:`H_\ell` (the smoothed targets still sum to one); probability targets scale each row by
  the sum of its targets. Class weights fall back to autograd.
* mean squared error (``nn.MSELoss``/``F.mse_loss``, ``"mse"``): :math:`H_\ell u = 2u / \#z` for
  ``reduction="mean"``, :math:`2u` for ``"sum"``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _batches
from .._sharded import local
from ._finite_difference import Perturbation, check_fd_step
from ._model import ModelOperator, ParamSpec, _call_args, operator_mode
from ._sharded_model import NEEDS_FINITE_DIFFERENCES

__all__ = ["GGNOperator", "loss_hessian_product", "GGN_METHODS"]

#: how :class:`GGNOperator` computes the Jacobian-vector product (its ``method=``)
GGN_METHODS = ("jvp", "finite_difference")

_NAMED_LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


def _default_output(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"GGNOperator needs the model's output tensor, but the model returned {type(outputs).__name__} "
        "without .logits: pass output_fn=<callable outputs -> tensor>"
    )


def _closed_form_kind(loss_fn: Callable) -> Tuple[Optional[str], dict]:
    """``("cross_entropy" | "mse" | None, options)`` for the losses with a closed-form Hessian."""
    if loss_fn is F.cross_entropy:
        return "cross_entropy", dict(reduction="mean", ignore_index=-100)
    if loss_fn is F.mse_loss:
        return "mse", dict(reduction="mean")
    if type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None:
        return "cross_entropy", dict(reduction=loss_fn.reduction, ignore_index=loss_fn.ignore_index)
    if type(loss_fn) is nn.MSELoss:
        return "mse", dict(reduction=loss_fn.reduction)
    return None, {}


def _cross_entropy_product(z: torch.Tensor, targets: torch.Tensor, u: torch.Tensor,
                           reduction: str, ignore_index: int) -> torch.Tensor:
    if z.dim() == 1:  # one unbatched sample
        return _cross_entropy_product(z[None], targets.reshape(1, *targets.shape), u[None], reduction, ignore_index)[0]
    classes = z.shape[1]
    rows_z = z.detach().movedim(1, -1).reshape(-1, classes)
    rows_u = u.movedim(1, -1).reshape(-1, classes)
    p = torch.softmax(rows_z, dim=-1)
    hu = p * rows_u - p * (p * rows_u).sum(dim=-1, keepdim=True)
    if targets.is_floating_point():  # class probabilities, shaped like z
        weight = targets.movedim(1, -1).reshape(-1, classes).sum(dim=-1).to(hu.dtype)
        count = float(rows_z.shape[0])
    else:
        weight = (targets.reshape(-1) != ignore_index).to(hu.dtype)
        count = float(weight.sum())
    hu = hu * weight[:, None]
    if reduction == "mean":
        hu = hu / count
    elif reduction != "sum":
        raise ValueError(f"GGNOperator needs a scalar loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    shape = list(z.shape)
    moved = [shape[0]] + shape[2:] + [classes]
    return hu.reshape(moved).movedim(-1, 1)


def loss_hessian_product(loss_fn: Callable, z: torch.Tensor, targets: Any, u: torch.Tensor) -> torch.Tensor:
    r""":math:`H_\ell u`: the Hessian of ``loss_fn(z, targets)`` with respect to the outputs ``z``,
    times ``u`` (shaped like ``z``). Closed form for cross-entropy and MSE (module docstring), a
    double backward through the loss alone for any other loss."""
    kind, options = _closed_form_kind(loss_fn)
    if kind == "cross_entropy" and isinstance(targets, torch.Tensor):
        return _cross_entropy_product(z, targets, u, **options)
    if kind == "mse":
        if options["reduction"] == "mean":
            return u * (2.0 / z.numel())
        if options["reduction"] == "sum":
            return 2.0 * u
        raise ValueError("GGNOperator needs a scalar loss: MSELoss reduction must be 'mean' or 'sum'")
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        loss = loss_fn(leaf, targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar mean loss, got {shape}; use reduction='mean'")
        (grad,) = torch.autograd.grad(loss.reshape(()), leaf, create_graph=True)
        if not grad.requires_grad:  # the loss is linear in the outputs
            return torch.zeros_like(u)
        (hu,) = torch.autograd.grad(grad, leaf, grad_outputs=u, allow_unused=True)
    return torch.zeros_like(u) if hu is None else hu


class GGNOperator(ModelOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = J^\top H_\ell J` of a model's mean loss.

    Over batches of sizes :math:`n_b`, :math:`G = \sum_b n_b G_b / \sum_b n_b` (the data-set mean
    loss's GGN). Positive semi-definite for losses convex in the outputs. See the module docstring
    for the math, the closed forms and the cost (one forward-mode and one backward pass per product,
    no double backward through the network).

    Args:
        model, data, params, bn_mode, distributed, progress, batch_size: as for
            :class:`hessopt.HessianOperator` (:class:`hessopt.operators.ModelOperator`).
        loss_fn: ``loss_fn(z, targets) -> scalar`` where ``z = output_fn(outputs)`` is the output
            tensor the loss is convex in (``targets``: the pair's second element, or the whole dict
            batch). ``nn.CrossEntropyLoss`` (without class weights), ``nn.MSELoss``,
            ``F.cross_entropy``, ``F.mse_loss`` and the names ``"cross_entropy"`` and ``"mse"`` use
            the closed forms; any other loss is differentiated twice with respect to ``z`` only. The
            model's own loss (``loss_fn=None``) and ``loss_form="model"`` are refused: the GGN
            needs the outputs apart from the loss.
        output_fn: ``outputs -> tensor``: which output the loss is a function of (default: the
            outputs if they are a tensor, else their ``.logits``, as HuggingFace models return).
        cache_graph: keep each batch's backward graph between products (one forward-mode pass and
            one backward per product instead of two forwards and a backward). Default: on for a
            single batch. Call :meth:`clear_cache` after changing the parameters.
        method: ``"jvp"`` (default: forward-mode ``torch.func.jvp``) or ``"finite_difference"``
            (central differences of the outputs and a plain backward; the one that works on
            ``fully_shard``ed models; see the module docstring).
        fd_step: the relative step of ``method="finite_difference"`` (default
            :math:`\epsilon_{mach}^{1/3}`; as for :class:`hessopt.HessianOperator`).

    Example:
        >>> op = hessopt.GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
        >>> step = hessopt.solve(op, -op.gradient(), damping=1e-3).solution   # a Newton-CG step
    """

    _matrix_name = "GGN"
    _may_shard = True  # with method="finite_difference" only (checked in __init__)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Union[str, Callable[..., torch.Tensor]],
        data: Any,
        params: ParamSpec = None,
        bn_mode: str = "eval",
        cache_graph: Optional[bool] = None,
        distributed: Optional[bool] = None,
        progress: bool = False,
        *,
        output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
        loss_form: str = "outputs",
        batch_size: Optional[Callable[[Any], int]] = None,
        method: str = "jvp",
        fd_step: Optional[float] = None,
    ):
        if method not in GGN_METHODS:
            raise ValueError(f"method must be one of {GGN_METHODS}, got {method!r}")
        if isinstance(loss_fn, str):
            if loss_fn not in _NAMED_LOSSES:
                raise ValueError(f"loss_fn names one of {sorted(_NAMED_LOSSES)} or is a callable, got {loss_fn!r}")
            loss_fn = _NAMED_LOSSES[loss_fn]
        if loss_fn is None:
            raise ValueError(
                "GGNOperator needs loss_fn(z, targets) on the model's outputs: the loss a model "
                "computes itself (loss_fn=None) cannot be split into J^T H J; e.g. for a HuggingFace "
                "model pass lambda logits, batch: F.cross_entropy(logits.flatten(0, -2), "
                "batch['labels'].flatten())"
            )
        if loss_form == "model":
            raise ValueError(
                "GGNOperator needs the model's outputs apart from the loss, so loss_fn(model, batch) "
                "(loss_form='model') cannot be used: pass loss_fn(z, targets) and output_fn if needed"
            )
        if output_fn is not None and not callable(output_fn):
            raise TypeError("output_fn must be callable: outputs -> the tensor the loss is a function of")
        super().__init__(model, loss_fn, data, params=params, bn_mode=bn_mode, distributed=distributed,
                         progress=progress, loss_form=loss_form, batch_size=batch_size)
        if self.is_sharded and method != "finite_difference":
            raise TypeError(NEEDS_FINITE_DIFFERENCES.format(
                name="GGNOperator", what="its torch.func Jacobian-vector products (method='jvp')"))
        if method == "jvp":
            self._functional()  # parameters the model does not own cannot be swapped: refuse them now
        self.method = method
        self.output_fn = _default_output if output_fn is None else output_fn
        self.cache_graph = (self._single if cache_graph is None else bool(cache_graph)) and method == "jvp"
        self._cache: Optional[List[Tuple[Any, float]]] = None
        self._fd = Perturbation(self, check_fd_step(fd_step, self.dtype))

    @property
    def fd_step(self) -> float:
        """The relative step of ``method="finite_difference"``."""
        return self._fd.fd_step

    def clear_cache(self) -> None:
        """Drop the cached backward graphs and activation pattern (call after changing the parameters)."""
        self._cache = None
        self._fd.clear()

    def _output_function(self, batch: Any) -> Tuple[Callable[..., torch.Tensor], Any]:
        """``(z(*tensors), targets)``: the batch's output tensor as a pure function of the parameters."""
        from torch.func import functional_call

        module, names = self._functional()
        if _batches.is_mapping_batch(batch):
            args, kwargs, targets = (), dict(batch), batch
        else:
            inputs, targets = batch
            args, kwargs = _call_args(inputs)

        def outputs(*tensors: torch.Tensor) -> torch.Tensor:
            z = self.output_fn(functional_call(module, dict(zip(names, tensors)), args, kwargs))
            if not isinstance(z, torch.Tensor):
                raise TypeError(f"output_fn must return a tensor, got {type(z).__name__}")
            return z

        return outputs, targets

    def _linearization(self, batch: Any):
        """``(z, targets, vjp_fn, f, n)`` of one batch: outputs, the backward map ``u -> J^T u``, the
        output function (for the forward-mode ``Jv``) and the batch size."""
        batch, n = self._prepare(batch)
        f, targets = self._output_function(batch)
        primals = tuple(p.detach() for p in self.params)
        with operator_mode(self.model, self.bn_mode), _math_attention():
            z, vjp_fn = torch.func.vjp(f, *primals)
        if not bool(torch.isfinite(z).all()):
            from .base import NonFiniteCurvatureError

            raise NonFiniteCurvatureError("the model's outputs are not finite: the GGN is undefined here")
        return (z.detach(), targets, vjp_fn, f), float(n)

    def _linearizations(self) -> Iterator[Tuple[Any, float]]:
        if not self.cache_graph:
            for batch in self._batches():
                yield self._linearization(batch)
            return
        if self._cache is None:
            self._cache = [self._linearization(batch) for batch in self._batches()]
        yield from self._cache

    def _products(self, vectors: List[torch.Tensor]) -> Iterator[Tuple[List[torch.Tensor], float]]:
        if self.method == "finite_difference":
            yield from self._finite_difference_products(vectors)
            return
        primals = tuple(p.detach() for p in self.params)
        tangents = tuple(v.detach() for v in vectors)
        for (z, targets, vjp_fn, f), n in self._linearizations():
            with operator_mode(self.model, self.bn_mode), _math_attention():
                _, jv = torch.func.jvp(f, primals, tangents)
            hu = loss_hessian_product(self.loss_fn, z, targets, jv.detach())
            products = vjp_fn(hu.to(z.dtype))
            yield [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, products)], n


    # -- method="finite_difference" --------------------------------------------------------------

    def _outputs(self, batch: Any) -> Tuple[torch.Tensor, Any]:
        """``(z, targets)``: the model's output tensor on a prepared batch, in the operator's mode."""
        if _batches.is_mapping_batch(batch):
            inputs, targets = batch, batch
        else:
            inputs, targets = batch
        with operator_mode(self.model, self.bn_mode):
            z = self.output_fn(_batches.call_model(self.model, inputs))
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"output_fn must return a tensor, got {type(z).__name__}")
        return z, targets

    def _moved_outputs(self, batch: Any, sign: float, pattern) -> torch.Tensor:
        """The outputs at ``theta + sign eps v`` (no gradient, the activation pattern replayed)."""
        self._fd.move(sign)
        with self._forward_without_backward(), self._fd.frozen(pattern):
            return self._outputs(batch)[0]

    def _finite_difference_products(self, vectors: List[torch.Tensor]) -> Iterator[Tuple[List[torch.Tensor], float]]:
        """``J^T H_l (f(theta + eps v) - f(theta - eps v)) / 2 eps`` per batch (module docstring);
        sharded: weighted by ``W n_rb / N`` before FSDP's averaged backward (as the Hessian's)."""
        fd, weights = self._fd, (self._shards.weights(self) if self.is_sharded else None)
        with fd.around(vectors) as eps:
            for i, raw in enumerate(self._batches()):
                batch, n = self._prepare(raw)
                if eps is None:  # a zero vector
                    yield [torch.zeros_like(local(p)) for p in self.params], 1.0 if weights is not None else float(n)
                    continue
                pattern = fd.pattern(batch, self._outputs)
                plus = self._moved_outputs(batch, +1.0, pattern)
                minus = self._moved_outputs(batch, -1.0, pattern)
                fd.restore()
                jv = (plus - minus) / (2.0 * eps)
                with torch.enable_grad():
                    z, targets = self._outputs(batch)
                    hu = loss_hessian_product(self.loss_fn, z.detach(), targets, jv).to(z.dtype)
                    surrogate = (z * hu).sum()  # its gradient is J^T H_l J v
                    if weights is not None:
                        yield self._shards.gradient(surrogate * weights[i], self.params), 1.0
                        continue
                    grads = torch.autograd.grad(surrogate, self.params, allow_unused=True)
                yield [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)], float(n)


def _math_attention():
    """Attention by the composite kernel and weight norm written out: no forward-mode derivative
    exists for the fused kernels (:func:`hessopt.hvp.forward_mode_safe`)."""
    from ..hvp import forward_mode_safe

    return forward_mode_safe()
