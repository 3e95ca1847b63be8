r"""Finite differences of a model operator around its parameters: :math:`\theta \pm \epsilon v`.

Used by ``HessianOperator(method="finite_difference")`` (differences of gradients) and
``GGNOperator(method="finite_difference")`` (differences of the network's outputs, the Jacobian-vector
product). One object per operator owns

* **the step**: :math:`\epsilon = r \max(\|\theta\|, 1) / \|v\|` with the relative step
  :math:`r` (default :math:`\epsilon_{mach}^{1/3}` of the parameters' dtype: it balances the central
  difference's truncation error :math:`O(\epsilon^2)` against the rounding error
  :math:`O(\epsilon_{mach}/\epsilon)`); on sharded (FSDP2) parameters both norms are global;
* **the moves**: the parameters are written through ``.data`` (values change, version counters
  do not, so a graph the user holds stays valid) and restored bit-exactly by copying the saved
  values back, never by subtracting :math:`\epsilon v`, also when a gradient fails;
* **the activation pattern**: both evaluations run with the ReLU / leaky-ReLU on/off pattern (and
  the max-pooling choices) of
  :math:`\theta` (:func:`hessopt._patches.frozen_activations`), recorded by one forward pass
  without gradient and kept, for a single batch, while no parameter's version counter moved. Across
  a kink a difference of gradients adds the gradient's jump divided by :math:`2\epsilon`, an error
  that does not shrink with :math:`\epsilon`; with the pattern frozen the difference is that of the
  polynomial the network is on its piece, whose derivatives are the ones autograd computes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from .._patches import frozen_activations, replaying
from .._sharded import local
from .base import flatten

__all__ = ["Perturbation", "check_fd_step"]


def check_fd_step(fd_step: Any, dtype: torch.dtype) -> float:
    """The relative step: ``fd_step`` checked to lie in (0, 1), or ``eps_mach(dtype)^(1/3)``."""
    if fd_step is None:
        return torch.finfo(dtype).eps ** (1.0 / 3.0)
    if isinstance(fd_step, bool) or not isinstance(fd_step, (int, float)) or not 0 < fd_step < 1:
        raise ValueError(f"fd_step must be a number in (0, 1), got {fd_step!r}")
    return float(fd_step)


class Perturbation:
    """Moves an operator's parameters to :math:`\\theta \\pm \\epsilon v` and back (module docstring)."""

    def __init__(self, op, fd_step: float):
        self.op = op
        self.fd_step = fd_step
        self.piecewise = True  # False once a forward showed no ReLU / leaky-ReLU call
        self._pattern: Optional[Tuple[Tuple[int, ...], List[torch.Tensor]]] = None
        self._saved: List[torch.Tensor] = []
        self._vectors: Sequence[torch.Tensor] = ()
        self.eps = 0.0

    def clear(self) -> None:
        """Forget the kept activation pattern."""
        self._pattern = None

    @contextlib.contextmanager
    def around(self, vectors: Sequence[torch.Tensor]) -> Iterator[Optional[float]]:
        """Save the parameters and yield the step :math:`\\epsilon` for ``vectors`` (``None`` for a
        zero vector); on exit the parameters hold their saved values, bit for bit."""
        op = self.op
        self._saved = [local(p).detach().clone() for p in op.params]
        self._vectors = vectors
        if op.is_sharded:
            theta, v_norm = op.norm(flatten(self._saved)), op.norm(flatten(list(vectors)))
        else:
            theta = float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(s, dtype=torch.float64) for s in self._saved])))
            v_norm = float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(v, dtype=torch.float64) for v in vectors])))
        try:
            if v_norm == 0.0:
                yield None
            else:
                self.eps = self.fd_step * max(theta, 1.0) / v_norm
                yield self.eps
        finally:
            self.restore()
            self._saved, self._vectors = [], ()

    def move(self, sign: float) -> None:
        """Parameters to :math:`\\theta + \\text{sign}\\,\\epsilon v` (through ``.data``)."""
        with torch.no_grad():
            for p, s, v in zip(self.op.params, self._saved, self._vectors):
                local(p).data.copy_(s + (sign * self.eps) * v)

    def restore(self) -> None:
        """Parameters back to :math:`\\theta`, bit for bit."""
        with torch.no_grad():
            for p, s in zip(self.op.params, self._saved):
                local(p).data.copy_(s)

    def pattern(self, batch: Any, forward: Callable[[Any], Any]) -> Optional[List[torch.Tensor]]:
        """The activation pattern at :math:`\\theta` for ``batch`` (``None``: the model has none),
        recorded by ``forward(batch)`` without gradient; kept for a single batch while no parameter's
        version counter moved (the moves above bypass them)."""
        op = self.op
        if not self.piecewise:
            return None
        key = tuple(local(p)._version for p in op.params)
        if op._single and self._pattern is not None and self._pattern[0] == key:
            return self._pattern[1]
        with op._forward_without_backward(), frozen_activations() as masks:
            forward(batch)
        if not masks:
            self.piecewise = False
            return None
        if op._single:
            self._pattern = (key, masks)
        return masks

    frozen = staticmethod(replaying)  # the context in which an evaluation replays a pattern
