r"""Convolutions whose double backward runs PyTorch's own forward and backward kernels (used by
:func:`hessopt.second_order_safe`).

The graph-building backward of a convolution ``y = conv(x, W) + b`` computes, with the fused
``convolution_backward`` kernel, the data gradient :math:`\partial_x = \mathrm{conv}^\top(g, W)`,
the weight gradient :math:`\partial_W = \mathrm{wgrad}(x, g)` and :math:`\partial_b = \sum g`
(:math:`g` the incoming gradient). All three are bilinear, so their backward, for cotangents
:math:`a` (of :math:`\partial_x`), :math:`C_W`, :math:`c_b`, is again made of convolutions:

.. math::

    \bar g = \mathrm{conv}(a, W) + \mathrm{conv}(x, C_W) + c_b,\qquad
    \bar W = \mathrm{wgrad}(a, g),\qquad
    \bar x = \mathrm{conv}^\top(g, C_W),

i.e. two forward convolutions, one weight-gradient and one data-gradient kernel. PyTorch's
``_convolution_double_backward`` evaluates :math:`\bar W` as a *forward* convolution of the
batch-transposed tensors (batch as channels, the gradient as a kernel as large as the image),
with transposed copies around it; here the same quantities come from ``convolution_backward``
itself (cuDNN's backward-filter and backward-data algorithms on a GPU), and nothing is copied.

Covered: ``F.conv1d/2d/3d`` (what ``nn.Conv1d/2d/3d`` call) with numeric or ``"valid"`` padding,
any stride, dilation and groups, outside autocast, ``torch.func`` transforms and forward-mode AD.
Anything else (``padding="same"``, transposed convolutions, unbatched inputs, tensor subclasses)
runs PyTorch's own ``F.conv*d``.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

__all__ = ["ORIGINAL_CONV", "conv"]

ORIGINAL_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_CONVOLUTION = torch.convolution
# the C++ entry point of the op (skips a Python layer per call: this runs once per layer and pass)
_CONVOLUTION_BACKWARD = getattr(torch.ops.aten.convolution_backward.default, "_op",
                                torch.ops.aten.convolution_backward.default)


def _tuple(value: Union[int, Sequence[int]], n: int) -> List[int]:
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    return value * n if len(value) == 1 else value


class _Config:
    """The geometry of one convolution (what ``convolution`` and ``convolution_backward`` take)."""

    __slots__ = ("stride", "padding", "dilation", "groups", "zeros")

    def __init__(self, n, stride, padding, dilation, groups):
        self.stride, self.padding, self.dilation = _tuple(stride, n), _tuple(padding, n), _tuple(dilation, n)
        self.groups, self.zeros = int(groups), [0] * n

    def forward(self, x, w, b):
        return _CONVOLUTION(x, w, b, self.stride, self.padding, self.dilation, False, self.zeros, self.groups)

    def backward(self, g, x, w, bias_sizes, mask):
        return _CONVOLUTION_BACKWARD(g, x, w, bias_sizes, self.stride, self.padding, self.dilation, False,
                                     self.zeros, self.groups, mask)


class _ConvBackward(torch.autograd.Function):
    """Graph-building backward of :class:`_Conv`: forward = ``convolution_backward``; backward = the
    convolutions of the module docstring (differentiable again: third derivatives stay exact)."""

    @staticmethod
    def forward(ctx, x, w, g, config, has_bias, mask):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.config = config
        ctx.save_for_backward(x, w, g)
        gx, gw, gb = config.backward(g, x, w, [w.shape[0]] if has_bias else None, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None)

    @staticmethod
    def backward(ctx, a, c_w, c_b):  # type: ignore[override]
        x, w, g = ctx.saved_tensors
        config = ctx.config
        need_x, need_w, need_g = ctx.needs_input_grad[:3]
        x_bar = w_bar = g_bar = None
        with torch._C.DisableTorchFunction():  # plain tensors only; skips any active mode per op
            if need_x and c_w is not None:
                x_bar = config.backward(g, x, c_w, None, [True, False, False])[0]
            if need_w and a is not None:
                w_bar = config.backward(g, a, w, None, [False, True, False])[1]
            if need_g:
                if a is not None:
                    g_bar = config.forward(a, w, c_b)
                if c_w is not None:
                    term = config.forward(x, c_w, None if a is not None else c_b)
                    g_bar = term if g_bar is None else g_bar + term
                if g_bar is None and c_b is not None:
                    g_bar = c_b.reshape((1, -1) + (1,) * (g.dim() - 2)).expand_as(g).clone()
        return x_bar, w_bar, g_bar, None, None, None


class _Conv(torch.autograd.Function):
    """``F.conv*d`` with PyTorch's kernels forward and first-order backward; the graph-building
    backward is recorded as :class:`_ConvBackward`."""

    @staticmethod
    def forward(ctx, x, w, b, config):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.config, ctx.has_bias = config, b is not None
        ctx.save_for_backward(x, w)
        return config.forward(x, w, b)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        if g is None:
            return None, None, None, None
        x, w = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        with torch._C.DisableTorchFunction():
            if torch.is_grad_enabled():  # create_graph=True: record the backward as a differentiable node
                gx, gw, gb = _ConvBackward.apply(x, w, g, ctx.config, ctx.has_bias, mask)
            else:
                gx, gw, gb = ctx.config.backward(g, x, w, [w.shape[0]] if ctx.has_bias else None, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None)


def _use_fast_path(n, x, w, b, padding) -> bool:
    """Whether the fast path applies (plain tensors, checked by the caller; torch function disabled)."""
    return (
        x.dim() == n + 2
        and w.dim() == n + 2  # unbatched inputs: PyTorch's own checks and messages
        and x.is_floating_point()
        and w.dtype == x.dtype
        and (b is None or b.dtype == x.dtype)
        and not (isinstance(padding, str) and padding != "valid")
        and torch.is_grad_enabled()
        and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
        and not torch.is_autocast_enabled(x.device.type)  # autocast casts inside the kernel call
        and not torch._C._are_functorch_transforms_active()  # torch.func needs rules this does not define
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and torch.autograd.forward_ad._current_level < 0  # forward-mode AD (dual tensors)
    )


def conv(n: int):
    """A drop-in for ``F.conv{n}d`` (same signature) taking the fast path where it applies."""
    original = ORIGINAL_CONV[n]

    def conv_nd(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if type(input) in _PLAIN and type(weight) in _PLAIN and (bias is None or type(bias) in _PLAIN):
            # plain tensors: no __torch_function__ to honour, so skip any active mode's Python
            # dispatch (one per tensor attribute access otherwise)
            with torch._C.DisableTorchFunction():
                if _use_fast_path(n, input, weight, bias, padding):
                    config = _Config(n, stride, 0 if padding == "valid" else padding, dilation, groups)
                    return _Conv.apply(input, weight, bias, config)
                return original(input, weight, bias, stride, padding, dilation, groups)
        return original(input, weight, bias, stride, padding, dilation, groups)

    conv_nd.__name__ = conv_nd.__qualname__ = f"conv{n}d"
    return conv_nd
