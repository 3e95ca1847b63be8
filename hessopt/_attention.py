"""Twice-differentiable scaled-dot-product attention (routed to by :func:`hessopt.second_order_safe`).

PyTorch's fused attention kernels (flash, memory-efficient, cuDNN, and the CPU flash kernel) have a
backward that cannot itself be differentiated ("derivative for
aten::_scaled_dot_product_flash_attention..._backward is not implemented"), so no HVP can pass
through them. :func:`sdpa_twice_differentiable` keeps the fused kernel for the forward pass and for
first-order backward passes, and only a backward that builds a graph (``create_graph=True``)
recomputes attention with PyTorch's composite "math" formulation from the saved, graph-carrying
inputs, whose derivative is twice differentiable. With dropout the whole attention runs in the math
formulation (a dropout mask cannot be reproduced by a recomputation).
"""
from __future__ import annotations

import torch

__all__ = ["ORIGINAL_SDPA", "sdpa_twice_differentiable"]


ORIGINAL_SDPA = torch._C._nn.scaled_dot_product_attention
_MATH_SDPA = torch.ops.aten._scaled_dot_product_attention_math


def _math_sdpa(query, key, value, attn_mask, dropout_p, **options) -> torch.Tensor:
    """PyTorch's composite attention, called directly (twice differentiable).

    ``F.scaled_dot_product_attention`` turns a boolean mask (True = attend) into an additive one
    before it dispatches; the aten math kernel called directly would *add* the booleans as 0/1, so
    the conversion is done here.
    """
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        additive = torch.zeros(attn_mask.shape, dtype=query.dtype, device=attn_mask.device)
        attn_mask = additive.masked_fill_(attn_mask.logical_not(), float("-inf"))
    return _MATH_SDPA(query, key, value, attn_mask, dropout_p, **options)[0]


class _FusedForwardMathBackwardSDPA(torch.autograd.Function):
    """SDPA whose forward is PyTorch's fused kernel and whose graph-building backward is composite.

    A first-order backward (``create_graph=False``) recomputes the fused forward and uses the fused
    backward. A backward with ``create_graph=True`` recomputes attention with the composite math
    formulation from the *saved, graph-carrying* inputs and differentiates it with
    ``create_graph=True``, so the returned gradients can be differentiated again (HVPs).
    """

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale, enable_gqa):  # type: ignore[override]
        ctx.options = dict(is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        ctx.save_for_backward(query, key, value, attn_mask)
        with torch._C.DisableTorchFunction():
            return ORIGINAL_SDPA(query, key, value, attn_mask, 0.0, **ctx.options)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        query, key, value, attn_mask = ctx.saved_tensors
        inputs = (query, key, value, attn_mask)
        wanted = [t is not None and ctx.needs_input_grad[i] for i, t in enumerate(inputs)]
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad(), torch._C.DisableTorchFunction():
            if create_graph:
                # The saved tensors still carry their history: the math recomputation hangs off the
                # user's graph, and its gradient is a differentiable function of the parameters.
                diff_inputs = [t for t, w in zip(inputs, wanted) if w]
                out = _math_sdpa(query, key, value, attn_mask, 0.0, **ctx.options)
            else:
                leaves = [t.detach().requires_grad_(w) if t is not None else None for t, w in zip(inputs, wanted)]
                diff_inputs = [t for t, w in zip(leaves, wanted) if w]
                out = ORIGINAL_SDPA(*leaves, 0.0, **ctx.options)
            grads = iter(torch.autograd.grad(out, diff_inputs, grad_out, create_graph=create_graph))
        return tuple(next(grads) if w else None for w in wanted) + (None, None, None)


def sdpa_twice_differentiable(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for ``F.scaled_dot_product_attention`` used inside :func:`second_order_safe`."""
    tensors = [t for t in (query, key, value, attn_mask) if isinstance(t, torch.Tensor)]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        with torch._C.DisableTorchFunction():
            return ORIGINAL_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if dropout_p > 0.0:
        # A dropout mask cannot be reproduced by a recomputation, so with dropout the whole
        # attention runs in the composite formulation, which is twice differentiable as is.
        with torch._C.DisableTorchFunction():
            return _math_sdpa(query, key, value, attn_mask, dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return _FusedForwardMathBackwardSDPA.apply(query, key, value, attn_mask, is_causal, scale, enable_gqa)
