r"""Batch normalization with a fast, closed-form double backward (used by :func:`hessopt.second_order_safe`).

An HVP by reverse-over-reverse differentiation runs three passes through every layer: the forward,
the graph-building backward (``create_graph=True``) and the backward *of that backward*. For
``F.batch_norm`` PyTorch records its fused backward kernel in the second pass, and differentiates it
in the third with ``batchnorm_double_backward``, a generic composite of about a hundred small
kernels (it reduces over one dimension at a time and recomputes many terms). That composite is why
an HVP through a train-mode BatchNorm network costs 7.3 gradients where the same network without
BatchNorm costs 4.7 (torchvision resnet50, 224x224, batch 64, one H100; measured by the hessopt
authors).

Here the three passes are:

1. forward: PyTorch's fused ``native_batch_norm`` kernel (running statistics are updated in place
   by that kernel, exactly as ``F.batch_norm`` does; ``num_batches_tracked`` and the cumulative
   momentum are handled by ``nn.BatchNorm``'s Python code, before the call, as always);
2. backward: PyTorch's fused ``native_batch_norm_backward`` kernel. When the backward builds a
   graph, it is recorded as the node :class:`_BatchNormBackward`, whose derivative is written out:
3. backward of the backward: the closed form below, a dozen elementwise passes and reductions over
   the activations, and no extra tensor kept in memory (the node saves the input and the incoming
   gradient, as PyTorch's node does).

The math (one channel; sums run over the ``M`` entries of the channel, i.e. over the batch and
spatial dimensions). Train mode, with batch statistics:

.. math::

    \mu = \tfrac1M \textstyle\sum x,\quad r = (\tfrac1M \sum (x-\mu)^2 + \epsilon)^{-1/2},\quad
    \hat x = (x - \mu) r,\quad y = \gamma \hat x + \beta.

Backward, for an incoming gradient :math:`g = \partial L / \partial y`, with :math:`G_1 = \sum g`
and :math:`G_2 = \sum g \hat x`:

.. math::

    \partial_\beta = G_1,\quad \partial_\gamma = G_2,\quad
    \partial_x = \gamma r \,(g - G_1/M - \hat x\, G_2/M).

Backward of the backward, for cotangents :math:`a` (of :math:`\partial_x`), :math:`c_\gamma`,
:math:`c_\beta`, with :math:`A_1 = \sum a`, :math:`A_2 = \sum a \hat x` and
:math:`S = \sum a g - A_1 G_1/M - A_2 G_2/M` (using that :math:`g \mapsto g - \bar g - \hat x
\,\overline{g \hat x}` is symmetric, and that :math:`\partial \hat x / \partial x = r (I -
\tfrac1M \mathbf 1 \mathbf 1^\top - \tfrac1M \hat x \hat x^\top)`,
:math:`\partial r / \partial x = -r^2 \hat x / M`):

.. math::

    \bar g &= \gamma r\,(a - A_1/M - \hat x A_2/M) + c_\gamma \hat x + c_\beta, \\
    \bar\gamma &= r S, \\
    \bar x &= \alpha_a a + \alpha_g g + \alpha_x \hat x + \alpha_0, \quad\text{with}\\
    \alpha_a &= -\gamma r^2 G_2/M,\quad \alpha_g = -\gamma r^2 A_2/M + r c_\gamma,\\
    \Sigma_u &= -\tfrac{\gamma r}{M}(A_1 G_2 + G_1 A_2) + c_\gamma G_1,\quad
    \Sigma_{u\hat x} = -\tfrac{2\gamma r}{M} A_2 G_2 + c_\gamma G_2,\\
    \alpha_x &= -\tfrac rM \Sigma_{u\hat x} - \gamma S r^2/M,\quad \alpha_0 = -\tfrac rM \Sigma_u.

Eval mode (running statistics :math:`\mu, \sigma^2` are constants, :math:`r = (\sigma^2 +
\epsilon)^{-1/2}`): :math:`\partial_x = \gamma r g`, :math:`\partial_\gamma = \sum g \hat x`,
:math:`\partial_\beta = \sum g`, and :math:`\bar x = c_\gamma r g`,
:math:`\bar\gamma = r \sum a g`, :math:`\bar g = \gamma r a + c_\gamma \hat x + c_\beta`.

A third derivative (a ``create_graph=True`` HVP) evaluates the same formulas as differentiable
torch operations, with the statistics recomputed from the inputs, so every order stays exact.

The fast path covers float32/float64 inputs of at least two dimensions (``BatchNorm1d/2d/3d``) with
parameters and statistics of the same dtype, outside ``torch.func`` transforms and forward-mode AD;
anything else is handed to PyTorch's ``F.batch_norm`` unchanged.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["batch_norm", "torch_batch_norm", "ORIGINAL_F_BATCH_NORM", "ORIGINAL_TORCH_BATCH_NORM"]

ORIGINAL_F_BATCH_NORM = F.batch_norm
ORIGINAL_TORCH_BATCH_NORM = torch.batch_norm
_NATIVE = torch.native_batch_norm
# the C++ entry point of the op (skips a Python layer per call: this runs once per layer and pass)
_NATIVE_BACKWARD = getattr(torch.ops.aten.native_batch_norm_backward.default, "_op",
                           torch.ops.aten.native_batch_norm_backward.default)
_FAST_DTYPES = (torch.float32, torch.float64)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _layout(x: torch.Tensor) -> Tuple[List[int], Tuple[int, ...], int]:
    """Reduction dims, the broadcast shape of a per-channel vector, and the entries per channel."""
    channels = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    return dims, (1, channels) + (1,) * (x.dim() - 2), x.numel() // max(channels, 1)


def _train_vjp(x, weight, g, a, c_w, c_b, mu, r, g1, g2, need):
    r"""``(x_bar, weight_bar, g_bar)`` of the train-mode backward (module docstring), in torch ops.

    ``mu, r, g1, g2`` are per-channel (``g1 = sum g``, ``g2 = sum g x_hat``); ``a`` (full) and
    ``c_w, c_b`` (per channel) may be ``None`` (zero). Written for few kernels: 12 passes over
    full-size tensors and about 20 per-channel operations. With differentiable inputs (and
    statistics recomputed from them) the result is differentiable again.
    """
    dims, shape, m = _layout(x)
    mu, r, g1, g2 = (t.reshape(shape) for t in (mu, r, g1, g2))
    k = r if weight is None else weight.reshape(shape) * r  # gamma r
    c_w = torch.zeros_like(r) if c_w is None else c_w.reshape(shape)
    c_b = torch.zeros_like(r) if c_b is None else c_b.reshape(shape)
    need_x, need_w, need_g = need
    x_hat = (x - mu) * r
    np_ = k * (-1.0 / m)  # -gamma r / M
    if a is not None:
        a1 = a.sum(dims, keepdim=True)
        a2 = (a * x_hat).sum(dims, keepdim=True)
        if need_x or need_w:  # S = sum a g - (A1 G1 + A2 G2) / M
            s = torch.add((a * g).sum(dims, keepdim=True), torch.addcmul(a1 * g1, a2, g2), alpha=-1.0 / m)

    x_bar = w_bar = g_bar = None
    if need_g:
        if a is None:
            g_bar = torch.addcmul(c_b, x_hat, c_w)
        else:  # gamma r (a - A1/M - x_hat A2/M) + c_w x_hat + c_b
            g_bar = torch.addcmul(torch.addcmul(c_b, np_, a1), x_hat, torch.addcmul(c_w, np_, a2))
            g_bar = torch.addcmul(g_bar, a, k)
    if need_w and weight is not None and a is not None:
        w_bar = (r * s).reshape(weight.shape)
    if need_x:
        q = np_ * r  # -gamma r^2 / M
        nr = r * (-1.0 / m)  # -r / M
        if a is None:
            sum_u, sum_ux = c_w * g1, c_w * g2
            alpha_g = r * c_w
        else:
            sum_u = torch.addcmul(c_w * g1, np_, torch.addcmul(a1 * g2, g1, a2))
            sum_ux = g2 * torch.addcmul(c_w, np_, a2, value=2.0)
            alpha_g = torch.addcmul(q * a2, r, c_w)
        alpha_x = nr * sum_ux
        if a is not None:
            alpha_x = torch.addcmul(alpha_x, q, s)
        x_bar = torch.addcmul(nr * sum_u, x_hat, alpha_x)  # alpha_x x_hat + alpha_0
        if a is not None:
            x_bar = torch.addcmul(x_bar, a, q * g2)  # alpha_a a
        x_bar = torch.addcmul(x_bar, g, alpha_g)
    return x_bar, w_bar, g_bar


def _train_vjp_multi_tensor(x, weight, g, a, c_w, c_b, mu, r, g1, g2, need):
    """:func:`_train_vjp` for the usual HVP case (``a`` present, no third derivative): the same
    formulas, with the per-channel arithmetic batched into multi-tensor (``torch._foreach_*``)
    calls: 8 small kernel launches per layer instead of about 22 (the 12 full-size passes are the
    same). Not differentiable again (the caller uses :func:`_train_vjp` for that)."""
    dims, shape, m = _layout(x)
    need_x, need_w, need_g = need
    zeros = None
    if c_w is None or c_b is None:
        zeros = torch.zeros_like(r)
    c_w = zeros if c_w is None else c_w.reshape(-1)
    c_b = zeros if c_b is None else c_b.reshape(-1)
    k = r if weight is None else None  # gamma r, computed with the first batch of products
    x_hat = (x - mu.view(shape)) * r.view(shape)
    a1 = a.sum(dims)
    a2 = (a * x_hat).sum(dims)
    sag = (a * g).sum(dims)
    # products of per-channel sums (one launch): a1 g1, a2 g2, a1 g2, g1 a2, c_w g1, r c_w [, gamma r]
    left, right = [a1, a2, a1, g1, c_w, r], [g1, g2, g2, a2, g1, c_w]
    if k is None:
        left.append(weight)
        right.append(r)
    a1g1, a2g2, a1g2, g1a2, cwg1, rcw, *rest = torch._foreach_mul(left, right)
    k = rest[0] if rest else k
    kr = k * r
    p, q, nr = torch._foreach_mul([k, kr, r], [1.0 / m, -1.0 / m, -1.0 / m])  # gamma r/M, -gamma r^2/M, -r/M
    t1, t2 = torch._foreach_add([a1g1, a1g2], [a2g2, g1a2])  # A1 G1 + A2 G2,  A1 G2 + G1 A2
    s = torch.add(sag, t1, alpha=-1.0 / m)  # S
    # c0 = c_b - p A1, c1 = c_w - p A2, sum_u = c_w G1 - p t2, v1 = c_w - 2 p A2, alpha_g = r c_w + q A2
    c0, c1, sum_u, v1, alpha_g = torch._foreach_addcmul([c_b, c_w, cwg1, c_w, rcw], [p, p, p, p, q],
                                                        [a1, a2, t2, a2, a2], [-1.0, -1.0, -1.0, -2.0, 1.0])
    alpha_a, sum_ux, w_bar = torch._foreach_mul([q, g2, r], [g2, v1, s])
    alpha_0, alpha_x = torch._foreach_mul([nr, nr], [sum_u, sum_ux])
    alpha_x = torch.addcmul(alpha_x, q, s)

    x_bar = g_bar = None
    if need_g:  # gamma r (a - A1/M - x_hat A2/M) + c_w x_hat + c_b
        g_bar = torch.addcmul(torch.addcmul(c0.view(shape), x_hat, c1.view(shape)), a, k.view(shape))
    if need_x:  # alpha_a a + alpha_g g + alpha_x x_hat + alpha_0
        x_bar = torch.addcmul(alpha_0.view(shape), x_hat, alpha_x.view(shape))
        x_bar = torch.addcmul(x_bar, a, alpha_a.view(shape))
        x_bar = torch.addcmul(x_bar, g, alpha_g.view(shape))
    w_bar = w_bar.reshape(weight.shape) if (need_w and weight is not None) else None
    return x_bar, w_bar, g_bar


def _eval_vjp(x, weight, g, a, c_w, c_b, mu, r, need):
    """``(x_bar, weight_bar, g_bar)`` of the eval-mode backward (running statistics constant)."""
    dims, shape, _ = _layout(x)
    mu, r = mu.reshape(shape), r.reshape(shape)
    k = r if weight is None else weight.reshape(shape) * r
    c_w = None if c_w is None else c_w.reshape(shape)
    c_b = None if c_b is None else c_b.reshape(shape)
    need_x, need_w, need_g = need
    x_bar = w_bar = g_bar = None
    if need_x and c_w is not None:
        x_bar = g * (c_w * r)
    if need_w and weight is not None and a is not None:
        w_bar = ((a * g).sum(dims, keepdim=True) * r).reshape(weight.shape)
    if need_g:
        if c_w is not None:
            x_hat = (x - mu) * r
            g_bar = x_hat * c_w if c_b is None else torch.addcmul(c_b, x_hat, c_w)
        elif c_b is not None:
            g_bar = c_b
        if a is not None:
            g_bar = a * k if g_bar is None else torch.addcmul(g_bar, a, k)
        if g_bar is None:
            g_bar = torch.zeros_like(g)
        elif g_bar.shape != g.shape:  # only the per-channel term: broadcast to the gradient's shape
            g_bar = g_bar.expand_as(g).clone()
    return x_bar, w_bar, g_bar


class _BatchNormBackward(torch.autograd.Function):
    """The graph-building backward of :class:`_BatchNorm`: forward = PyTorch's fused backward kernel,
    backward = the closed form of the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, grad_out, running_mean, running_var, save_mean, save_invstd, training, eps, mask):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.training, ctx.eps = training, eps
        if training and weight is not None:
            # the weight and bias gradients are the sums g1, g2 the double backward needs: always ask
            kernel_mask = [mask[0], True, True]
        else:
            kernel_mask = list(mask)
        gx, gw, gb = _NATIVE_BACKWARD(grad_out, x, weight, running_mean, running_var, save_mean, save_invstd,
                                      training, eps, kernel_mask)
        # detached aliases: keeping the outputs themselves on ctx would make a reference cycle
        ctx.sums = (gb.detach(), gw.detach()) if training and weight is not None else None
        ctx.save_for_backward(x, weight, grad_out, running_mean, running_var, save_mean, save_invstd)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None)

    @staticmethod
    def backward(ctx, a, c_w, c_b):  # type: ignore[override]
        with torch._C.DisableTorchFunction():  # plain tensors only; skips any active mode per op
            return _BatchNormBackward._backward(ctx, a, c_w, c_b)

    @staticmethod
    def _backward(ctx, a, c_w, c_b):
        x, weight, g, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        differentiable = torch.is_grad_enabled()  # a create_graph=True HVP: third derivatives follow
        dims, shape, _ = _layout(x)
        if ctx.training:
            if differentiable:  # statistics as functions of x, so that their derivatives count too
                var, mu = torch.var_mean(x, dims, correction=0)
                r = torch.rsqrt(var + ctx.eps)
            else:
                mu, r = save_mean, save_invstd
            if ctx.sums is not None and not differentiable:
                g1, g2 = ctx.sums
            else:  # (affine=False: the kernel did not produce the sums)
                g1 = g.sum(dims)
                g2 = (g * ((x - mu.reshape(shape)) * r.reshape(shape))).sum(dims)
            vjp = _train_vjp if (differentiable or a is None) else _train_vjp_multi_tensor
            gx, gw, gg = vjp(x, weight, g, a, c_w, c_b, mu, r, g1, g2, need)
        else:
            r = torch.rsqrt(running_var + ctx.eps)
            gx, gw, gg = _eval_vjp(x, weight, g, a, c_w, c_b, running_mean, r, need)
        return gx, gw, gg, None, None, None, None, None, None, None


