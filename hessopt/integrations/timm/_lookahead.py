"""timm's Lookahead around a second-order optimizer, keeping what the training loop asks of it.

Imported only through :func:`hessopt.integrations.timm.lookahead` (it needs timm).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from timm.optim import Lookahead

_AMP_ATTRIBUTES = ("grad_scale", "found_inf")


class SecondOrderLookahead(Lookahead):
    """timm's ``Lookahead`` (slow weights ``phi += alpha * (theta - phi)``, ``theta = phi`` every ``k``
    steps; Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back") around a
    second-order optimizer such as :class:`hessopt.AdaHessian`.

    What timm's ``Lookahead`` (through timm 1.0.30) drops and this class forwards to the inner
    optimizer:

    * ``is_second_order``: timm's ``train.py`` passes ``create_graph=True`` only when the optimizer
      it holds says so;
    * ``needs_hessian``: for loops that build the graph only on the steps that use it;
    * ``zero_grad``: AdaHessian's also frees the parameter <-> gradient reference cycle left by
      ``backward(create_graph=True)``;
    * ``GradScaler``: ``_step_supports_amp_scaling`` plus the ``grad_scale`` / ``found_inf`` that
      ``GradScaler.step`` sets on the optimizer it is given, so the inner optimizer unscales its
      Hessian estimate as well as the gradient, and a step with an inf/NaN gradient moves neither
      the fast nor the slow weights.

    ``state_dict`` / ``load_state_dict`` are timm's (the inner optimizer's state, with the slow
    weights under ``lookahead_slow_buff`` and the counters in the parameter groups).

    Example:
        >>> import torch, hessopt
        >>> from hessopt.integrations.timm import lookahead
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = lookahead(hessopt.AdaHessian(model.parameters(), lr=0.1))
        >>> opt.is_second_order
        True
        >>> loss = model(torch.randn(8, 3)).pow(2).mean()
        >>> loss.backward(create_graph=opt.is_second_order)
        >>> opt.step()
    """

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # what GradScaler.step reads: only an inner optimizer that unscales by itself gets the scale
        return bool(getattr(self._base_optimizer, "_step_supports_amp_scaling", False))

    @property
    def is_second_order(self) -> bool:  # type: ignore[override]
        return bool(getattr(self._base_optimizer, "is_second_order", False))

    @property
    def needs_hessian(self) -> bool:
        return bool(getattr(self._base_optimizer, "needs_hessian", self.is_second_order))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._base_optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        amp = {name: self.__dict__[name] for name in _AMP_ATTRIBUTES if name in self.__dict__}
        base = self._base_optimizer
        forward_amp = self._step_supports_amp_scaling
        if forward_amp:
            base.__dict__.update(amp)
        try:
            found_inf = amp.get("found_inf")
            if found_inf is not None and float(found_inf) > 0:
                # GradScaler hands the step over; the inner optimizer skips it, and so must Lookahead
                # (no counter advance, no slow-weight update from a skipped step)
                return base.step(closure)
            skipped = getattr(base, "skipped_steps", None)
            if skipped is None:
                return super().step(closure)
            # timm's Lookahead.step, except that a step the inner optimizer skipped (a non-finite
            # loss or gradient: hessopt changes nothing then) does not advance the slow weights' clock
            loss = base.step(closure)
            if base.skipped_steps == skipped:
                for group in base.param_groups:
                    group["lookahead_step"] += 1
                    if group["lookahead_step"] % group["lookahead_k"] == 0:
                        self.update_slow(group)
            return loss
        finally:
            if forward_amp:
                for name in amp:
                    base.__dict__.pop(name, None)

    def __repr__(self) -> str:
        return f"SecondOrderLookahead({self._base_optimizer!r})"
