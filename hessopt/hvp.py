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
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import _attention, _batchnorm, _conv, _patches, _relu, _weight_norm

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

#: fast paths behind :func:`second_order_safe` that can be switched off (for comparisons and as an
#: escape hatch); attention routing is not optional: without it fused attention has no HVP at all
_FAST_PATHS = {"batchnorm": True, "conv": True, "relu": True}


@contextlib.contextmanager
def fast_paths(
    batchnorm: Optional[bool] = None, conv: Optional[bool] = None, relu: Optional[bool] = None
) -> Iterator[None]:
    """Switch hessopt's optional fast paths on or off inside the block (process-wide).

    All are on by default; each gives exactly PyTorch's derivatives, faster: ``batchnorm``
    (:mod:`hessopt._batchnorm`: closed-form double backward), ``conv`` (:mod:`hessopt._conv`:
    double backward from PyTorch's own convolution kernels, no transposed copies), ``relu``
    (:mod:`hessopt._relu`: no zero cotangents sent through the network). ``None`` leaves a setting
    as it is. Example: ``with hessopt.hvp.fast_paths(batchnorm=False):`` gives PyTorch's own
    BatchNorm double backward.
    """
    saved = dict(_FAST_PATHS)
    for name, value in (("batchnorm", batchnorm), ("conv", conv), ("relu", relu)):
        if value is not None:
            _FAST_PATHS[name] = bool(value)
    try:
        yield
    finally:
        _FAST_PATHS.update(saved)


def _routed(path: str, fast: Callable, original: Callable) -> Callable:
    """``fast`` while the fast path ``path`` is on, else ``original`` (decided at call time)."""

    def call(*args, **kwargs):
        return (fast if _FAST_PATHS[path] else original)(*args, **kwargs)

    call.__name__ = call.__qualname__ = getattr(original, "__name__", path)
    call.__doc__ = f"``{call.__name__}`` inside hessopt.second_order_safe() (fast path {path!r})."
    return call


# func -> (fast-path name or None for always, replacement): what the TorchFunctionMode routes
_ROUTES = {
    _attention.ORIGINAL_SDPA: (None, _attention.sdpa_twice_differentiable),
    # a correctness route, not a fast path: torch's fused weight norm has a wrong double backward
    _weight_norm.ORIGINAL_WEIGHT_NORM: (None, _weight_norm.weight_norm),
    _batchnorm.ORIGINAL_F_BATCH_NORM: ("batchnorm", _batchnorm.batch_norm),
    _batchnorm.ORIGINAL_TORCH_BATCH_NORM: ("batchnorm", _batchnorm.torch_batch_norm),
    _relu.ORIGINALS["F.relu"]: ("relu", _relu.relu),
    _relu.ORIGINALS["torch.relu"]: ("relu", _relu.relu),
    _relu.ORIGINALS["torch.relu_"]: ("relu", _relu.relu_),
    _relu.ORIGINALS["Tensor.relu"]: ("relu", _relu.relu),
    _relu.ORIGINALS["Tensor.relu_"]: ("relu", _relu.relu_),
}
_ROUTES.update({original: ("conv", _conv.conv(n)) for n, original in _conv.ORIGINAL_CONV.items()})

# module attributes of torch.nn.functional replaced inside the block (looked up at call time by
# nn.BatchNorm*, nn.Conv*d, nn.ReLU, nn.MultiheadAttention and most libraries)
_F_PATCHES = {
    "scaled_dot_product_attention": (_attention.ORIGINAL_SDPA, _attention.sdpa_twice_differentiable),
    "batch_norm": (_batchnorm.ORIGINAL_F_BATCH_NORM,
                   _routed("batchnorm", _batchnorm.batch_norm, _batchnorm.ORIGINAL_F_BATCH_NORM)),
    "relu": (_relu.ORIGINALS["F.relu"], _routed("relu", _relu.relu, _relu.ORIGINALS["F.relu"])),
}
_F_PATCHES.update({
    f"conv{n}d": (original, _routed("conv", _ROUTES[original][1], original))
    for n, original in _conv.ORIGINAL_CONV.items()
})


class _SecondOrderMode(TorchFunctionMode):
    """Routes direct calls of the intercepted functions, however they were imported."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        route = _ROUTES.get(func)
        if route is not None and (route[0] is None or _FAST_PATHS[route[0]]):
            return route[1](*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _ForwardModeMode(TorchFunctionMode):
    """Routes the functions that have no forward-mode derivative to written-out forms."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is _weight_norm.ORIGINAL_WEIGHT_NORM:
            return _weight_norm.weight_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def forward_mode_safe() -> Iterator[None]:
    """The forward-mode counterpart of :func:`second_order_safe` (``torch.func.jvp`` paths: the
    forward-over-reverse HVP, the GGN's Jacobian-vector products): attention runs PyTorch's
    composite math kernel (the fused kernels have no forward-mode derivative) and
    ``torch._weight_norm`` runs written out (it has none either: "Trying to use forward AD with
    _weight_norm_interface")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), _ForwardModeMode():
        yield


# module attributes of torch.nn.functional, replaced for this thread inside second_order_safe()
_F_ROUTES = [_patches.replacing(F, name, patched) for name, (_, patched) in _F_PATCHES.items()]


@contextlib.contextmanager
def second_order_safe() -> Iterator[None]:
    """Make scaled-dot-product attention twice differentiable inside the ``with`` block.

    Forward passes run inside the block record an attention node whose first-order backward is the
    fused kernel's and whose graph-building backward (``create_graph=True``) is the composite math
    formulation, so HVPs through ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer`` and timm ViTs work. Calls are intercepted both through the
    module attribute ``torch.nn.functional.scaled_dot_product_attention`` (which ``nn.MultiheadAttention``
    and most libraries look up at call time) and through a ``TorchFunctionMode`` (for code that
    imported the function directly). Attention with ``dropout_p > 0`` runs in the math formulation.
    ``torch._weight_norm`` (behind ``torch.nn.utils.parametrizations.weight_norm``) runs written
    out, ``v * g / ||v||``: PyTorch's fused kernel has a wrong double backward on CPU.
    ``F.batch_norm``, ``F.conv1d/2d/3d`` and ``F.relu`` (and their ``torch.*`` spellings) take the
    fast paths of the module docstring: same values and derivatives, faster double backward.
    Re-entrant and per thread: the module attributes are replaced (:mod:`hessopt._patches`) while
    any thread is inside the block, and act only for the threads inside it.

    Example:
        >>> with hessopt.second_order_safe():
        ...     loss = criterion(transformer(x), y)
        ...     grads = torch.autograd.grad(loss, params, create_graph=True)
        >>> hv = hessopt.hvp_from_grads(grads, params, vectors)
    """
    with _patches.all_active(_F_ROUTES), _SecondOrderMode():
        yield
