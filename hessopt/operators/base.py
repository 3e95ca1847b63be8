r"""The operator interface: :class:`CurvatureOperator` and the two model-free operators.

``op @ v`` accepts a flat 1-D tensor of length ``op.local_size`` (returns a flat tensor), a list of
tensors shaped like the operator's parameters (returns such a list; model-based operators only),
or a 2-D tensor of shape ``(local_size, k)`` (applies the operator to each column).

**The vector space.** An operator also owns the inner product of the space it acts on:
:meth:`CurvatureOperator.dot`, :meth:`~CurvatureOperator.norm`,
:meth:`~CurvatureOperator.reduce_sum` (partial inner products summed over the shards) and
:meth:`~CurvatureOperator.probe` (a random vector). For an ordinary operator ``local_size ==
num_params`` and these are ``torch.dot``, ``torch.linalg.vector_norm``, the identity and
:func:`hessopt.probes.probe`. For an operator on a *sharded* model (FSDP2's ``fully_shard``) each
process holds only its shard of every vector (``local_size < num_params``): the estimators compute
on the shards and every inner product is a local partial sum completed by ``reduce_sum`` (one
``all_reduce``), so they run unchanged while the memory per process falls with the number of
processes (:mod:`hessopt.operators._sharded_model`).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .._checks import check_positive_int
from ..probes import probe as _probe

__all__ = [
    "CurvatureOperator",
    "MatrixOperator",
    "LambdaOperator",
    "NonFiniteCurvatureError",
    "as_operator",
    "flatten",
    "unflatten",
]


class NonFiniteCurvatureError(ValueError, FloatingPointError):
    """An operator produced NaN or Inf (a ``ValueError`` and a ``FloatingPointError``)."""


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (the inverse of :func:`unflatten`)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, shapes: Sequence[torch.Size]) -> List[torch.Tensor]:
    """Split a flat vector into views of the given shapes."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [chunk.view(s) for chunk, s in zip(vector.split(sizes), shapes)]


def _is_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, by one reduction: the max-norm is NaN if an entry is
    NaN and inf if one is infinite (``isfinite(t).all()`` would allocate a mask as large as ``t``)."""
    return t.numel() == 0 or bool(torch.isfinite(torch.linalg.vector_norm(t, float("inf"))))


class CurvatureOperator:
    """A symmetric linear operator on ``R^n`` (the base of all operators).

    Subclasses set ``num_params``, ``dtype`` and ``device`` and implement ``_matvec(v)`` for a flat
    vector ``v``; the base class validates inputs, handles list-of-tensors and matrix arguments, and
    rejects non-finite results.
    """

    num_params: int
    dtype: torch.dtype
    device: torch.device
    #: shapes of the parameter blocks, for list-of-tensors vectors (``None``: flat vectors only)
    shapes: Optional[List[torch.Size]] = None

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.num_params, self.num_params)

    # -- the vector space (see the module docstring) -------------------------------------------

    #: whether each process holds only a shard of every vector (FSDP2); see the module docstring
    is_sharded: bool = False

    @property
    def local_size(self) -> int:
        """The length of the vectors this process multiplies (``num_params`` unless sharded)."""
        return self.num_params

    def reduce_sum(self, partial: torch.Tensor) -> torch.Tensor:
        """Partial inner products (of this process's shards) summed over the shards; here the identity."""
        return partial

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """The inner product ``a^T b`` of two vectors of the space, as a float (in their dtype)."""
        return float(torch.dot(a, b))

    def norm(self, a: torch.Tensor) -> float:
        """The Euclidean norm ``||a||`` of a vector of the space, as a float."""
        return float(torch.linalg.vector_norm(a))

    def probe(self, generator: torch.Generator, dtype: Optional[torch.dtype] = None,
              distribution: str = "rademacher") -> torch.Tensor:
        """A random vector of the space (this process's part of it) with i.i.d. Rademacher or
        Gaussian entries, drawn from ``generator`` (:func:`hessopt.probes.probe`)."""
        return _probe(self.num_params, generator, dtype=self.dtype if dtype is None else dtype,
                      device=self.device, distribution=distribution)

    def _refuse_sharded(self, what: str) -> None:
        if self.is_sharded:
            raise TypeError(
                f"{what} needs every entry of the vectors in one process, but this "
                f"{type(self).__name__} is sharded (FSDP2: each process holds {self.local_size} of the "
                f"{self.num_params} entries); use the estimators (top_eigenvalues, trace, diagonal, "
                "spectral_density, lanczos, solve), which work on shards"
            )

    def broadcast_seed(self, seed: int) -> int:
        """Make a random seed identical on every process that applies this operator (identity here)."""
        return seed

    def __matmul__(self, v: Union[torch.Tensor, Sequence[torch.Tensor]]):
        if isinstance(v, (list, tuple)):
            return self._matvec_list(v)
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"an operator multiplies a tensor or a list of tensors, not {type(v).__name__}"
            )
        self._check_tensor(v)
        if v.dim() == 2:
            return torch.stack([self._checked_matvec(col) for col in v.unbind(dim=1)], dim=1)
        return self._checked_matvec(v)

    matvec = __matmul__

    def to_dense(self) -> torch.Tensor:
        """The full ``(n, n)`` matrix, by applying the operator to each unit vector (small n only)."""
        self._refuse_sharded("to_dense()")
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return self @ eye

    def to_scipy(self):
        """The operator as a ``scipy.sparse.linalg.LinearOperator`` (float64 in and out).

        For SciPy's solvers (``eigsh``, ``cg``, ``minres``, ``lsqr``): a NumPy vector (or an
        ``(n, k)`` block) is converted to the operator's dtype and device, multiplied, and returned
        as a float64 NumPy array. The operator is symmetric, so ``rmatvec`` is ``matvec``. SciPy is
        imported here, on first use (``pip install scipy``).

        Example:
            >>> from scipy.sparse.linalg import eigsh
            >>> top = eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False)
        """
        self._refuse_sharded("to_scipy()")
        try:
            import numpy as np
            from scipy.sparse.linalg import LinearOperator
        except ImportError as err:  # pragma: no cover - scipy ships with the dev extra
            raise ImportError("op.to_scipy() needs SciPy: pip install scipy") from err

        def apply(x):
            v = torch.as_tensor(np.ascontiguousarray(x), dtype=self.dtype, device=self.device)
            return (self @ v).detach().to("cpu", torch.float64).numpy()

        def matvec(x):
            return apply(np.asarray(x).reshape(-1))

        def matmat(x):
            return apply(np.asarray(x).reshape(self.num_params, -1))

        return LinearOperator(
            shape=self.shape, matvec=matvec, rmatvec=matvec, matmat=matmat, rmatmat=matmat, dtype=np.float64
        )

    # -- validation ---------------------------------------------------------------------------

    def _check_tensor(self, v: torch.Tensor) -> None:
        n = self.local_size
        if v.dim() not in (1, 2) or v.shape[0] != n:
            shard = f" (this process's shard of the {self.num_params} entries)" if self.is_sharded else ""
            raise ValueError(
                f"expected a vector of length {n}{shard} (or a ({n}, k) matrix), got shape {tuple(v.shape)}"
            )
        if v.dtype != self.dtype:
            raise TypeError(
                f"the vector has dtype {v.dtype} but the operator works in {self.dtype}; "
                f"convert with v.to({self.dtype})"
            )
        if v.device != self.device:
            raise ValueError(
                f"the vector is on {v.device} but the operator is on {self.device}; move it with "
                "v.to(op.device)"
            )

    def _matvec_list(self, vs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if self.shapes is None:
            raise TypeError(f"{type(self).__name__} multiplies flat vectors only, not lists of tensors")
        if len(vs) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} tensors (one per parameter), got {len(vs)}")
        for i, (t, s) in enumerate(zip(vs, self.shapes)):
            if not isinstance(t, torch.Tensor) or t.shape != s:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"tensor {i} should have shape {tuple(s)}, got {got}")
        flat = flatten(vs)
        self._check_tensor(flat)
        return unflatten(self._checked_matvec(flat), self.shapes)

    def _all_finite(self, out: torch.Tensor) -> bool:
        """Whether the product is finite (on every shard, for a sharded operator)."""
        return _is_finite(out)

    def _checked_matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self._matvec(v)
        if not self._all_finite(out):
            raise NonFiniteCurvatureError(
                f"{type(self).__name__} produced NaN/Inf: the loss or its curvature is not finite at "
                "these parameters (check the loss value, the inputs, and use float32/float64 rather "
                "than float16)"
            )
        return out


