r"""The Hessian-vector-product (HVP) core: the only place in hessopt that differentiates twice.

For a scalar loss :math:`L(\theta)` with gradient :math:`g = \nabla L`, the product of the Hessian
with a vector :math:`v` is the gradient of the scalar :math:`g^\top v`:

.. math::  H v = \nabla_\theta \, (g(\theta)^\top v),

so one extra backward pass through the graph of :math:`g` (built by
``autograd.grad(..., create_graph=True)`` or ``loss.backward(create_graph=True)``) gives :math:`Hv`
exactly, without forming :math:`H` (Pearlmutter 1994). This is reverse-over-reverse
differentiation and works for every module PyTorch can differentiate twice.

PyTorch's fused attention kernels (flash, memory-efficient, cuDNN, and the CPU flash kernel) have a
backward that cannot itself be differentiated, so a plain HVP through ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer`` or a timm ViT fails with "derivative for
aten::_scaled_dot_product_flash_attention..._backward is not implemented".
:func:`second_order_safe` fixes that without changes to user code: inside it, scaled-dot-product
attention keeps its fused forward kernel, and only a backward that builds a graph (the
``create_graph=True`` one) recomputes attention with PyTorch's composite "math" formulation, whose
derivative is twice differentiable (:mod:`hessopt._attention`). Weight normalization
(``torch.nn.utils.parametrizations.weight_norm``) is routed the same way, always: PyTorch's fused
``torch._weight_norm`` has a wrong double backward on CPU (asymmetric Hessians), so inside the block
it is computed as the written-out ``v * g / ||v||`` (:mod:`hessopt._weight_norm`).

The same block also routes the layers whose double backward PyTorch computes slowly to fast paths
that give exactly PyTorch's derivatives (float64 tests against the plain path in
tests/test_fast_paths.py): BatchNorm (:mod:`hessopt._batchnorm`, a closed-form double backward
instead of the ~100-kernel ``batchnorm_double_backward``), convolutions (:mod:`hessopt._conv`, the
double backward from PyTorch's own convolution kernels, without the batch-transposed
weight-gradient convolution and its copies) and ReLU (:mod:`hessopt._relu`, no zero cotangents sent
through the network). :func:`fast_paths` switches them off, for comparisons or as an escape hatch.

Functions:
    hvp(loss_fn, params, vectors):             builds the gradient graph, then one HVP.
    hvp_from_grads(grads, params, vectors):    one HVP from gradients that carry their graph.
    second_order_safe():                       context manager, see above.
    fast_paths(batchnorm=, conv=, relu=):      context manager switching the fast paths.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch

from ._patches import fast_paths, forward_mode_safe, second_order_safe  # noqa: F401  (re-exported; the routes live with every other patch)

__all__ = ["hvp", "hvp_from_grads", "second_order_safe", "gradients_with_graph", "as_param_list"]

TensorList = List[torch.Tensor]

_COMPILE_MESSAGE = (
    "the model runs under torch.compile, which does not support double backward (second "
    "derivatives). Use the uncompiled module for Hessian computations: for diagnostics pass "
    "`model._orig_mod`; for AdaHessian train the uncompiled model (or compile only parts that hold "
    "no parameters)."
)


def as_param_list(params: Union[torch.Tensor, Sequence[torch.Tensor]]) -> TensorList:
    """Normalize ``params`` (one tensor or a sequence of tensors) to a list, checking requires_grad."""
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params is empty: pass the tensors to differentiate with respect to")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor")
        if not p.requires_grad:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) does not require grad: it is frozen or not a "
                "parameter; leave it out of params (or call requires_grad_() on it)"
            )
    return params


def _check_vectors(vectors: Union[torch.Tensor, Sequence[torch.Tensor]], params: TensorList) -> TensorList:
    if isinstance(vectors, torch.Tensor):
        vectors = [vectors]
    vectors = list(vectors)
    if len(vectors) != len(params):
        raise ValueError(
            f"got {len(vectors)} vectors for {len(params)} parameters: pass one tensor shaped like "
            "each parameter (flatten/unflatten with the operator's `@` for flat vectors)"
        )
    for i, (v, p) in enumerate(zip(vectors, params)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"vectors[{i}] is a {type(v).__name__}, not a tensor")
        if v.shape != p.shape:
            raise ValueError(
                f"vectors[{i}] has shape {tuple(v.shape)} but its parameter has shape {tuple(p.shape)}"
            )
        if v.dtype != p.dtype:
            raise TypeError(
                f"vectors[{i}] has dtype {v.dtype} but its parameter has dtype {p.dtype}; convert "
                f"with v.to({p.dtype})"
            )
        if v.device != p.device:
            raise ValueError(
                f"vectors[{i}] is on {v.device} but its parameter is on {p.device}; move it with "
                f"v.to({str(p.device)!r})"
            )
    return vectors


@contextlib.contextmanager
def _explain_compile_errors() -> Iterator[None]:
    """Re-raise torch.compile's double-backward failure with a message that says what to do."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if "double backward" in text and ("compile" in text or "aot_autograd" in text):
            raise RuntimeError(_COMPILE_MESSAGE) from err
        raise


