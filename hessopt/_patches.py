"""Temporary, thread-local replacements of torch functions: one mechanism, one locking rule.

The HVP core reroutes functions of ``torch.nn.functional`` inside :func:`hessopt.second_order_safe`
(twice-differentiable attention, fast double backwards) and the optimizers need to change what a
user's *unchanged* closure does on curvature steps: its
``loss.backward()`` must build (or keep) the graph, and its ``F.cross_entropy`` call must hand over
the logits. The logits are taken by a torch function mode (:class:`_CrossEntropyCapture`, per
thread by torch's own rule). ``backward()`` is changed by replacing ``torch.autograd.backward`` with
a wrapper (``Tensor.backward`` calls it; a function mode does not see it) that

* is installed while at least one thread is inside an :meth:`ThreadLocalPatch.active` block
  (reference-counted under one lock, :data:`_LOCK`) and removed when the last one leaves;
* acts only for the threads inside such a block (a thread-local stack of payloads); every other
  thread's call passes through unchanged;
* stays in place, passing calls through, when other code wrapped it meanwhile (removing it then
  would drop the other wrapper); a call that comes back into it from such a wrapper goes to the
  function underneath, so a foreign wrapper can never make it recurse (the old closure wrapper
  recursed forever then).
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any, Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import _attention, _batchnorm, _conv, _relu, _weight_norm

__all__ = ["ThreadLocalPatch", "replacing", "all_active", "fast_paths", "second_order_safe", "forward_mode_safe",
           "frozen_activations", "replaying", "PatternMismatch",
           "BACKWARD", "graph_building_backward", "capture_cross_entropy"]

_LOCK = threading.Lock()


class ThreadLocalPatch:
    """Replace ``owner.name`` by ``act(payload, original, *args, **kwargs)`` for threads inside :meth:`active`."""

    def __init__(self, owner: Any, name: str, act: Callable[..., Any]):
        self.owner, self.name, self.act = owner, name, act
        self._local = threading.local()
        self._installs = 0
        self._base: Callable[..., Any] = getattr(owner, name)  # what was there when hessopt was imported
        self._original: Callable[..., Any] = self._base  # what our wrapper calls: the attribute it replaced

        def wrapper(*args, **kwargs):
            local = self._local
            if getattr(local, "busy", False):
                # called again from inside our own call: a foreign wrapper that wrapped ours sits in
                # self._original; go to the function underneath instead of around the loop again
                return self._base(*args, **kwargs)
            local.busy = True
            try:
                stack = getattr(local, "stack", None)
                if stack:
                    return self.act(stack[-1], self._original, *args, **kwargs)
                return self._original(*args, **kwargs)
            finally:
                local.busy = False

        self.wrapper = wrapper

    @contextlib.contextmanager
    def active(self, payload: Any) -> Iterator[Any]:
        """Inside the block, this thread's calls of ``owner.name`` go through ``act`` with ``payload``."""
        with _LOCK:
            current = getattr(self.owner, self.name)
            if current is not self.wrapper:
                self._original = current
                setattr(self.owner, self.name, self.wrapper)
            self._installs += 1
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append(payload)
        try:
            yield payload
        finally:
            stack.pop()
            with _LOCK:
                self._installs -= 1
                # code that wrapped ours meanwhile keeps its wrapper (ours inside it passes calls through)
                if self._installs == 0 and getattr(self.owner, self.name) is self.wrapper:
                    setattr(self.owner, self.name, self._original)


def replacing(owner: Any, name: str, replacement: Callable[..., Any]) -> ThreadLocalPatch:
    """A :class:`ThreadLocalPatch` that calls ``replacement`` instead of ``owner.name`` inside its blocks."""
    return ThreadLocalPatch(owner, name, lambda payload, original, *args, **kwargs: replacement(*args, **kwargs))


@contextlib.contextmanager
def all_active(patches, payload: Any = None) -> Iterator[None]:
    """Every patch of ``patches`` active for this thread inside the block."""
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch.active(payload))
        yield


