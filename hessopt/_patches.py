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
from typing import Any, Callable, Iterator, List

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["ThreadLocalPatch", "replacing", "all_active", "BACKWARD", "graph_building_backward", "capture_cross_entropy"]

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
