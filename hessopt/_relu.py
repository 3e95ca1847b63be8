r"""ReLU whose graph-building backward does not send zeros through the network (used by
:func:`hessopt.second_order_safe`).

The backward of ``y = relu(x)`` is ``threshold_backward(g, y, 0) = g * [y > 0]``. PyTorch records
it as a node that is differentiable in both ``g`` and ``y``, and its derivative in ``y`` is zero
(the mask is piecewise constant). In an HVP that zero is still materialized (``zeros_like``) and
propagated backwards: through the ReLU node, the normalization layer before it, and added to the
real cotangent of the convolution output. That is about ten full-size memory passes per
conv-norm-ReLU block that all compute zero.

Here the mask is taken from the detached output, so the recorded node depends on ``g`` only and
its backward is the single kernel ``threshold_backward(cotangent, y, 0)``. The result is exactly
PyTorch's (same kernels, same values; the discarded term is identically zero), for every order of
derivative. ``F.relu`` (in place or not; what ``nn.ReLU`` calls), ``torch.relu``, ``torch.relu_``
and the tensor methods are covered; tensor subclasses, ``torch.func`` transforms and forward-mode
AD run PyTorch's own ``relu``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ORIGINALS", "relu", "relu_"]

ORIGINAL_F_RELU = F.relu
#: the functions intercepted, by identity (``F.relu`` is a Python function; the others built-ins)
ORIGINALS = {
    "F.relu": F.relu,
    "torch.relu": torch.relu,
    "torch.relu_": torch.relu_,
    "Tensor.relu": torch.Tensor.relu,
    "Tensor.relu_": torch.Tensor.relu_,
}
_THRESHOLD_BACKWARD = getattr(torch.ops.aten.threshold_backward.default, "_op",
                              torch.ops.aten.threshold_backward.default)


class _ReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inplace):  # type: ignore[override]
        if inplace:
            ctx.mark_dirty(x)
            out = torch.relu_(x)
        else:
            out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        with torch._C.DisableTorchFunction():
            # detached: the mask [y > 0] is a constant, so a graph-building backward records a node
            # that depends on g alone (the derivative through y is identically zero)
            return _THRESHOLD_BACKWARD(g, out.detach(), 0), None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Drop-in for ``F.relu``."""
    if type(input) in _PLAIN:
        # plain tensor: skip any active mode's Python dispatch (one per attribute access otherwise)
        with torch._C.DisableTorchFunction():
            if (
                input.requires_grad
                and torch.is_grad_enabled()
                and input.is_floating_point()
                and not torch._C._are_functorch_transforms_active()  # torch.func needs rules this does not define
                and not torch._C._functorch.is_functorch_wrapped_tensor(input)
                and torch.autograd.forward_ad._current_level < 0  # forward-mode AD (dual tensors)
            ):
                return _ReLU.apply(input, bool(inplace))
            return torch.relu_(input) if inplace else torch.relu(input)
    return ORIGINAL_F_RELU(input, inplace=inplace)


def relu_(input: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``torch.relu_`` / ``Tensor.relu_``."""
    return relu(input, inplace=True)
