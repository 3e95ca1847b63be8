r"""Stochastic estimators of the trace and the diagonal of a symmetric operator.

All of them only apply ``op @ z`` to random probe vectors ``z``:

* **Hutchinson trace** (Hutchinson 1990): for probes with :math:`E[zz^\top] = I`,
  :math:`E[z^\top A z] = \operatorname{tr}(A E[zz^\top]) = \operatorname{tr} A`, so the mean of
  :math:`z_i^\top A z_i` over :math:`m` probes is unbiased; its standard error is the sample
  standard deviation over :math:`\sqrt m`. For Rademacher probes the variance of one sample is
  :math:`2\sum_{i\ne j} A_{ij}^2`.
* **Hutch++** (Meyer, Musco, Musco & Woodruff, SOSA 2021): spend a third of the budget on a
  sketch :math:`Q = \operatorname{orth}(AS)` of the dominant range, take its trace exactly
  (:math:`\operatorname{tr} Q^\top A Q`, a third), and Hutchinson on the deflated remainder
  :math:`(I - QQ^\top) A (I - QQ^\top)` (the last third). Unbiased; the error of the first part is
  zero given :math:`Q`, so for spectra with a few large eigenvalues (like network Hessians) the
  variance drops sharply.
* **Hutchinson diagonal** (Bekas, Kokiopoulou & Saad 2007): :math:`E[z \odot Az] = \operatorname{diag} A`
  (Rademacher: :math:`z_i \sum_j A_{ij} z_j` has mean :math:`A_{ii}` because :math:`E[z_i z_j] = \delta_{ij}`).

Each estimator takes ``generator=`` (a :class:`torch.Generator`, a seed, or ``None``) so results
are reproducible, and ``probes=`` to use given probe vectors instead (columns of an ``(n, m)``
tensor; e.g. all :math:`2^n` sign vectors to compute an exact expectation in a test).
``generator=None`` (the default) draws a seed from PyTorch's global CPU generator, so
``torch.manual_seed`` makes a run reproducible: the meaning of ``None`` in every hessopt function
that takes ``generator=`` (:func:`hessopt.probes.generator_for`).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .operators import CurvatureOperator, as_operator
from ._progress import progress_bar
from .probes import GeneratorLike, _check_distribution, generator_for
from .results import TraceResult
from .spectrum.lanczos import accumulation_dtype

__all__ = ["trace", "diagonal"]

OperatorLike = Union[CurvatureOperator, torch.Tensor]


def _check_count(name: str, value: int, minimum: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} ({why}), got {value!r}")


def _check_probes(op: CurvatureOperator, probes: torch.Tensor) -> torch.Tensor:
    n = op.local_size
    if not isinstance(probes, torch.Tensor) or probes.dim() != 2 or probes.shape[0] != n:
        got = tuple(probes.shape) if isinstance(probes, torch.Tensor) else type(probes).__name__
        shard = " (this process's shard of each probe)" if op.is_sharded else ""
        raise ValueError(f"probes must be a ({n}, m) tensor with one probe per column{shard}, got {got}")
    return probes.to(dtype=op.dtype, device=op.device)


def _dot64(op: CurvatureOperator, a: torch.Tensor, b: torch.Tensor) -> float:
    """``a^T b`` accumulated in float64 (over the shards, for a sharded operator)."""
    return op.dot(a.double(), b.double())


def _mean_and_error(samples: torch.Tensor):
    mean = float(samples.mean())
    err = float(samples.std(unbiased=True) / math.sqrt(samples.numel())) if samples.numel() > 1 else math.inf
    return mean, err


def trace(
    op: OperatorLike,
    num_matvecs: int = 100,
    method: str = "hutch++",
    generator: GeneratorLike = None,
    distribution: str = "rademacher",
    probes: Optional[torch.Tensor] = None,
    progress: bool = False,
) -> TraceResult:
    """Estimate ``tr(A)`` with a standard error, using ``num_matvecs`` products ``A @ z``.

    Args:
        op: an operator (e.g. :class:`hessopt.HessianOperator`) or a dense symmetric tensor.
        num_matvecs: the budget: at least 2 for Hutchinson (to have an error bar), 4 for Hutch++.
        method: ``"hutch++"`` (default; lower variance when a few eigenvalues dominate) or
            ``"hutchinson"``.
        generator: a :class:`torch.Generator` on the operator's device, a seed, or ``None`` (a seed
            drawn from PyTorch's global CPU generator).
        distribution: ``"rademacher"`` (default) or ``"gaussian"`` probes.
        probes: Hutchinson only: an ``(n, m)`` tensor of probes to use instead of random ones.
        progress: show a tqdm progress bar.

    Returns:
        :class:`hessopt.TraceResult` with ``estimate``, ``std_error``, ``num_matvecs``, ``samples``.

    Example:
        >>> r = hessopt.trace(op, num_matvecs=99)
        >>> print(f"{r.estimate:.1f} +- {r.std_error:.1f}")
    """
    op = as_operator(op)
    _check_distribution(distribution)
    if method == "hutchinson":
        if probes is not None:
            probes = _check_probes(op, probes)
            num_matvecs = probes.shape[1]
        _check_count("num_matvecs", num_matvecs, 2, "a standard error needs two samples")
        return _hutchinson(op, num_matvecs, generator, distribution, probes, progress)
    if method == "hutch++":
        if probes is not None:
            raise ValueError("probes= is supported for method='hutchinson' only")
        _check_count("num_matvecs", num_matvecs, 4, "Hutch++ needs a sketch and two residual samples")
        return _hutchpp(op, num_matvecs, generator, distribution, progress)
    raise ValueError(f"unknown trace method {method!r}; choose 'hutch++' or 'hutchinson'")


def _hutchinson(op, num_matvecs, generator, distribution, probes, progress) -> TraceResult:
    gen = None if probes is not None else generator_for(op, generator)
    samples = torch.empty(num_matvecs, dtype=torch.float64)
    with progress_bar(num_matvecs, progress, "Hutchinson trace") as bar:
        for i in range(num_matvecs):
            z = probes[:, i] if probes is not None else op.probe(gen, distribution=distribution)
            samples[i] = _dot64(op, z, op @ z)
            bar.update()
    estimate, err = _mean_and_error(samples)
    return TraceResult(estimate, err, num_matvecs, "hutchinson", samples)


def _hutchpp(op, num_matvecs, generator, distribution, progress) -> TraceResult:
    gen = generator_for(op, generator)
    n = op.num_params
    sketch = min(num_matvecs // 3, n)
    residual_probes = num_matvecs - 2 * sketch
    with progress_bar(num_matvecs, progress, "Hutch++ trace") as bar:

        def apply(v: torch.Tensor) -> torch.Tensor:
            bar.update()
            return op @ v

        S = torch.stack([op.probe(gen, distribution=distribution) for _ in range(sketch)], dim=1)
        AS = torch.stack([apply(col) for col in S.unbind(1)], dim=1)
        Q = _orthonormal_basis(op, AS.double()).to(op.dtype)  # in float64: Q must be orthonormal
        low_rank = sum(_dot64(op, q, apply(q)) for q in Q.unbind(1))
        samples = torch.empty(residual_probes, dtype=torch.float64)
        for i in range(residual_probes):
            g = op.probe(gen, distribution=distribution)
            g = g - Q @ op.reduce_sum(Q.T @ g)  # project out the sketched range: (I - QQ^T) g
            samples[i] = _dot64(op, g, apply(g))
    rest, err = _mean_and_error(samples)
    return TraceResult(low_rank + rest, err, num_matvecs, "hutch++", samples)


def _orthonormal_basis(op: CurvatureOperator, A: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the range of the tall ``(n, s)`` float64 matrix ``A``.

    ``torch.linalg.qr`` when the whole columns are here. On a sharded operator, where each process
    holds some rows, it is built from the all-reduced ``s x s`` Gram matrix: ``A^T A = U L U^T``,
    ``Q = A U L^{-1/2}`` over the eigenvalues above ``s * eps * max(L)`` (columns in the null space
    dropped), repeated once on ``Q`` to restore orthogonality to float64 precision (SVQB, Stathopoulos
    and Wu 2002; "twice is enough" as for Gram-Schmidt).
    """
    if not op.is_sharded:
        return torch.linalg.qr(A)[0]
    Q = A
    for _ in range(2):
        gram = op.reduce_sum(Q.T @ Q)
        values, U = torch.linalg.eigh(gram)
        keep = values > Q.shape[1] * torch.finfo(torch.float64).eps * float(values.max().clamp_min(0))
        Q = Q @ (U[:, keep] * values[keep].rsqrt())
    return Q


