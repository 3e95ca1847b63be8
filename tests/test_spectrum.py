"""Lanczos, top eigenpairs and spectral density (hessopt/spectrum/) on float64 matrices with known spectra.

The oracle is ``torch.linalg.eigvalsh`` of the dense matrix (or the spectrum it was built from).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import hessopt

DT = torch.float64




def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _with_spectrum(eigenvalues, seed=0):
    """``Q diag(eigenvalues) Q^T`` for a random orthogonal ``Q``, exactly symmetric."""
    lam = torch.as_tensor(eigenvalues, dtype=DT)
    Q = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=_gen(seed), dtype=DT))[0]
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2


def _bulk(count, lo, hi, seed=1):
    return lo + (hi - lo) * torch.rand(count, generator=_gen(seed), dtype=DT)


# separated ends: top 10, 8, 6.5, 5; bottom -9, -7, -5.5; 193 eigenvalues in [-2, 2]
SEPARATED = _with_spectrum(torch.cat([torch.tensor([10.0, 8.0, 6.5, 5.0, -9.0, -7.0, -5.5], dtype=DT), _bulk(193, -2, 2)]))
# the most negative eigenvalue has the largest magnitude (and the next ones are separated too)
NEGATIVE_DOMINANT = _with_spectrum(torch.cat([torch.tensor([5.0, 4.0, 3.0, -20.0, -15.0, -12.0], dtype=DT), _bulk(194, -1, 1)]), seed=2)


def _expected(A, k, which):
    lam = torch.linalg.eigvalsh(A)
    if which == "largest":
        return lam.flip(0)[:k]
    if which == "smallest":
        return lam[:k]
    return lam[torch.argsort(lam.abs(), descending=True)][:k]


def _true_residuals(A, r):
    V = r.eigenvectors
    return torch.linalg.vector_norm(A @ V - V * r.eigenvalues.to(V.dtype), dim=0)


# ---------------------------------------------------------------------------------------------
# top_eigenvalues
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
@pytest.mark.parametrize("matrix", ["separated", "negative_dominant"])
def test_top_eigenvalues_match_eigvalsh(method, which, matrix):
    A = SEPARATED if matrix == "separated" else NEGATIVE_DOMINANT
    k = 3
    r = hessopt.top_eigenvalues(A, k=k, method=method, which=which, tol=1e-10, max_matvecs=4000, generator=0)
    assert r.converged and r.method == method
    torch.testing.assert_close(r.eigenvalues, _expected(A, k, which), rtol=1e-8, atol=0)
    assert r.eigenvectors.shape == (200, k) and r.eigenvalues.dtype == DT
    torch.testing.assert_close(torch.linalg.vector_norm(r.eigenvectors, dim=0), torch.ones(k, dtype=DT))
    # the reported residuals are the true ones
    torch.testing.assert_close(r.residuals, _true_residuals(A, r), rtol=1e-6, atol=1e-12)
    assert bool((r.error_bounds <= r.residuals + 1e-15).all())
    assert 0 < r.num_matvecs <= 4000


def test_power_returns_the_largest_algebraic_when_a_negative_eigenvalue_dominates():
    r = hessopt.top_eigenvalues(NEGATIVE_DOMINANT, k=2, method="power", tol=1e-10, max_matvecs=4000, generator=1)
    torch.testing.assert_close(r.eigenvalues, torch.tensor([5.0, 4.0], dtype=DT), rtol=1e-8, atol=0)


def test_lanczos_default_tolerance_and_budget():
    r = hessopt.top_eigenvalues(SEPARATED, k=2, generator=0)
    assert r.converged and r.num_matvecs <= 100
    torch.testing.assert_close(r.eigenvalues, torch.tensor([10.0, 8.0], dtype=DT), rtol=1e-5, atol=0)
    assert set(r.to_dict()) == {"eigenvalues", "residuals", "error_bounds", "num_matvecs", "converged", "method"}


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_too_small_budget_warns_and_reports_not_converged(method):
    with pytest.warns(RuntimeWarning, match=rf"top_eigenvalues\({method}\) did not reach tol=1e-10 within"):
        r = hessopt.top_eigenvalues(SEPARATED, k=3, method=method, tol=1e-10, max_matvecs=6, generator=0)
    assert not r.converged
    assert r.num_matvecs <= 6


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_repeated_eigenvalues(method, which):
    """Identity blocks: 3 four times on top, then 2.5; -3 four times at the bottom, then -2.6.

    One Krylov chain sees a single copy of each; the +-3 tie in magnitude is deliberate too (plain
    power iteration oscillates between the two ends).
    """
    ends = torch.tensor([3.0] * 4 + [2.5] + [-3.0] * 4 + [-2.6], dtype=DT)
    A = _with_spectrum(torch.cat([ends, _bulk(190, -1, 1)]), seed=4)
    k = 5
    r = hessopt.top_eigenvalues(A, k=k, method=method, which=which, tol=1e-10, max_matvecs=4000, generator=0)
    assert r.converged
    torch.testing.assert_close(r.eigenvalues, _expected(A, k, which), rtol=1e-8, atol=0)
    V = r.eigenvectors
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=DT), rtol=0, atol=1e-6)
    torch.testing.assert_close(r.residuals, _true_residuals(A, r), rtol=1e-6, atol=1e-12)


def test_repeated_eigenvalues_of_a_small_diagonal_matrix():
    A = torch.diag(torch.tensor([5.0, 5, 5, 2, 1, 0.5, 0.2, 0.1], dtype=DT))
    for method in ("lanczos", "power"):
        r = hessopt.top_eigenvalues(A, k=4, method=method, tol=1e-10, generator=0)
        torch.testing.assert_close(r.eigenvalues, torch.tensor([5.0, 5, 5, 2], dtype=DT), rtol=1e-10, atol=0)


def test_identity_and_full_dimension():
    eye = torch.eye(7, dtype=DT)
    r = hessopt.top_eigenvalues(eye, k=7, generator=0)
    torch.testing.assert_close(r.eigenvalues, torch.ones(7, dtype=DT), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.eigenvectors.T @ r.eigenvectors, eye, rtol=0, atol=1e-10)
    A = _with_spectrum(torch.arange(1.0, 11.0, dtype=DT), seed=5)
    r = hessopt.top_eigenvalues(A, k=10, which="smallest", generator=0)
    torch.testing.assert_close(r.eigenvalues, torch.arange(1.0, 11.0, dtype=DT), rtol=1e-10, atol=0)


def test_top_eigenvalues_are_reproducible_with_a_generator():
    a = hessopt.top_eigenvalues(SEPARATED, k=2, generator=3)
    b = hessopt.top_eigenvalues(SEPARATED, k=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)


# ---------------------------------------------------------------------------------------------
# lanczos
# ---------------------------------------------------------------------------------------------


def test_lanczos_basis_is_orthonormal_and_projects_to_the_tridiagonal():
    r = hessopt.lanczos(SEPARATED, num_steps=60, generator=0)
    V, T = r.basis, r.tridiagonal()
    assert V.shape == (200, 60) and r.alphas.shape == (60,) and r.betas.shape == (59,) and r.num_matvecs == 60
    torch.testing.assert_close(V.T @ V, torch.eye(60, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(V.T @ SEPARATED @ V, T, rtol=0, atol=1e-12)
    # A V = V T + beta_m v_{m+1} e_m^T: everything but the last column is inside the basis
    R = SEPARATED @ V - V @ T
    assert R[:, :-1].abs().max() < 1e-12
    assert float(torch.linalg.vector_norm(R[:, -1])) == pytest.approx(r.residual_norm, rel=1e-10)
    assert hessopt.lanczos(SEPARATED, num_steps=5, keep_basis=False, generator=0).basis is None


def test_lanczos_stops_when_the_krylov_space_is_invariant():
    A = torch.diag(torch.tensor([1.0, 1, 2, 2, 3, 3, 4, 4, 5, 5], dtype=DT))  # 5 distinct eigenvalues
    r = hessopt.lanczos(A, num_steps=10, generator=0)
    assert r.num_matvecs == 5 and r.residual_norm == 0.0
    torch.testing.assert_close(torch.linalg.eigvalsh(r.tridiagonal()), torch.arange(1.0, 6.0, dtype=DT), rtol=1e-12, atol=0)


def test_lanczos_start_vector():
    v0 = torch.zeros(200, dtype=DT)
    v0[0] = 2.0
    r = hessopt.lanczos(SEPARATED, num_steps=3, v0=v0)
    torch.testing.assert_close(r.basis[:, 0], v0 / 2)
    assert r.alphas[0] == pytest.approx(float(SEPARATED[0, 0]), rel=1e-14)


class _FullLengthAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op whose output is a new tensor (storage not shared with an input) of at least
    ``n`` entries, outside the operator's own products (``paused``)."""

    def __init__(self, n):
        super().__init__()
        self.n, self.seen, self.paused = n, [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.n and t.untyped_storage().data_ptr() not in inputs:
                self.seen.append((str(func), t.dtype))
        return out


class _PausingOperator(hessopt.operators.CurvatureOperator):
    """A dense matrix whose products (and their finiteness check) are not recorded."""

    def __init__(self, A, mode):
        self.A, self.mode = A, mode
        self.num_params, self.dtype, self.device = A.shape[0], A.dtype, A.device

    def __matmul__(self, v):
        self.mode.paused = True
        try:
            return super().__matmul__(v)
        finally:
            self.mode.paused = False

    def _matvec(self, v):
        return self.A @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_lanczos_step_allocates_no_full_length_vector(dtype):
    """No float64 copy of any full-length vector and no per-step temporaries: the
    kernel works in its preallocated buffer (the operator's product is the operator's)."""
    from hessopt.spectrum.lanczos import LanczosIteration

    n = 2000
    mode = _FullLengthAllocations(n)
    op = _PausingOperator(torch.diag(torch.linspace(-1.0, 5.0, n, dtype=dtype)), mode)
    it = LanczosIteration(op, 30, generator=0, restart=True)
    for _ in range(8):
        it.step()
    assert it.restart()  # a second chain: the ended chain's residual bookkeeping must not allocate either
    with mode:
        for _ in range(8):
            assert it.step()
            theta, S = torch.linalg.eigh(it.projected())
            it.residuals(S, theta)
    assert mode.seen == []
    assert it.basis.dtype == (torch.float32 if dtype == torch.float16 else dtype)


# ---------------------------------------------------------------------------------------------
# spectral_density
# ---------------------------------------------------------------------------------------------


def test_density_with_n_steps_reproduces_all_eigenvalues_diagonal():
    n = 40
    d = torch.linspace(-2.0, 7.0, n, dtype=DT) + 0.01 * torch.rand(n, generator=_gen(), dtype=DT)
    A = torch.diag(d)
    r = hessopt.spectral_density(A, num_runs=3, num_steps=n, generator=0)
    assert r.num_matvecs == 3 * n and len(r.nodes) == len(r.weights) == 3
    for nodes, weights in zip(r.nodes, r.weights):
        torch.testing.assert_close(nodes, torch.sort(d).values, rtol=0, atol=1e-10)
        # Rademacher start z/sqrt(n) and eigenvectors e_i: every weight is exactly 1/n
        torch.testing.assert_close(weights, torch.full((n,), 1.0 / n, dtype=DT), rtol=0, atol=1e-10)
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-13)
    # v^T A v = sum_i d_i z_i^2 / n = tr(A) / n for every Rademacher start
    assert r.mean == pytest.approx(float(d.mean()), rel=1e-13)
    assert float(torch.trapezoid(r.density, r.grid)) == pytest.approx(1.0, abs=1e-6)