class MatrixOperator(CurvatureOperator):
    """A dense symmetric matrix as an operator: ``MatrixOperator(A) @ v == A @ v``."""

    def __init__(self, matrix: torch.Tensor, check_symmetric: bool = True):
        if not isinstance(matrix, torch.Tensor):
            raise TypeError(f"MatrixOperator needs a tensor, got {type(matrix).__name__}")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        if not matrix.is_floating_point():
            raise TypeError(f"expected a floating-point matrix, got {matrix.dtype}")
        if check_symmetric:
            scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
            asym = (matrix - matrix.T).abs().max() / scale
            if asym > 100 * torch.finfo(matrix.dtype).eps:
                raise ValueError(
                    f"the matrix is not symmetric (max |A - A^T| / max |A| = {float(asym):.2e}); the "
                    "estimators assume a symmetric operator: pass (A + A.T) / 2"
                )
        self.matrix = matrix
        self.num_params = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v


class LambdaOperator(CurvatureOperator):
    """An operator defined by a function ``matvec_fn(v) -> A v`` on flat vectors of length ``num_params``."""

    def __init__(
        self,
        matvec_fn: Callable[[torch.Tensor], torch.Tensor],
        num_params: int,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
    ):
        if not callable(matvec_fn):
            raise TypeError("matvec_fn must be callable: v -> A v")
        check_positive_int("num_params", num_params)
        self._fn = matvec_fn
        self.num_params = num_params
        self.dtype = dtype
        self.device = torch.device(device)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self._fn(v)
        if not isinstance(out, torch.Tensor) or out.shape != v.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"matvec_fn returned {got}; it must return a tensor shaped like its input {tuple(v.shape)}")
        return out


def as_operator(obj: Union[CurvatureOperator, torch.Tensor]) -> CurvatureOperator:
    """Accept an operator or a dense symmetric tensor (wrapped in :class:`MatrixOperator`)."""
    if isinstance(obj, CurvatureOperator):
        return obj
    if isinstance(obj, torch.Tensor):
        return MatrixOperator(obj)
    raise TypeError(
        f"expected a CurvatureOperator (e.g. hessopt.HessianOperator) or a dense symmetric tensor, "
        f"got {type(obj).__name__}"
    )
