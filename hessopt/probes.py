"""Random probe vectors drawn from an explicit :class:`torch.Generator`.

Every random quantity in hessopt comes from a generator the caller owns (an estimator's
``generator=`` argument or the optimizer's own seeded generator), never from PyTorch's global RNG:
diagnostics then neither disturb nor depend on the training run's random stream, results are
reproducible, and ranks of a distributed job that seed alike draw identical probes.

Rademacher probes (entries +-1 with probability 1/2) are the default: for them ``E[z z^T] = I``
and ``z_i^2 = 1``, which gives the Hutchinson diagonal estimator ``E[z * Az] = diag(A)`` and the
smallest variance among such estimators (Hutchinson 1990). Gaussian probes are offered for
comparison.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

__all__ = ["PROBE_DISTRIBUTIONS", "make_generator", "generator_for", "probe", "probes_like"]

PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")

GeneratorLike = Union[torch.Generator, int, None]


def make_generator(generator: GeneratorLike, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """Return a generator on ``device``.

    ``generator`` may be a :class:`torch.Generator` (returned as is; it must live on ``device``'s
    type), an ``int`` seed, or ``None`` (a seed is drawn from PyTorch's global CPU generator, so
    ``torch.manual_seed`` makes the result reproducible).
    """
    device = torch.device(device)
    if isinstance(generator, torch.Generator):
        if generator.device.type != device.type:
            raise ValueError(
                f"the generator lives on {generator.device} but probes are needed on {device}; "
                f"create it with torch.Generator(device={str(device)!r})"
            )
        return generator
    if generator is None:
        generator = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(
            f"generator must be a torch.Generator, an int seed or None, not {type(generator).__name__}"
        )
    return torch.Generator(device=device).manual_seed(generator)


def _check_distribution(distribution: str) -> None:
    if distribution not in PROBE_DISTRIBUTIONS:
        raise ValueError(
            f"unknown probe distribution {distribution!r}; choose one of {PROBE_DISTRIBUTIONS}"
        )


def probe(
    size: Union[int, Sequence[int]],
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device, None] = None,
    distribution: str = "rademacher",
) -> torch.Tensor:
    """One probe tensor of ``size`` with i.i.d. Rademacher (+-1) or standard normal entries."""
    _check_distribution(distribution)
    device = generator.device if device is None else torch.device(device)
    size = (size,) if isinstance(size, int) else tuple(size)
    if distribution == "gaussian":
        return torch.randn(size, generator=generator, dtype=dtype, device=device)
    z = torch.randint(0, 2, size, generator=generator, dtype=dtype, device=device)
    return z.mul_(2).sub_(1)


def probes_like(
    tensors: Sequence[torch.Tensor],
    generator: torch.Generator,
    distribution: str = "rademacher",
) -> List[torch.Tensor]:
    """One probe per tensor, shaped, typed and placed like it, drawn in order from ``generator``."""
    return [
        probe(t.shape, generator, dtype=t.dtype, device=t.device, distribution=distribution)
        for t in tensors
    ]


def generator_for(op, generator: GeneratorLike) -> torch.Generator:
    """A generator on ``op.device`` for an estimator's probes.

    A :class:`torch.Generator` is used as given. A seed (or ``None``: a seed drawn from PyTorch's
    global CPU generator) first goes through ``op.broadcast_seed``, which for a distributed
    :class:`hessopt.HessianOperator` makes it rank 0's seed everywhere, so that all ranks draw the
    same probes.
    """
    if isinstance(generator, torch.Generator):
        return make_generator(generator, op.device)
    if generator is None:
        generator = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(
            f"generator must be a torch.Generator, an int seed or None, not {type(generator).__name__}"
        )
    return make_generator(op.broadcast_seed(generator), op.device)