def test_density_with_n_steps_reproduces_all_eigenvalues_dense():
    lam = torch.linspace(-3.0, 4.0, 60, dtype=DT)
    A = _with_spectrum(lam, seed=6)
    r = hessopt.spectral_density(A, num_runs=1, num_steps=60, generator=1)
    torch.testing.assert_close(r.nodes[0], lam, rtol=0, atol=1e-9)


def test_density_with_few_steps_is_a_probability_density():
    r = hessopt.spectral_density(SEPARATED, num_runs=2, num_steps=30, grid_size=2000, generator=0)
    lam = torch.linalg.eigvalsh(SEPARATED)
    for nodes, weights in zip(r.nodes, r.weights):
        assert nodes.numel() == 30 and float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
        assert bool((weights >= 0).all())
        assert float(nodes.min()) >= float(lam[0]) - 1e-10 and float(nodes.max()) <= float(lam[-1]) + 1e-10
    assert float(torch.trapezoid(r.density, r.grid)) == pytest.approx(1.0, abs=1e-6)
    assert r.sigma == pytest.approx(0.01 * float(torch.cat(r.nodes).max() - torch.cat(r.nodes).min()))
    # n * mean is the average of 2 Hutchinson samples z^T A z: sd <= sqrt(2) ||A||_F / sqrt(2)
    assert abs(r.mean * 200 - float(torch.trace(SEPARATED))) < 4 * float(torch.linalg.norm(SEPARATED))
    assert set(r.to_dict()) >= {"nodes", "weights", "grid", "density", "sigma", "num_matvecs"}


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda A: hessopt.top_eigenvalues(A, k=11), ValueError, r"k=11 is larger than the dimension of the operator \(10\); ask for at most 10"),
        (lambda A: hessopt.top_eigenvalues(A, k=0), ValueError, r"k must be a positive int, got 0"),
        (lambda A: hessopt.top_eigenvalues(A, method="arnoldi"), ValueError, r"unknown method 'arnoldi'; choose 'lanczos' or 'power'"),
        (lambda A: hessopt.top_eigenvalues(A, which="biggest"), ValueError, r"which must be one of \('largest', 'smallest', 'magnitude'\), got 'biggest'"),
        (lambda A: hessopt.top_eigenvalues(A, tol=0), ValueError, r"tol must be a positive number, got 0"),
        (lambda A: hessopt.top_eigenvalues(A, k=3, max_matvecs=2), ValueError, r"max_matvecs=2 is too small: Lanczos needs at least k=3 matvecs"),
        (lambda A: hessopt.lanczos(A, num_steps=0), ValueError, r"num_steps must be a positive int, got 0"),
        (lambda A: hessopt.lanczos(A, num_steps=3, v0=torch.zeros(10, dtype=DT)), ValueError, r"v0 must be a nonzero vector"),
        (lambda A: hessopt.lanczos(A, num_steps=3, v0=torch.ones(9, dtype=DT)), ValueError, r"v0 must have 10 entries, got 9"),
        (lambda A: hessopt.spectral_density(A, num_runs=0), ValueError, r"num_runs must be a positive int, got 0"),
        (lambda A: hessopt.spectral_density(A, sigma=-1.0), ValueError, r"sigma must be positive, got -1.0"),
        (lambda A: hessopt.spectral_density(A, grid_size=2.5), ValueError, r"grid_size must be a positive int, got 2.5"),
        (lambda A: hessopt.top_eigenvalues(A + torch.triu(A, 1), k=1), ValueError, r"not symmetric"),
        (lambda A: hessopt.top_eigenvalues(A, generator=0.5), TypeError, r"generator must be a torch.Generator, an int seed or None"),
    ],
)
def test_bad_spectrum_input(call, error, message):
    A = _with_spectrum(torch.arange(10.0, dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # validation happens before any work (no convergence warning)
        with pytest.raises(error, match=message):
            call(A)


def test_check_multiplicity_off_stops_at_first_convergence_with_fewer_matvecs():
    """Separated spectrum: same eigenvalues either way, fewer matvecs without the check chain;
    a repeated eigenvalue: without the check only one copy is found (the documented trade-off)."""
    A = _with_spectrum(torch.cat([torch.tensor([10.0, 7.0, 5.0], dtype=DT), _bulk(97, -1, 1)]), seed=1)
    on = hessopt.top_eigenvalues(A, k=3, tol=1e-8, generator=0)
    off = hessopt.top_eigenvalues(A, k=3, tol=1e-8, generator=0, check_multiplicity=False)
    torch.testing.assert_close(off.eigenvalues, on.eigenvalues, rtol=1e-8, atol=0)
    assert off.converged and off.num_matvecs < on.num_matvecs
    D = torch.diag(torch.tensor([5.0, 5, 5, 2, 1, 0.5, 0.2, 0.1], dtype=DT))
    single = hessopt.top_eigenvalues(D, k=2, tol=1e-10, generator=0, check_multiplicity=False)
    assert float(single.eigenvalues[0]) == pytest.approx(5.0) and float(single.eigenvalues[1]) < 5.0 - 1e-6
