"""Pieces the optimizers' kernels share: grouping by device and dtype, finiteness flags with one
host transfer, bias corrections, the clipped preconditioned step, and the all-or-nothing commit.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["by_device_and_dtype", "finite_flags", "curvature_flags", "commit_parameter_updates",
           "overflow_limit", "interrupts_held", "restore", "commit_in_place",
           "parameter_delta", "parameter_deltas"]


def by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> Dict[Tuple[torch.device, torch.dtype], List[int]]:
    """Indices of ``tensors`` by (device, dtype): the multi-tensor kernels take one of each per call."""
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _max_abs(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``max |t|`` of each tensor as a float32 scalar on the first tensor's device (NaN if any is NaN)."""
    device = tensors[0].device
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    for idx in by_device_and_dtype(tensors).values():
        batch = [tensors[i] for i in idx]
        empty = [t.numel() == 0 for t in batch]
        live = [t for t, e in zip(batch, empty) if not e]
        norms = iter(torch._foreach_norm(live, float("inf")) if live else [])
        for i, e in zip(idx, empty):
            out[i] = torch.zeros((), device=device) if e else next(norms).to(device=device, dtype=torch.float32)
    return out  # type: ignore[return-value]


def finite_flags(tensors: Sequence[Optional[torch.Tensor]]) -> List[bool]:
    """Whether each tensor is entirely finite (``None`` counts as finite), with one host transfer.

    ``max |t|`` is infinite or NaN exactly when an entry is (no overflow: no arithmetic is done).
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return [True] * len(tensors)
    flags = iter(torch.isfinite(torch.stack(_max_abs(present))).tolist())
    return [True if t is None else next(flags) for t in tensors]


def overflow_limit(dtype: torch.dtype) -> float:
    """The largest ``|D|`` whose square, averaged into a second moment, stays finite in ``dtype``."""
    return math.sqrt(torch.finfo(dtype).max) * 0.5


def curvature_flags(estimates: Sequence[Optional[torch.Tensor]]) -> Tuple[List[bool], List[bool]]:
    """``(finite, overflows)`` per estimate with one host transfer: ``overflows`` where
    ``max |d|`` exceeds :func:`overflow_limit` (its square would overflow the second moment)."""
    present = [t for t in estimates if t is not None]
    if not present:
        return [True] * len(estimates), [False] * len(estimates)
    maxima = torch.stack(_max_abs(present))
    limits = torch.tensor([overflow_limit(t.dtype) for t in present], device=maxima.device)
    both = torch.stack([torch.isfinite(maxima), maxima > limits]).tolist()
    finite, over = iter(both[0]), iter(both[1])
    flags = [(True, False) if t is None else (next(finite), next(over)) for t in estimates]
    return [f for f, _ in flags], [o and f for f, o in flags]


@contextlib.contextmanager
def interrupts_held():
    """Hold back ``KeyboardInterrupt`` (SIGINT) until the block is done (main thread, default handler)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def restore(targets: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    """Copy ``saved`` back into ``targets`` (bit-exact), with interrupts held and torch-function
    overrides off: a restore that is cut short would leave the weights perturbed."""
    with interrupts_held(), torch._C.DisableTorchFunction(), torch.no_grad():
        torch._foreach_copy_(list(targets), list(saved))


def commit_parameter_updates(params: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor]) -> None:
    """``theta -= delta`` for every pair, all or nothing.

    One multi-tensor call per (device, dtype): a call either runs or raises before writing. With
    several such buckets, the buckets already written are restored from a copy if a later one
    raises, so an exception never leaves some parameters moved and others not.
    """
    buckets = list(by_device_and_dtype(params).values())
    backups: List[Tuple[List[torch.Tensor], List[torch.Tensor]]] = []
    try:
        for idx in buckets:
            ps = [params[i] for i in idx]
            if len(buckets) > 1:
                backups.append((ps, [p.detach().clone() for p in ps]))
            torch._foreach_sub_(ps, [deltas[i] for i in idx])
    except BaseException:
        for ps, saved in backups:
            restore(ps, saved)
        raise


def commit_in_place(params: Sequence[torch.Tensor], moments: Sequence[Sequence[torch.Tensor]], result) -> None:
    """Write a kernel's computed step into the given tensors (the functional, torch-style form):
    the parameter deltas all or nothing, then the new moments copied into the moment tensors."""
    moved = [i for i, d in enumerate(result.deltas) if d is not None]
    commit_parameter_updates([params[i] for i in moved], [result.deltas[i] for i in moved])
    for old, new in zip(moments, result.moments):
        for o, n in zip(old, new):
            if o is not n:
                o.copy_(n)


def parameter_delta(update: torch.Tensor, param: torch.Tensor, *, clip: Optional[float], lr: float,
                    weight_decay: float) -> torch.Tensor:
    """The step both optimizers end with, in place on ``update`` (their preconditioned update):
    ``lr * clamp(update, -clip, clip) + lr * wd * theta`` (``clip=None``: no clamp), so that
    ``theta <- theta - delta``."""
    if clip is not None:
        update.clamp_(-clip, clip)
    update.mul_(lr)
    if weight_decay:
        update.add_(param.detach(), alpha=lr * weight_decay)
    return update


def parameter_deltas(updates: List[torch.Tensor], params: Sequence[torch.Tensor], *, clip: Optional[float],
                     lr: float, weight_decay: float) -> List[torch.Tensor]:
    """:func:`parameter_delta` for lists of one device and dtype, with multi-tensor kernels."""
    if clip is not None:
        torch._foreach_clamp_min_(updates, -clip)
        torch._foreach_clamp_max_(updates, clip)
    torch._foreach_mul_(updates, lr)
    if weight_decay:
        torch._foreach_add_(updates, [p.detach() for p in params], alpha=lr * weight_decay)
    return updates