def gradients_with_graph(loss: torch.Tensor, params: TensorList) -> TensorList:
    """``d loss / d params`` with ``create_graph=True``; parameters the loss ignores get ``None``."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the loss must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"the loss must be a scalar, got shape {tuple(loss.shape)}; reduce it (e.g. .mean())"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not depend on any tensor that requires grad: check that params are "
            "used by the loss and that it is not computed under torch.no_grad()"
        )
    with _explain_compile_errors():
        grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True)
    return list(grads)


def hvp_from_grads(
    grads: Sequence[Optional[torch.Tensor]],
    params: Sequence[torch.Tensor],
    vectors: Union[torch.Tensor, Sequence[torch.Tensor]],
    retain_graph: bool = True,
) -> TensorList:
    r"""Hessian-vector product :math:`Hv = \nabla_\theta (g^\top v)` from graph-carrying gradients.

    Args:
        grads: gradients of a scalar loss with respect to ``params``, computed with
            ``create_graph=True`` (``torch.autograd.grad`` or ``loss.backward``). ``None`` marks a
            parameter the loss does not use; its block of ``Hv`` is zero.
        params: the tensors the gradients were taken with respect to.
        vectors: one tensor shaped like each parameter.
        retain_graph: keep the gradient graph for further products (default ``True``: HVP-based
            estimators call this many times on one graph). Pass ``False`` on the last call to free
            it early.

    Returns:
        ``Hv`` as a list shaped like ``params``. A parameter that no gradient depends on gets zeros.

    Example:
        >>> loss = model(x).pow(2).mean()
        >>> grads = torch.autograd.grad(loss, params, create_graph=True)
        >>> hv = hessopt.hvp_from_grads(grads, params, [torch.ones_like(p) for p in params])
    """
    return _hvp_from_grads(grads, params, vectors, retain_graph, graph_was_built=False)


def _hvp_from_grads(grads, params, vectors, retain_graph: bool, graph_was_built: bool) -> TensorList:
    """:func:`hvp_from_grads`; ``graph_was_built``: the caller used ``create_graph=True`` itself, so
    gradients without a graph mean zero curvature rather than a forgotten ``create_graph``."""
    params = list(params)
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    vectors = _check_vectors(vectors, params)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live and graph_was_built:
        # The gradients were built with create_graph=True and still depend on nothing: the loss is
        # linear (or constant) in params, so the Hessian is exactly zero.
        return [torch.zeros_like(p) for p in params]
    if not live:
        raise ValueError(
            "the gradients carry no graph, so their derivative cannot be taken: compute them with "
            "create_graph=True (loss.backward(create_graph=True) or torch.autograd.grad(..., "
            "create_graph=True))"
        )
    # d/dθ <g(θ), v> is the vector-Jacobian product of g with v: seeding the backward of the
    # gradients with grad_outputs=v is that product in one pass over all blocks, without recording
    # the dot product (2 kernels and 2 graph nodes per parameter tensor) first.
    with _explain_compile_errors():
        hv = torch.autograd.grad(
            [grads[i] for i in live], params, grad_outputs=[vectors[i] for i in live],
            retain_graph=retain_graph, allow_unused=True,
        )
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]


def hvp(
    loss_fn: Callable[[], torch.Tensor],
    params: Union[torch.Tensor, Sequence[torch.Tensor]],
    vectors: Union[torch.Tensor, Sequence[torch.Tensor]],
) -> TensorList:
    r"""Hessian-vector product of ``loss_fn()`` with respect to ``params``.

    Evaluates the loss under :func:`second_order_safe` (so attention layers work), builds its
    gradient graph, and returns :math:`Hv` as a list shaped like ``params``. To multiply many
    vectors with one Hessian, build the gradients once and call :func:`hvp_from_grads` instead
    (or use :class:`hessopt.HessianOperator`, which does this for you).

    Example:
        >>> params = list(model.parameters())
        >>> hv = hessopt.hvp(lambda: F.cross_entropy(model(x), y), params, [torch.randn_like(p) for p in params])
    """
    params = as_param_list(params)
    vectors = _check_vectors(vectors, params)
    with second_order_safe():
        loss = loss_fn()
        grads = gradients_with_graph(loss, params)
    return _hvp_from_grads(grads, params, vectors, retain_graph=False, graph_was_built=True)


def _hvp_forward_over_reverse(
    loss_of: Callable[[TensorList], torch.Tensor],
    params: Sequence[torch.Tensor],
    vectors: Union[torch.Tensor, Sequence[torch.Tensor]],
) -> TensorList:
    r"""``Hv`` by forward-over-reverse differentiation: the directional derivative of the gradient,
    :math:`Hv = \tfrac{d}{dt} \nabla L(\theta + t v)|_{t=0}`, as ``torch.func.jvp(torch.func.grad(L))``.

    ``loss_of(list_of_tensors)`` must be a pure function of the tensors it is given (for a module:
    ``torch.func.functional_call(model, dict(zip(names, tensors)), args)``). No backward graph is
    stored, so memory stays near one forward pass with tangents; the cost is one forward and one
    backward pass, each carrying tangents. Attention runs PyTorch's composite "math" kernel (the
    fused kernels have no forward-mode derivative). In-place updates of captured tensors are not
    allowed inside torch.func transforms: BatchNorm in train mode must not update running
    statistics (:class:`hessopt.HessianOperator` detaches them). One jvp per product, never
    ``vmap``: on torch 2.14 ``torch.func.hessian`` (``vmap`` over jvps) is wrong through
    ``batch_norm`` and ``layer_norm``, while a single jvp of the gradient agrees with the double
    backward (tests/test_fast_paths.py).
    """
    params = list(params)
    vectors = _check_vectors(vectors, params)
    primals = tuple(p.detach() for p in params)
    gradient = torch.func.grad(lambda *ps: loss_of(list(ps)).reshape(()), argnums=tuple(range(len(primals))))
    with forward_mode_safe(), _explain_compile_errors():
        _, hv = torch.func.jvp(gradient, primals, tuple(v.detach() for v in vectors))
    return list(hv)


# --------------------------------------------------------------------------------------------------
# Interception of the functions with a twice-differentiable (or faster twice-differentiable) variant
# --------------------------------------------------------------------------------------------------

