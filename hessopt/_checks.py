"""Argument checks shared by the whole package: one home, one wording.

Each raises ``TypeError`` for a value of the wrong type and ``ValueError`` for one out of range,
with a message that names the argument and the value received.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["check_positive_int", "check_number", "check_betas"]


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an ``int`` >= 1 (not a bool), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_number(name: str, value: Any, *, low: float = 0.0, high: Optional[float] = None,
                 open_high: bool = False, allow_tensor: bool = False) -> None:
    """Raise a ``TypeError`` naming ``name`` for a non-number, ``ValueError`` for one out of range."""
    if allow_tensor and torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}")
        if value.is_complex():
            raise TypeError(f"{name} must be a real number, got a complex tensor")
        value = float(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    ok = value >= low and (high is None or (value < high if open_high else value <= high))
    if not ok:
        if high is None:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        raise ValueError(f"{name} must be in [{low:g}, {high:g}{')' if open_high else ']'}, got {value!r}")


def check_betas(betas: Any) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    for b in betas:
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise TypeError(f"betas must be two real numbers in [0, 1), got {betas!r}")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


