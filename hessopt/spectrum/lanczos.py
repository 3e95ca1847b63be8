r"""The Lanczos kernel, shared by :func:`top_eigenvalues` and :func:`spectral_density`.

Lanczos builds an orthonormal basis :math:`V_m = [v_1..v_m]` of the Krylov space
:math:`\mathrm{span}\{v_1, Av_1, .., A^{m-1}v_1\}` in which :math:`T_m = V_m^\top A V_m` is
tridiagonal:

.. math::  A V_m = V_m T_m + \beta_m v_{m+1} e_m^\top.

The eigenvalues of :math:`T_m` (Ritz values) approximate the extreme eigenvalues of :math:`A`
after few steps, and a Ritz pair :math:`(\theta, V_m s)` has residual
:math:`\|A V_m s - \theta V_m s\| = \beta_m |e_m^\top s|` (read off :math:`T_m` for free).

**Orthogonality.** In floating point the three-term recurrence loses orthogonality and produces
spurious copies ("ghost" eigenvalues) of converged ones; here every new vector is
reorthogonalized against all previous ones: the three-term step first, then one classical
Gram-Schmidt pass against the whole basis (one ``torch.mv`` and one ``addmv`` on the stacked basis),
and a second pass only when the first removed more than :math:`1 - 1/\sqrt2` of the norm (the
Daniel-Gragg-Kaufman-Stewart criterion; "twice is enough", Parlett ch. 6). The coefficients of all
passes are summed in float64 into the projected matrix, so the three-term step's rounding is
corrected by the pass (as in iterative refinement).

**Precision.** The products are taken in the operator's dtype, but the recurrence runs in the
*accumulation dtype* (:func:`accumulation_dtype`): float32 for a float16/bfloat16 operator (each
product is cast up; the vector is cast down for the product), the operator's dtype otherwise. The
small matrices (:math:`T`, :math:`H`, their eigendecompositions) are float64. A breakdown (an
invariant Krylov space) is declared when :math:`\beta \le 10^3\,\epsilon_{acc}\,\|T\|`, with
:math:`\epsilon_{acc}` the accumulation dtype's machine epsilon: scaled by the precision the
vectors are actually orthogonalized in. (Scaling it by float16's epsilon, as before, made
:math:`10^3\epsilon \approx 1`: every step looked like a breakdown.)

**Memory and bookkeeping.** One preallocated ``(max_steps + 1, n)`` buffer holds the basis rows,
the next vector (the residual of the last one), and the residuals of chains ended by a restart;
no full-length vector is allocated per step except the operator's own output (and its copy into
the buffer), and no full-length vector is ever copied to float64.

**Shards.** Every inner product goes through the operator's vector space
(:meth:`hessopt.operators.CurvatureOperator.dot`, ``norm``, ``reduce_sum``, ``probe``): on a sharded
operator (FSDP2) the buffer holds this process's ``local_size`` entries of each vector, each
Gram-Schmidt pass is one ``all_reduce`` of its ``m`` coefficients, and the small matrices are the
same on every process.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .._checks import check_positive_int
from .._progress import progress_bar
from ..operators import CurvatureOperator, as_operator
from ..probes import GeneratorLike, generator_for
from ..results import LanczosResult

__all__ = ["lanczos", "LanczosIteration", "accumulation_dtype"]

_DGKS = 1.0 / math.sqrt(2.0)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype vectors are accumulated in for an operator of ``dtype``: float32 for 16-bit (and
    narrower) floating types, ``dtype`` itself for float32 and float64."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


class LanczosIteration:
    r"""Step-by-step Lanczos with full reorthogonalization (the shared kernel).

    Call :meth:`step` to add one basis vector (one matvec); read :attr:`alphas`, :attr:`betas`,
    :attr:`basis` (``(m, n)`` rows, in :attr:`dtype`), :meth:`tridiagonal` and :meth:`projected` at
    any point. When the Krylov space becomes invariant (``beta`` vanishes) the iteration either
    stops (:attr:`exhausted`; what spectral quadrature needs, since the quadrature is then exact)
    or, with ``restart=True``, continues with a new chain from a fresh random vector orthogonal to
    the basis.

    An eigensolver may also call :meth:`restart` before the space is invariant: one Krylov chain
    never sees the part of a multiple eigenvalue's eigenspace orthogonal to its start vector, so a
    new chain is how further copies are found. The basis then no longer yields a tridiagonal
    projection, so the iteration also keeps the full projected matrix :math:`H = V^\top A V` (its
    columns are the reorthogonalization coefficients, computed anyway) and the residual columns
    :math:`R = AV - VH`. :math:`R` is nonzero only at the last vector of each chain: the live
    chain's is :math:`\beta_m v_{m+1}` (the next vector, kept anyway), an ended chain's is stored
    in a row at the end of the buffer (so each restart lowers the basis capacity by one) and loses
    its component along every vector added later. For any coefficient vector :math:`s` and value
    :math:`\theta`,

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
        n = op.local_size  # this process's entries of each vector (all of them unless sharded)
        self.max_steps = min(int(max_steps), op.num_params)
        self.restart_on_breakdown = restart
        self.dtype = accumulation_dtype(op.dtype)
        self._gen = generator_for(op, generator)
        # rows [0, m): basis; row m: the next vector; rows [top, max_steps]: ended chains' residuals
        self._rows = torch.empty(self.max_steps + 1, n, dtype=self.dtype, device=op.device)
        self._top = self.max_steps + 1
        self._ends: List[int] = []  # column index (basis vector) of each stored ended-chain residual
        self._cast = None if op.dtype == self.dtype else torch.empty(n, dtype=op.dtype, device=op.device)
        self.alphas: list = []
        self.betas: list = []  # betas[j] couples v_j and v_{j+1}; the last one is the residual norm
        self.num_matvecs = 0
        self.exhausted = False
        self._anorm = 0.0
        self._H = torch.zeros(self.max_steps, self.max_steps, dtype=torch.float64)  # upper triangle
        first = self._rows[0]
        if v0 is None:
            first.copy_(self._random_vector())
        else:
            if not isinstance(v0, torch.Tensor) or v0.numel() != n:
                got = v0.numel() if isinstance(v0, torch.Tensor) else type(v0).__name__
                raise ValueError(f"v0 must have {n} entries, got {got}")
            first.copy_(v0.detach().reshape(-1))
        norm = op.norm(first)
        if not norm > 0 or not math.isfinite(norm):
            raise ValueError("v0 must be a nonzero vector with finite entries")
        first.div_(norm)

    # -- views ---------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of basis vectors so far (``m``)."""
        return len(self.alphas)

    @property
    def basis(self) -> torch.Tensor:
        """The ``(m, n)`` orthonormal basis rows (a view into the buffer, in :attr:`dtype`)."""
        return self._rows[: self.size]

    @property
    def capacity(self) -> int:
        """The most basis vectors this iteration can still hold (``max_steps`` minus restarts)."""
        return self._top - 1

    @property
    def full(self) -> bool:
        """Whether no further step is possible for lack of room (or budget)."""
        return self.size >= self.capacity

    def _random_vector(self, distribution: str = "rademacher") -> torch.Tensor:
        return self.op.probe(self._gen, dtype=self.dtype, distribution=distribution)

    def _tiny(self) -> float:
        return 1e3 * torch.finfo(self.dtype).eps * max(self._anorm, 1e-300)

    def _project_out(self, w: torch.Tensor, m: int, passes: int = 2, coefficients: Optional[torch.Tensor] = None):
        """Remove from ``w`` (in place) its components along the first ``m`` basis rows.

        Classical Gram-Schmidt on the stacked basis; a further pass only when a pass removed more
        than ``1 - 1/sqrt(2)`` of the norm (DGKS). Returns the final norm of ``w`` (a float).
        """
        op = self.op
        norm = op.norm(w)
        if m == 0:
            return norm
        V = self._rows[:m]
        for _ in range(passes):
            c = op.reduce_sum(torch.mv(V, w))
            w.addmv_(V.T, c, alpha=-1.0)
            if coefficients is not None:
                coefficients += c.to(device="cpu", dtype=torch.float64)
            before, norm = norm, op.norm(w)
            if norm > _DGKS * before:
                break
        return norm

    def step(self) -> bool:
        """Add one basis vector (one matvec). Returns False when no further step is possible."""
        j = self.size
        if self.full or self.exhausted:
            return False
        v = self._rows[j]
        if self._ends:  # ended chains' residuals lose their component along the new basis vector
            E = self._rows[self._top:]
            E.addr_(self.op.reduce_sum(torch.mv(E, v)), v, alpha=-1.0)
        if self._cast is None:
            out = self.op @ v
        else:
            self._cast.copy_(v)
            out = self.op @ self._cast
        w = self._rows[j + 1]
        out = out.reshape(-1)
        self.num_matvecs += 1
        coefficients = torch.zeros(j + 1, dtype=torch.float64)
        # the three-term step, then the full pass corrects its rounding (coefficients summed in float64)
        if out.dtype == self.dtype:
            alpha = self.op.dot(out, v)
            torch.sub(out, v, alpha=alpha, out=w)  # copy into the buffer and first step in one pass
        else:
            w.copy_(out)  # the product cast up to the accumulation dtype
            alpha = self.op.dot(w, v)
            w.sub_(v, alpha=alpha)
        del out
        coefficients[j] = alpha
        beta_prev = self.betas[-1] if self.betas else 0.0
        if beta_prev:
            w.sub_(self._rows[j - 1], alpha=beta_prev)
            coefficients[j - 1] = beta_prev
        beta = self._project_out(w, j + 1, coefficients=coefficients)
        self._H[: j + 1, j] = coefficients
        alpha = float(coefficients[j])
        self.alphas.append(alpha)
        self._anorm = max(self._anorm, abs(alpha) + beta + beta_prev)
        breakdown = not beta > self._tiny()
        self.betas.append(0.0 if breakdown else beta)
        if not breakdown:
            w.div_(beta)  # the next basis vector, already in place
        if self.full:
            return True
        if breakdown:
            if self.restart_on_breakdown:
                self.restart()  # invariant subspace found: continue in its orthogonal complement
            else:
                self.exhausted = True
        return True

    def restart(self) -> bool:
        """Start a new chain from a random vector orthogonal to the basis.

        The current chain's residual is kept in a row at the end of the buffer (one basis vector
        less of capacity). Returns False (and marks the iteration exhausted when the basis spans the
        whole space) when no new chain can start.
        """
        j = self.size
        keep = bool(self.betas and self.betas[-1] > 0)
        if j == 0 or self.exhausted or j + 1 >= self._top - int(keep):
            return False
        if keep:  # the ended chain's residual column beta_m v_{m+1}
            self._top -= 1
            self._rows[self._top].copy_(self._rows[j]).mul_(self.betas[-1])
            self._ends.insert(0, j - 1)  # rows [top, ...] in the order of self._ends
        self.betas[-1] = 0.0  # the tridiagonal view becomes block diagonal; H and R stay exact
        # Gaussian, not Rademacher: a sign vector can be exactly orthogonal to what is left (e.g. to
        # (1, -1, 0, ..) in a multiple eigenspace of a diagonal matrix); a Gaussian one almost never.
        fresh = self._rows[j]
        fresh.copy_(self._random_vector("gaussian"))
        start = self.op.norm(fresh)
        norm = self._project_out(fresh, j)
        if norm <= 1e3 * torch.finfo(self.dtype).eps * start:
            self.exhausted = True
            return False
        fresh.div_(norm)
        return True

    # -- the small matrices ---------------------------------------------------------------------

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
        m = self.size
        r2 = ((self.projected() @ S - S * theta) ** 2).sum(dim=0)
        live = self.betas[-1] if self.betas else 0.0
        if self._ends:
            E = self._rows[self._top:]
            cols = list(self._ends)
            gram = self.op.reduce_sum(E @ E.T).to(device="cpu", dtype=torch.float64)
            if live > 0:  # the live chain's column: live * (the next vector, unit norm)
                cross = (self.op.reduce_sum(torch.mv(E, self._rows[m])) * live).to(device="cpu", dtype=torch.float64)
                gram = torch.cat([torch.cat([gram, cross[:, None]], 1),
                                  torch.cat([cross, torch.tensor([live * live], dtype=torch.float64)])[None]], 0)
                cols.append(m - 1)
            Sr = S[torch.tensor(cols, dtype=torch.long)]
            r2 = r2 + (Sr * (gram @ Sr)).sum(dim=0)
        elif live > 0:
            r2 = r2 + (S[m - 1] * live) ** 2
        return r2.clamp_min(0).sqrt()

    @property
    def residual_norm(self) -> float:
        """``beta_m``: the coupling to the next (not yet computed) basis vector."""
        return self.betas[-1] if self.betas else float("nan")

    def ritz_vectors(self, S: torch.Tensor) -> torch.Tensor:
        """``V S`` as ``(n, k)`` columns in :attr:`dtype` (one product with the stacked basis).

        Computed as ``(S^T V^T)^T``: a ``(k, m) x (m, n)`` product writes whole rows (1.5-2x faster
        on CPU than ``V @ S`` with its ``k``-wide output rows); the result is the transposed view,
        so each eigenvector (column) is contiguous."""
        return (S.T.to(device=self._rows.device, dtype=self.dtype) @ self.basis).T


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
        :class:`hessopt.LanczosResult` with ``alphas``, ``betas`` (float64) and ``basis`` (in the
        accumulation dtype: float32 for a float16/bfloat16 operator, else the operator's dtype).

    Example:
        >>> r = hessopt.lanczos(op, num_steps=30, generator=0)
        >>> ritz_values = torch.linalg.eigvalsh(r.tridiagonal())
    """
    op = as_operator(op)
    check_positive_int("num_steps", num_steps)
    it = LanczosIteration(op, num_steps, v0=v0, generator=generator)
    with progress_bar(it.max_steps, progress, "Lanczos") as bar:
        while it.step():
            bar.update()
    return LanczosResult(
        alphas=torch.tensor(it.alphas, dtype=torch.float64),
        betas=torch.tensor(it.betas[:-1], dtype=torch.float64),
        basis=it.basis.T.contiguous() if keep_basis else None,
        residual_norm=it.residual_norm,
        num_matvecs=it.num_matvecs,
    )
