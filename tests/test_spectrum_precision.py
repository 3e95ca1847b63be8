"""Spectrum estimators on half-precision operators, against a float64 reference.

A float16 / bfloat16 operator's products are accurate to about ``eps(dtype) * ||A||``; Lanczos and
power iteration must accumulate in float32 (the products are cast up), report error bounds that
cover the true error against the float64 eigenvalues of the same matrix, and say
``converged=False`` (with a warning) when the tolerance asked for is below what the products allow.
Today's failure: one wrong eigenvalue (0.069 instead of 0.835 and 0.677) with residual 0 and
``converged=True`` after one product, because the breakdown threshold was ``1e3 * eps(float16)``
times ``||T||``, i.e. everything.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hessopt

DT = torch.float64
HALF = [torch.float16, torch.bfloat16]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _matrix(n=60, seed=0):
    """Top eigenvalues 0.835, 0.677, 0.52, the rest in [-0.1, 0.3] (the spectrum of the report)."""
    lam = torch.cat([torch.tensor([0.835, 0.677, 0.52], dtype=DT), -0.1 + 0.4 * torch.rand(n - 3, generator=_gen(seed + 1), dtype=DT)])
    Q = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=DT))[0]
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2


def _half_operator(dtype, n=60):
    """A LambdaOperator whose products are a ``dtype`` matrix-vector product; and the float64 copy of
    that same (rounded) matrix: the reference."""
    Ah = _matrix(n).to(dtype)
    op = hessopt.LambdaOperator(lambda v: Ah @ v, n, dtype=dtype)
    return op, Ah.double()


def _eps(dtype):
    return torch.finfo(dtype).eps


def _loose_tol(dtype):
    return 5 * _eps(dtype)  # float16 4.9e-3, bfloat16 3.9e-2: what its products support, with margin


# ---------------------------------------------------------------------------------------------
# top_eigenvalues
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_top_eigenvalues_on_a_half_precision_product_match_float64(dtype, method):
    op, A64 = _half_operator(dtype)
    ref = torch.linalg.eigvalsh(A64).flip(0)[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        r = hessopt.top_eigenvalues(op, k=2, method=method, tol=_loose_tol(dtype), generator=0, max_matvecs=400)
    assert r.converged
    assert r.num_matvecs > 2
    err = (r.eigenvalues - ref).abs()
    # correct to the tolerance asked for (which the products support), and the bounds are honest
    assert bool((err <= _loose_tol(dtype) * ref.abs()).all()), (r.eigenvalues, ref)
    assert bool((err <= r.error_bounds).all()), (err, r.error_bounds)
    assert bool((r.residuals > 0).all())
    # eigenvectors accumulated in float32: unit norm and orthogonal to float32 accuracy
    V = r.eigenvectors.double()
    torch.testing.assert_close(V.T @ V, torch.eye(2, dtype=DT), atol=1e-5, rtol=0)
    # the reported residuals are the true ones against the reference, up to one product's rounding
    true_res = torch.linalg.vector_norm(A64 @ V - V * r.eigenvalues, dim=0)
    assert bool(((true_res - r.residuals).abs() <= 2 * _eps(dtype) * float(ref[0])).all())


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_never_claims_a_tolerance_its_products_cannot_reach(dtype, method):
    op, A64 = _half_operator(dtype)
    ref = torch.linalg.eigvalsh(A64).flip(0)[:2]
    with pytest.warns(RuntimeWarning, match=str(dtype).replace("torch.", "")):
        r = hessopt.top_eigenvalues(op, k=2, method=method, tol=1e-5, generator=0, max_matvecs=400)
    assert not r.converged
    # it stops at the precision floor instead of spending the whole budget, and is still right
    assert r.num_matvecs < 400
    err = (r.eigenvalues - ref).abs()
    assert bool((err <= 4 * _eps(dtype) * float(ref[0])).all()), (r.eigenvalues, ref)
    assert bool((err <= r.error_bounds).all())


def test_float32_and_float64_operators_still_converge_at_the_default_tol():
    A = _matrix()
    for dtype in (torch.float32, torch.float64):
        r = hessopt.top_eigenvalues(A.to(dtype), k=2, generator=0)
        assert r.converged
        torch.testing.assert_close(r.eigenvalues, torch.linalg.eigvalsh(A.to(dtype).double()).flip(0)[:2],
                                   rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# spectral_density
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_spectral_density_on_a_half_precision_product_matches_float64(dtype):
    op, A64 = _half_operator(dtype)
    steps = 30
    d = hessopt.spectral_density(op, num_runs=1, num_steps=steps, generator=3)
    ref = hessopt.spectral_density(A64, num_runs=1, num_steps=steps, generator=3)  # same start vector
    nodes, weights = d.nodes[0], d.weights[0]
    assert nodes.numel() == steps and d.num_matvecs == steps  # no false breakdown
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    # quadrature moments v^T A^p v (p = 1..4) agree with the float64 run to the products' precision
    scale = float(A64.abs().max()) + float(torch.linalg.matrix_norm(A64, 2))
    for p in range(1, 5):
        got = float((weights * nodes**p).sum())
        want = float((ref.weights[0] * ref.nodes[0] ** p).sum())
        assert got == pytest.approx(want, abs=8 * p * _eps(dtype) * scale**p), p
    # the extreme nodes sit on the extreme eigenvalues
    lam = torch.linalg.eigvalsh(A64)
    assert float(nodes.max()) == pytest.approx(float(lam[-1]), abs=4 * _eps(dtype) * float(lam[-1]))


# ---------------------------------------------------------------------------------------------
# a real half-precision model through HessianOperator
# ---------------------------------------------------------------------------------------------


def _tiny_model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(32, 6, generator=_gen(5))
    y = torch.randint(0, 3, (32,), generator=_gen(6))
    half = model.to(dtype)
    ref = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ref.load_state_dict({k: v.double() for k, v in half.state_dict().items()})  # the same (rounded) weights

    def loss_fn(out, target):
        return nn.functional.cross_entropy(out.float(), target)  # half logits, loss reduced in float32

    return half, ref, loss_fn, x, y


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_model_top_eigenvalues_match_float64_model(dtype, method):
    half, ref, loss_fn, x, y = _tiny_model(dtype)
    xh = x.to(dtype).to(dtype)
    op = hessopt.HessianOperator(half, loss_fn, (xh, y))
    assert op.dtype == dtype
    op64 = hessopt.HessianOperator(ref, loss_fn, (xh.double(), y))
    lam = torch.linalg.eigvalsh(op64.to_dense()).flip(0)[:2]
    # a network's half-precision products are less accurate than one rounding: ask for 10%
    r = hessopt.top_eigenvalues(op, k=2, method=method, tol=0.1, generator=0, max_matvecs=300)
    assert r.num_matvecs > 2
    assert bool(((r.eigenvalues - lam).abs() <= 0.1 * lam.abs()).all()), (r.eigenvalues, lam)
    d = hessopt.spectral_density(op, num_steps=20, generator=0)
    assert d.nodes[0].numel() == 20
    assert float(d.nodes[0].max()) == pytest.approx(float(lam[0]), rel=0.1)
