r"""The Lanczos kernel, shared by :func:`top_eigenvalues` and :func:`spectral_density`.

Lanczos builds an orthonormal basis :math:`V_m = [v_1..v_m]` of the Krylov space
:math:`\mathrm{span}\{v_1, Av_1, .., A^{m-1}v_1\}` in which :math:`T_m = V_m^\top A V_m` is
tridiagonal:

.. math::  A V_m = V_m T_m + \beta_m v_{m+1} e_m^\top.

The eigenvalues of :math:`T_m` (Ritz values) approximate the extreme eigenvalues of :math:`A`
after few steps, and a Ritz pair :math:`(\theta, V_m s)` has residual
:math:`\|A V_m s - \theta V_m s\| = \beta_m |e_m^\top s|` (read off :math:`T_m` for free).

In floating point the three-term recurrence loses orthogonality and produces spurious copies
("ghost" eigenvalues) of converged ones; here every new vector is reorthogonalized against all
previous ones, twice (classical Gram-Schmidt applied twice is as accurate as modified Gram-Schmidt
and runs as two matrix-vector products: no Python loop over the basis). Coefficients are
accumulated in float64 and :math:`T_m` is solved with ``torch.linalg.eigh``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from .._progress import progress_bar
from ..operators import CurvatureOperator, as_operator
from ..probes import GeneratorLike, generator_for, probe
from ..results import LanczosResult

__all__ = ["lanczos", "LanczosIteration"]


class LanczosIteration:
    r"""Step-by-step Lanczos with full reorthogonalization (the shared kernel).

    Call :meth:`step` to add one basis vector (one matvec); read :attr:`alphas`, :attr:`betas`,
    :attr:`basis`, :meth:`tridiagonal` and :meth:`projected` at any point. When the Krylov space
    becomes invariant (``beta`` vanishes) the iteration either stops (:attr:`exhausted`; what
    spectral quadrature needs, since the quadrature is then exact) or, with ``restart=True``,
    continues with a new chain from a fresh random vector orthogonal to the basis.

    An eigensolver may also call :meth:`restart` before the space is invariant: one Krylov chain
    never sees the part of a multiple eigenvalue's eigenspace orthogonal to its start vector, so a
    new chain is how further copies are found. The basis then no longer yields a tridiagonal
    projection, so the iteration also keeps the full projected matrix :math:`H = V^\top A V` (its
    columns are the reorthogonalization coefficients, computed anyway) and the residual columns
    :math:`R = AV - VH`, nonzero only for the last vector of each chain and updated as the basis
    grows. For any coefficient vector :math:`s` and value :math:`\theta`,

    .. math::  \|A V s - \theta V s\|^2 = \|H s - \theta s\|^2 + \|R s\|^2

    (:meth:`residuals`), exact and without extra matvecs. Without restarts, :math:`H = T` and
    :math:`R = \beta_m v_{m+1} e_m^\top`: plain Lanczos.
    """

    def __init__(
        self,
        op: CurvatureOperator,
        max_steps: int,
        v0: Optional[torch.Tensor] = None,
        generator: GeneratorLike = None,
        restart: bool = False,
    ):
        self.op = op
        n = op.num_params
        self.max_steps = min(int(max_steps), n)
        self.restart_on_breakdown = restart
        self._gen = generator_for(op, generator)
        self.basis = torch.empty(self.max_steps, n, dtype=op.dtype, device=op.device)  # rows
        self.alphas: list = []
        self.betas: list = []  # betas[j] couples v_j and v_{j+1}; the last one is the residual norm
        self.num_matvecs = 0
        self.exhausted = False
        self._anorm = 0.0
        self._H = torch.zeros(self.max_steps, self.max_steps, dtype=torch.float64)  # upper triangle
        self._open: Dict[int, torch.Tensor] = {}  # column j -> (A V - V H)[:, j] where nonzero
        start = self._random_vector() if v0 is None else v0.to(dtype=op.dtype, device=op.device).reshape(-1)
        if start.numel() != n:
            raise ValueError(f"v0 must have {n} entries, got {start.numel()}")
        norm = torch.linalg.vector_norm(start)
        if not norm > 0:
            raise ValueError("v0 must be a nonzero vector")
        self._next = start / norm

    @property
    def size(self) -> int:
        """Number of basis vectors so far (``m``)."""
        return len(self.alphas)

    def _random_vector(self, distribution: str = "rademacher") -> torch.Tensor:
        return probe(self.op.num_params, self._gen, dtype=self.op.dtype, distribution=distribution)

    def _tiny(self) -> float:
        return 1e3 * torch.finfo(self.op.dtype).eps * max(self._anorm, 1e-300)

    def _orthogonalize(self, w: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``w`` minus its components along the first ``m`` basis vectors, and those components."""
        V = self.basis[:m]
        coefficients = torch.zeros(m, dtype=torch.float64)
        for _ in range(2):  # "twice is enough" (Kahan, Parlett)
            c = V @ w
            w = w - V.T @ c
            coefficients += c.double().cpu()
        return w, coefficients

    def _add_to_basis(self, v: torch.Tensor) -> None:
        """Append ``v``; each open residual column loses its component along ``v``."""
        self.basis[self.size] = v
        for j in list(self._open):
            r = self._open[j]
            r = r - v * torch.dot(v, r)
            if float(torch.linalg.vector_norm(r.double())) <= self._tiny():
                del self._open[j]  # the usual case: the previous vector's residual was beta * v
            else:
                self._open[j] = r

    def step(self) -> bool:
        """Add one basis vector (one matvec). Returns False when no further step is possible."""
        j = self.size
        if j >= self.max_steps or self.exhausted:
            return False
        v = self._next
        self._add_to_basis(v)
        w = self.op @ v
        self.num_matvecs += 1
        alpha = float(torch.dot(w.double(), v.double()))
        w, coefficients = self._orthogonalize(w, j + 1)  # removes alpha v and beta v_{j-1} too, more accurately
        coefficients[j] = alpha
        self._H[: j + 1, j] = coefficients
        beta = float(torch.linalg.vector_norm(w.double()))
        self.alphas.append(alpha)
        self._anorm = max(self._anorm, abs(alpha) + beta + (self.betas[-1] if self.betas else 0.0))
        breakdown = beta <= self._tiny()
        self.betas.append(0.0 if breakdown else beta)
        if not breakdown:
            self._open[j] = w
        if j + 1 >= self.max_steps:
            return True
        if not breakdown:
            self._next = w / beta
        elif not self.restart_on_breakdown:
            self.exhausted = True
        else:
            self.restart()  # invariant subspace found: continue in its orthogonal complement
        return True

    def restart(self) -> bool:
        """Start a new chain from a random vector orthogonal to the basis.

        The current chain's residual stays in :math:`R`. Returns False (and marks the iteration
        exhausted) when the basis already spans the whole space.
        """
        j = self.size
        if j == 0 or j >= self.max_steps or self.exhausted:
            return False
        self.betas[-1] = 0.0  # the tridiagonal view becomes block diagonal; H and R stay exact
        # Gaussian, not Rademacher: a sign vector can be exactly orthogonal to what is left (e.g. to
        # (1, -1, 0, ..) in a multiple eigenspace of a diagonal matrix); a Gaussian one almost never.
        fresh, _ = self._orthogonalize(self._random_vector("gaussian"), j)
        norm = float(torch.linalg.vector_norm(fresh.double()))
        if norm <= 1e3 * torch.finfo(self.op.dtype).eps * math.sqrt(self.op.num_params):
            self.exhausted = True
            return False
        self._next = fresh / norm
        return True

    def tridiagonal(self) -> torch.Tensor:
        """``T_m`` as a dense float64 matrix (block diagonal after restarts)."""
        a = torch.tensor(self.alphas, dtype=torch.float64)
        b = torch.tensor(self.betas[:-1], dtype=torch.float64)
        return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)

    def projected(self) -> torch.Tensor:
        """``H = V^T A V`` (float64, symmetric); equals :meth:`tridiagonal` when there was no restart."""
        upper = torch.triu(self._H[: self.size, : self.size])
        return upper + torch.triu(upper, 1).T

    def residuals(self, S: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``||A V s - theta V s||`` for each column ``s`` of ``S`` and value in ``theta`` (float64)."""
        r2 = ((self.projected() @ S - S * theta) ** 2).sum(dim=0)
        if self._open:
            R = torch.stack(list(self._open.values()), dim=1).double()
            gram = (R.T @ R).cpu()  # few columns: ||R s||^2 = s^T (R^T R) s without an n x k product
            Sr = S[torch.tensor(list(self._open), dtype=torch.long)]
            r2 = r2 + (Sr * (gram @ Sr)).sum(dim=0)
        return r2.clamp_min(0).sqrt()

    @property
    def residual_norm(self) -> float:
        """``beta_m``: the coupling to the next (not yet computed) basis vector."""
        return self.betas[-1] if self.betas else float("nan")


def lanczos(
    op,
    num_steps: int,
    v0: Optional[torch.Tensor] = None,
    generator: GeneratorLike = None,
    keep_basis: bool = True,
    progress: bool = False,
) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps (fewer if the Krylov space becomes invariant).

    Args:
        op: an operator or a dense symmetric tensor.
        num_steps: number of steps ``m`` (capped at the dimension ``n``).
        v0: starting vector (normalized here); default a Rademacher vector from ``generator``.
        generator: generator, seed, or ``None``.
        keep_basis: return the ``(n, m)`` basis ``V`` (costs ``n*m`` numbers, kept anyway during the
            iteration for full reorthogonalization).
        progress: show a progress bar.

    Returns:
        :class:`hessopt.LanczosResult` with ``alphas``, ``betas`` (float64) and ``basis``.

    Example:
        >>> r = hessopt.lanczos(op, num_steps=30, generator=0)
        >>> ritz_values = torch.linalg.eigvalsh(r.tridiagonal())
    """
    op = as_operator(op)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    it = LanczosIteration(op, num_steps, v0=v0, generator=generator)
    with progress_bar(it.max_steps, progress, "Lanczos") as bar:
        while it.step():
            bar.update()
    m = it.size
    return LanczosResult(
        alphas=torch.tensor(it.alphas, dtype=torch.float64),
        betas=torch.tensor(it.betas[:-1], dtype=torch.float64),
        basis=it.basis[:m].T.contiguous() if keep_basis else None,
        residual_norm=it.residual_norm,
        num_matvecs=it.num_matvecs,
    )
