"""hessopt.solve (conjugate gradients) and CurvatureOperator.to_scipy(), in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hessopt

DT = torch.float64


def _spd(n=30, cond=1e3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    eigs = torch.logspace(0, np.log10(cond), n, dtype=DT)
    return (Q * eigs) @ Q.T


def test_cg_on_a_dense_spd_matrix_to_1e_10():
    A = _spd()
    b = torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=DT)
    r = hessopt.solve(hessopt.MatrixOperator((A + A.T) / 2), b, tol=1e-12, max_iter=300)
    exact = torch.linalg.solve(A, b)
    assert r.converged and not r.negative_curvature
    assert (r.solution - exact).norm() / exact.norm() < 1e-10
    assert r.relative_residual <= 1e-12 and r.num_matvecs <= 300
    torch.testing.assert_close(torch.tensor(r.residual_norm, dtype=DT), (b - A @ r.solution).norm(), rtol=1e-2, atol=1e-12)
    # damping: (A + lambda I) x = b; a warm start costs one product more and converges too
    damped = hessopt.solve(A, b, damping=0.5, tol=1e-12, max_iter=300)
    torch.testing.assert_close(damped.solution, torch.linalg.solve(A + 0.5 * torch.eye(30, dtype=DT), b), rtol=1e-9, atol=1e-12)
    warm = hessopt.solve(A, b, tol=1e-12, max_iter=300, x0=exact + 1e-3)
    assert warm.converged and (warm.solution - exact).norm() / exact.norm() < 1e-10
    assert r.to_dict()["converged"] is True


def test_cg_stops_at_negative_curvature_and_says_so():
    A = torch.diag(torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=DT))
    b = torch.ones(4, dtype=DT)
    with pytest.warns(RuntimeWarning, match=r"non-positive curvature .* not positive definite"):
        r = hessopt.solve(A, b)
    assert r.negative_curvature and not r.converged and r.curvature < 0
    # enough damping makes it positive definite
    ok = hessopt.solve(A, b, damping=2.5, tol=1e-12)
    torch.testing.assert_close(ok.solution, b / (torch.diag(A) + 2.5), rtol=1e-10, atol=1e-12)


def test_solve_on_a_model_operator_with_lists_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(16, 3, dtype=DT), torch.arange(16) % 2
    op = hessopt.GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    g = [torch.randn(p.shape, dtype=DT) for p in model.parameters()]
    r = hessopt.solve(op, g, damping=1e-2, tol=1e-10, max_iter=200)
    assert isinstance(r.solution, list) and [s.shape for s in r.solution] == [p.shape for p in model.parameters()]
    G = op.to_dense() + 1e-2 * torch.eye(op.num_params, dtype=DT)
    flat = torch.cat([t.reshape(-1) for t in g])
    torch.testing.assert_close(torch.cat([s.reshape(-1) for s in r.solution]), torch.linalg.solve(G, flat), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match=r"damping must be a finite number >= 0"):
        hessopt.solve(op, flat, damping=-1.0)
    with pytest.raises(ValueError, match=r"b must have 26 entries"):
        hessopt.solve(op, flat[:3])
    with pytest.raises(TypeError, match=r"convert it with b.to\(op.device, op.dtype\)"):
        hessopt.solve(op, flat.float())
    with pytest.raises(ValueError, match=r"max_iter must be a positive int"):
        hessopt.solve(op, flat, max_iter=0)


def test_to_scipy_eigsh_equals_top_eigenvalues_and_cg_works():
    from scipy.sparse.linalg import cg, eigsh

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(16, 3, dtype=DT), torch.arange(16) % 2
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    lin = op.to_scipy()
    assert lin.shape == (26, 26) and lin.dtype == np.float64
    v = np.random.default_rng(0).standard_normal(26)
    out = lin @ v
    assert out.dtype == np.float64 and out.shape == (26,)
    np.testing.assert_allclose(out, (op @ torch.from_numpy(v)).numpy(), rtol=1e-14)
    np.testing.assert_allclose(lin.matmat(np.stack([v, 2 * v], 1))[:, 1], 2 * out, rtol=1e-13)
    top = np.sort(eigsh(lin, k=3, which="LA", return_eigenvectors=False, tol=1e-12))[::-1]
    ours = hessopt.top_eigenvalues(op, k=3, tol=1e-10).eigenvalues.numpy()
    np.testing.assert_allclose(top, ours, rtol=1e-8, atol=1e-10)
    # a float32 operator still speaks float64 to SciPy
    op32 = hessopt.MatrixOperator(_spd(5).float())
    sol, info = cg(op32.to_scipy(), np.ones(5))
    assert info == 0 and op32.to_scipy().matvec(np.ones(5)).dtype == np.float64