class _BatchNorm(torch.autograd.Function):
    """``F.batch_norm`` with PyTorch's fused kernels in the forward and first-order backward, and the
    graph-building backward recorded as :class:`_BatchNormBackward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        out, save_mean, save_invstd = _NATIVE(x, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.training, ctx.eps, ctx.has_bias = training, eps, bias is not None
        if training:
            # the running statistics were just updated in place; the backward does not read them
            running_mean = running_var = None
        ctx.save_for_backward(x, weight, running_mean, running_var, save_mean, save_invstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 8
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        with torch._C.DisableTorchFunction():
            if torch.is_grad_enabled():  # create_graph=True: record the backward as a differentiable node
                gx, gw, gb = _BatchNormBackward.apply(x, weight, grad_out, running_mean, running_var, save_mean,
                                                      save_invstd, ctx.training, ctx.eps, mask)
            else:
                gx, gw, gb = _NATIVE_BACKWARD(grad_out, x, weight, running_mean, running_var, save_mean,
                                              save_invstd, ctx.training, ctx.eps, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                None, None, None, None, None)


def _plain(*tensors) -> bool:
    """No tensor subclass (those keep their own ``__torch_function__`` handling)."""
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _use_fast_path(x, weight, bias, running_mean, running_var, training) -> bool:
    """Whether the fast path applies (plain tensors, checked by the caller; torch function disabled)."""
    dtype = x.dtype
    return (
        dtype in _FAST_DTYPES
        and x.dim() >= 2
        and (weight is None or weight.dtype == dtype)
        and (bias is None or bias.dtype == dtype)
        and (running_mean is None or (running_mean.dtype == dtype and not running_mean.requires_grad))
        and (running_var is None or (running_var.dtype == dtype and not running_var.requires_grad))
        and (training or (running_mean is not None and running_var is not None))  # else PyTorch's error
        and torch.is_grad_enabled()
        and (x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))
        and not torch._C._are_functorch_transforms_active()  # torch.func needs rules this does not define
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and torch.autograd.forward_ad._current_level < 0  # forward-mode AD (dual tensors)
    )


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Drop-in for ``F.batch_norm`` (same signature, same checks, same running-statistics updates)."""
    if not _plain(input, weight, bias, running_mean, running_var):
        return ORIGINAL_F_BATCH_NORM(input, running_mean, running_var, weight, bias, training, momentum, eps)
    # plain tensors: skip any active mode's Python dispatch (one per tensor attribute access otherwise)
    with torch._C.DisableTorchFunction():
        if not _use_fast_path(input, weight, bias, running_mean, running_var, training):
            return ORIGINAL_F_BATCH_NORM(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if training:
            F._verify_batch_size(input.size())
        if training and eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        return _BatchNorm.apply(input, weight, bias, running_mean, running_var, bool(training), momentum, eps)


def torch_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    """Drop-in for ``torch.batch_norm`` (argument order of the aten op)."""
    if _plain(input, weight, bias, running_mean, running_var):
        with torch._C.DisableTorchFunction():
            if _use_fast_path(input, weight, bias, running_mean, running_var, training):
                return _BatchNorm.apply(input, weight, bias, running_mean, running_var, bool(training), momentum, eps)
    return ORIGINAL_TORCH_BATCH_NORM(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                     cudnn_enabled)