# -- second_order_safe / forward_mode_safe: the torch.nn.functional routes and function modes ---------

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
_F_ROUTES = [replacing(F, name, patched) for name, (_, patched) in _F_PATCHES.items()]


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
    Re-entrant and per thread: the module attributes are replaced (this module's thread-local mechanism) while
    any thread is inside the block, and act only for the threads inside it.

    Example:
        >>> with hessopt.second_order_safe():
        ...     loss = criterion(transformer(x), y)
        ...     grads = torch.autograd.grad(loss, params, create_graph=True)
        >>> hv = hessopt.hvp_from_grads(grads, params, vectors)
    """
    with all_active(_F_ROUTES), _SecondOrderMode():
        yield


# -- autograd.backward: build or keep the graph ------------------------------------------------------

# Bound against torch's own signature: a wrapper installed by other code may take (*args, **kwargs),
# where setting "create_graph" on the bound arguments would be silently dropped.
_BACKWARD_SIGNATURE = inspect.signature(torch.autograd.backward)


def _backward(payload, original, *args, **kwargs):
    bound = _BACKWARD_SIGNATURE.bind(*args, **kwargs)
    for key, value in payload.items():
        bound.arguments[key] = value
    return original(*bound.args, **bound.kwargs)


BACKWARD = ThreadLocalPatch(torch.autograd, "backward", _backward)


@contextlib.contextmanager
def graph_building_backward(create_graph: bool = True, retain_graph: bool = False) -> Iterator[None]:
    """Inside the block, this thread's ``backward()`` calls build the gradient's graph
    (``create_graph=True``) and/or keep the forward graph (``retain_graph=True``).

    ``Tensor.backward`` (and so GradScaler, Accelerate, Lightning, ...) goes through
    ``torch.autograd.backward``: the one place to turn a user's plain ``loss.backward()`` into the
    backward a curvature step needs. PyTorch's warning about the parameter-gradient reference cycle
    is silenced: the optimizers detach the gradients after the step, which breaks that cycle.
    """
    import warnings

    payload = {}
    if create_graph:
        payload["create_graph"] = True
    if retain_graph or create_graph:
        payload["retain_graph"] = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle.*")
        with BACKWARD.active(payload):
            yield


# -- F.cross_entropy: hand over the logits -------------------------------------------------------------

_CROSS_ENTROPY = F.cross_entropy
_CROSS_ENTROPY_SIGNATURE = inspect.signature(F.cross_entropy)


class _CrossEntropyCapture(TorchFunctionMode):
    """Records every ``F.cross_entropy`` call made while it is active (this thread only: torch keeps
    function modes per thread). A function mode, not an attribute patch, so that calls through a
    reference taken earlier (``loss_fn = F.cross_entropy``, ``from torch.nn.functional import
    cross_entropy``, ``nn.CrossEntropyLoss``) are seen too; the call itself runs unchanged."""

    def __init__(self):
        super().__init__()
        self.captures: List[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _CROSS_ENTROPY:
            bound = _CROSS_ENTROPY_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            self.captures.append({"logits": a["input"], "target": a["target"], "ignore_index": a["ignore_index"],
                                  "reduction": a["reduction"], "size_average": a["size_average"],
                                  "reduce": a["reduce"]})
        return func(*args, **kwargs)


@contextlib.contextmanager
def capture_cross_entropy() -> Iterator[List[dict]]:
    """Record every ``F.cross_entropy`` call of this thread inside the block (``nn.CrossEntropyLoss``
    and HuggingFace models call it too): a list of dicts with ``logits`` (graph attached), ``target``,
    ``ignore_index`` and ``reduction``."""
    with _CrossEntropyCapture() as mode:
        yield mode.captures


# -- frozen activation patterns: finite differences of piecewise-linear networks ------------------------

#: the piecewise-linear activations whose pattern :func:`frozen_activations` records and replays:
#: func -> (position of the negative slope argument, or None for ReLU; position of the ``inplace``
#: argument, or True for the functions that always work in place)
_PIECEWISE = {
    F.relu: (None, 1), torch.relu: (None, None), torch.Tensor.relu: (None, None),
    torch.relu_: (None, True), torch.Tensor.relu_: (None, True), F.relu_: (None, True),
    F.leaky_relu: (1, 2), F.leaky_relu_: (1, True),
}
#: max pooling (``F.max_poolNd``, with or without indices) -> (the function returning indices, N)
_MAX_POOLS = {}
for _n in (1, 2, 3):
    _with = getattr(F, f"max_pool{_n}d_with_indices")
    _MAX_POOLS[getattr(F, f"max_pool{_n}d")] = (_with, _n)
    _MAX_POOLS[_with] = (_with, _n)


class PatternMismatch(RuntimeError):
    """The activations called while replaying differ from those recorded (data-dependent control flow)."""


class _FrozenActivations(TorchFunctionMode):
    """Record (``masks is None``) or replay, in call order, the on/off pattern of ReLU and leaky-ReLU
    calls (a boolean mask) and the argmax of max pooling (its indices)."""

    def __init__(self, masks: Optional[List[torch.Tensor]]):
        super().__init__()
        self.recording = masks is None
        self.masks: List[torch.Tensor] = [] if masks is None else masks
        self.index = 0

    def _next(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.index >= len(self.masks) or self.masks[self.index].dtype != dtype or (
                dtype == torch.bool and self.masks[self.index].shape != like.shape):
            raise PatternMismatch(f"activation call {self.index} does not match the recorded pattern")
        self.index += 1
        return self.masks[self.index - 1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pool = _MAX_POOLS.get(func)
        if pool is not None:
            return self._max_pool(func, *pool, args, kwargs)
        kind = _PIECEWISE.get(func)
        if kind is None:
            return func(*args, **kwargs)
        x = args[0]
        if self.recording:
            self.masks.append(x.detach() > 0)  # before an in-place call overwrites x
            return func(*args, **kwargs)
        mask = self._next(x, torch.bool)
        slope_at, inplace_at = kind
        inplace = inplace_at is True or (inplace_at is not None and (
            kwargs.get("inplace", False) or (len(args) > inplace_at and bool(args[inplace_at]))))
        if slope_at is None:  # ReLU: the mask itself is the factor
            factor = mask
        else:
            slope = kwargs.get("negative_slope", args[slope_at] if len(args) > slope_at else 0.01)
            factor = torch.where(mask, torch.ones((), dtype=x.dtype, device=x.device),
                                 torch.full((), slope, dtype=x.dtype, device=x.device))
        return x.mul_(factor) if inplace else x * factor

    def _max_pool(self, func, with_indices, spatial: int, args, kwargs):
        """Max pooling: record the argmax indices; replay them as a gather (the same window entries
        are picked whatever the new values, so the output is linear in the input, as on one piece).
        The indices count positions in each (sample, channel) plane of the input."""
        want_indices = bool(kwargs.pop("return_indices", False)) or func is with_indices
        if self.recording:
            out, idx = with_indices(*args, **kwargs)
            self.masks.append(idx)
            return (out, idx) if want_indices else out
        x = args[0]
        idx = self._next(x, torch.long)
        lead = x.dim() - spatial  # the (N, C) or (C,) dimensions in front of the pooled ones
        out = x.flatten(lead).gather(lead, idx.flatten(lead)).view(idx.shape)
        return (out, idx) if want_indices else out


def replaying(masks: Optional[List[torch.Tensor]]):
    """``frozen_activations(masks)`` to replay a recorded pattern, nothing for ``None`` (no pattern)."""
    return contextlib.nullcontext() if masks is None else frozen_activations(masks)


@contextlib.contextmanager
def frozen_activations(masks: Optional[List[torch.Tensor]] = None) -> Iterator[List[torch.Tensor]]:
    r"""Record, or replay, which units of every ReLU / leaky-ReLU call are on and which entry every
    max-pooling window picks (this thread only).

    Without ``masks`` the block runs unchanged and yields the list it fills, in call order, with one
    boolean mask ``x > 0`` per ReLU call and the argmax indices of every ``F.max_pool{1,2,3}d``
    call. With ``masks`` (a list recorded so) each ReLU call instead multiplies its input by the
    recorded pattern (1 where the unit was on, the negative slope where it was off), in place when
    the call was, and each max pooling gathers the recorded entries: the network becomes the
    polynomial it is on the recorded piece. Why: a finite difference of gradients of a
    piecewise-linear network across a kink picks up the gradient's jump divided by the step, which
    does not vanish as the step shrinks (each crossed unit adds a term of order ``jump / step`` and
    the number crossed is of order ``step``); measured
    on a 784-1024-1024-10 ReLU MLP, batch 64, float64, central differences at the default step: 331x
    the size of the true Hessian-vector product, 1.0e-10 with the pattern frozen. Raises
    :class:`PatternMismatch` when the calls differ from the recorded ones.
    """
    mode = _FrozenActivations(masks)
    with mode:
        yield mode.masks
    if not mode.recording and mode.index != len(mode.masks):
        raise PatternMismatch(f"{mode.index} activation calls replayed, {len(mode.masks)} recorded")
