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
_CONVOLUTION = torch.ops.aten.convolution.default
_CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default


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
        with torch._C.DisableTorchFunction():
            gx, gw, gb = config.backward(g, x, w, [w.shape[0]] if has_bias else None, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None)

    @staticmethod
    def backward(ctx, a, c_w, c_b):  # type: ignore[override]
        x, w, g = ctx.saved_tensors
        config = ctx.config
        need_x, need_w, need_g = ctx.needs_input_grad[:3]
        x_bar = w_bar = g_bar = None
        with torch._C.DisableTorchFunction():
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
        with torch._C.DisableTorchFunction():
            return config.forward(x, w, b)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        if g is None:
            return None, None, None, None
        x, w = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        if torch.is_grad_enabled():  # create_graph=True: record the backward as a differentiable node
            gx, gw, gb = _ConvBackward.apply(x, w, g, ctx.config, ctx.has_bias, mask)
        else:
            with torch._C.DisableTorchFunction():
                gx, gw, gb = ctx.config.backward(g, x, w, [w.shape[0]] if ctx.has_bias else None, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None)


def _plain_tensor(t) -> bool:
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter)


def _use_fast_path(n, x, w, b, padding) -> bool:
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)):
        return False
    if not (x.is_floating_point() and x.dim() == n + 2 and w.dim() == n + 2):
        return False  # unbatched inputs and integer tensors: PyTorch's own checks and messages
    if isinstance(padding, str) and padding != "valid":
        return False
    if not (_plain_tensor(x) and _plain_tensor(w) and _plain_tensor(b)):
        return False
    if w.dtype != x.dtype or w.device != x.device or (b is not None and (b.dtype != x.dtype or b.device != x.device)):
        return False
    if not torch.is_grad_enabled() or not (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False  # autocast casts inside the kernel call; leave the casting to PyTorch
    if torch._C._are_functorch_transforms_active() or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    return True


def conv(n: int):
    """A drop-in for ``F.conv{n}d`` (same signature) taking the fast path where it applies."""
    original = ORIGINAL_CONV[n]

    def conv_nd(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if not _use_fast_path(n, input, weight, bias, padding):
            return original(input, weight, bias, stride, padding, dilation, groups)
        if padding == "valid":
            padding = 0
        return _Conv.apply(input, weight, bias, _Config(n, stride, padding, dilation, groups))

    conv_nd.__name__ = conv_nd.__qualname__ = f"conv{n}d"
    return conv_nd