def diagonal(
    op: OperatorLike,
    num_matvecs: int = 100,
    generator: GeneratorLike = None,
    distribution: str = "rademacher",
    probes: Optional[torch.Tensor] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Hutchinson estimate of ``diag(A)``: the mean of ``z * (A @ z)`` over ``num_matvecs`` probes.

    Returns a flat tensor of length ``op.num_params`` in the operator's dtype (for a
    :class:`hessopt.HessianOperator`, split it per parameter with ``torch.split`` by ``p.numel()``).
    Exact for a diagonal matrix with Rademacher probes (then ``z_i^2 = 1``).

    Example:
        >>> d = hessopt.diagonal(op, num_matvecs=50, generator=0)
    """
    op = as_operator(op)
    _check_distribution(distribution)
    if probes is not None:
        probes = _check_probes(op, probes)
        num_matvecs = probes.shape[1]
    _check_count("num_matvecs", num_matvecs, 1, "at least one probe")
    gen = None if probes is not None else generator_for(op, generator)
    # summed in float32 at least: a float16 sum of hundreds of samples loses the low digits
    acc = accumulation_dtype(op.dtype)
    total = torch.zeros(op.local_size, dtype=acc, device=op.device)
    with progress_bar(num_matvecs, progress, "Hutchinson diagonal") as bar:
        for i in range(num_matvecs):
            z = probes[:, i] if probes is not None else op.probe(gen, distribution=distribution)
            total.addcmul_(z.to(acc), (op @ z).to(acc))
            bar.update()
    return (total / num_matvecs).to(op.dtype)
