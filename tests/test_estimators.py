r"""Trace and diagonal estimators (hessopt/estimators.py) on explicit float64 matrices.

Oracles are exact: ``torch.trace``/``torch.diagonal``, exact expectations by enumerating all
:math:`2^n` sign vectors, and tolerances derived from the estimators' known variances.

Variance facts used below (Rademacher probes :math:`z`, :math:`E[z_i z_j] = \delta_{ij}`,
:math:`z_i^2 = 1`):

* one Hutchinson trace sample :math:`s = z^\top A z = \sum_i A_{ii} + \sum_{i \ne j} A_{ij} z_i z_j`
  has :math:`\operatorname{Var}(s) = 2 \sum_{i \ne j} A_{ij}^2` (the products :math:`z_i z_j`,
  :math:`i<j`, are uncorrelated with variance 1, and each appears twice);
* with Gaussian probes, :math:`\operatorname{Var}(s) = 2 \|A\|_F^2`;
* one diagonal sample :math:`z_i (Az)_i = A_{ii} + \sum_{j \ne i} A_{ij} z_i z_j` has variance
  :math:`\sum_{j \ne i} A_{ij}^2`.

The mean of :math:`m` samples then has standard deviation :math:`\sigma/\sqrt m`, and a check
:math:`|\hat t - t| \le c\,\sigma/\sqrt m` fails with probability at most :math:`1/c^2` for any
distribution (Chebyshev), about :math:`6\cdot10^{-5}` for :math:`c = 4` under the central limit
theorem. Each test uses one fixed seed: no retries.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import hessopt

DT = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _symmetric(n, seed=0):
    B = torch.randn(n, n, generator=_gen(seed), dtype=DT)
    return (B + B.T) / 2


def _all_sign_vectors(n):
    """All 2^n Rademacher vectors as the columns of an (n, 2^n) matrix: the exact expectation."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=n)), dtype=DT).T


def _low_rank_plus_small(n=40, rank=5, small=1e-3, seed=0):
    U = torch.linalg.qr(torch.randn(n, rank, generator=_gen(seed), dtype=DT))[0]
    big = torch.tensor([100.0, 60.0, -40.0, 30.0, 20.0], dtype=DT)[:rank]
    return U @ torch.diag(big) @ U.T + small * _symmetric(n, seed + 1)


def _hutchinson_sigma(A, distribution="rademacher"):
    if distribution == "gaussian":
        return math.sqrt(2 * float((A**2).sum()))
    off = A - torch.diag(torch.diagonal(A))
    return math.sqrt(2 * float((off**2).sum()))


# ---------------------------------------------------------------------------------------------
# Exact results
# ---------------------------------------------------------------------------------------------


def test_diagonal_is_exact_on_a_diagonal_matrix_with_rademacher_probes():
    d = torch.randn(30, generator=_gen(), dtype=DT)
    est = hessopt.diagonal(torch.diag(d), num_matvecs=3, generator=0)
    torch.testing.assert_close(est, d, rtol=0, atol=1e-15)
    assert est.dtype == DT and est.shape == (30,)


def test_exact_expectations_over_all_sign_vectors():
    n = 8
    A = _symmetric(n)
    Z = _all_sign_vectors(n)
    r = hessopt.trace(A, method="hutchinson", probes=Z)
    assert r.num_matvecs == 2**n and r.method == "hutchinson"
    assert r.estimate == pytest.approx(float(torch.trace(A)), rel=1e-13, abs=1e-13)
    torch.testing.assert_close(hessopt.diagonal(A, probes=Z), torch.diagonal(A), rtol=1e-13, atol=1e-13)
    # and the variance formula of the module docstring, exactly
    assert float(r.samples.var(unbiased=False)) == pytest.approx(_hutchinson_sigma(A) ** 2, rel=1e-12)


def test_hutchpp_is_exact_when_the_sketch_covers_the_range():
    n, rank = 40, 5
    A = _low_rank_plus_small(n, rank, small=0.0)
    r = hessopt.trace(A, num_matvecs=18, method="hutch++", generator=0)  # sketch of 6 >= rank
    assert r.num_matvecs == 18 and r.method == "hutch++"
    assert r.estimate == pytest.approx(float(torch.trace(A)), rel=1e-12)
    assert r.std_error < 1e-10


def test_hutchpp_beats_hutchinson_at_equal_budget_on_low_rank_plus_small():
    A = _low_rank_plus_small()
    truth = float(torch.trace(A))
    plus = hessopt.trace(A, num_matvecs=30, method="hutch++", generator=1)
    plain = hessopt.trace(A, num_matvecs=30, method="hutchinson", generator=1)
    # Hutchinson's error is driven by the big off-diagonal entries; Hutch++ only sees the 1e-3 part
    assert plus.std_error < 1e-3 * plain.std_error
    assert abs(plus.estimate - truth) <= 5 * plus.std_error
    assert abs(plain.estimate - truth) <= 5 * plain.std_error


def test_hutchpp_is_unbiased_over_many_seeds():
    """Mean of 400 independent Hutch++ runs on a full-rank matrix with a tiny budget (sketch 2,
    residual 2): |mean - tr| <= 4 sd/sqrt(400), sd the empirical spread of single runs."""
    A = _symmetric(12, seed=3) + torch.diag(torch.linspace(-3, 6, 12, dtype=DT))
    estimates = torch.tensor([hessopt.trace(A, num_matvecs=6, generator=s).estimate for s in range(400)], dtype=DT)
    sd = float(estimates.std())
    assert sd > 0.1  # a real random variable, not a trivially exact case
    assert abs(float(estimates.mean()) - float(torch.trace(A))) <= 4 * sd / math.sqrt(400)


# ---------------------------------------------------------------------------------------------
# Tolerances derived from the variance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_trace_within_four_standard_deviations(distribution):
    """sigma from the variance formulas above; estimate within 4 sigma/sqrt(m); the reported
    std_error (a sample estimate of sigma/sqrt(m)) within 25% of it (its own relative spread is
    about sqrt((kurtosis - 1) / 4m), a few percent for m = 400)."""
    A = _symmetric(50, seed=2) + torch.diag(torch.linspace(0, 5, 50, dtype=DT))
    m = 400
    r = hessopt.trace(A, num_matvecs=m, method="hutchinson", generator=7, distribution=distribution)
    expected_error = _hutchinson_sigma(A, distribution) / math.sqrt(m)
    assert abs(r.estimate - float(torch.trace(A))) <= 4 * expected_error
    assert r.std_error == pytest.approx(expected_error, rel=0.25)
    assert r.samples.shape == (m,) and r.samples.dtype == DT


def test_diagonal_within_four_standard_deviations_per_entry():
    A = _symmetric(30, seed=4)
    m = 400
    est = hessopt.diagonal(A, num_matvecs=m, generator=3)
    sigma = torch.sqrt(((A - torch.diag(torch.diagonal(A))) ** 2).sum(dim=1))
    assert bool(((est - torch.diagonal(A)).abs() <= 4 * sigma / math.sqrt(m)).all())


# ---------------------------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------------------------


def test_generator_makes_results_reproducible():
    A = _symmetric(20, seed=5)
    for method in ("hutchinson", "hutch++"):
        a = hessopt.trace(A, num_matvecs=9, method=method, generator=123)
        b = hessopt.trace(A, num_matvecs=9, method=method, generator=123)
        c = hessopt.trace(A, num_matvecs=9, method=method, generator=torch.Generator().manual_seed(123))
        other = hessopt.trace(A, num_matvecs=9, method=method, generator=124)
        assert a.estimate == b.estimate == c.estimate and torch.equal(a.samples, c.samples)
        assert other.estimate != a.estimate
    d1 = hessopt.diagonal(A, num_matvecs=5, generator=9)
    d2 = hessopt.diagonal(A, num_matvecs=5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(d1, d2)
    # a Generator object continues its stream: two calls differ, the pair is reproducible
    g = torch.Generator().manual_seed(0)
    first, second = hessopt.diagonal(A, 5, generator=g), hessopt.diagonal(A, 5, generator=g)
    assert not torch.equal(first, second)
    g.manual_seed(0)
    assert torch.equal(hessopt.diagonal(A, 5, generator=g), first)
    # generator=None draws its seed from the global RNG, so torch.manual_seed reproduces it
    torch.manual_seed(1)
    n1 = hessopt.trace(A, num_matvecs=6, generator=None).estimate
    torch.manual_seed(1)
    assert hessopt.trace(A, num_matvecs=6, generator=None).estimate == n1


def test_estimators_accept_operators():
    A = _symmetric(10, seed=6)
    op = hessopt.LambdaOperator(lambda v: A @ v, 10, dtype=DT)
    assert hessopt.trace(op, 9, generator=0).estimate == hessopt.trace(A, 9, generator=0).estimate
    assert torch.equal(hessopt.diagonal(op, 4, generator=0), hessopt.diagonal(A, 4, generator=0))
    r = hessopt.trace(A, 9, generator=0)
    assert set(r.to_dict()) == {"estimate", "std_error", "num_matvecs", "method"}


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda A: hessopt.trace(A, method="hutch"), ValueError, r"unknown trace method 'hutch'; choose 'hutch\+\+' or 'hutchinson'"),
        (lambda A: hessopt.trace(A, distribution="normal"), ValueError, r"unknown probe distribution 'normal'"),
        (lambda A: hessopt.diagonal(A, distribution="normal"), ValueError, r"unknown probe distribution 'normal'"),
        (lambda A: hessopt.trace(A, 1, method="hutchinson"), ValueError, r"num_matvecs must be an int >= 2 \(a standard error needs two samples\), got 1"),
        (lambda A: hessopt.trace(A, 3), ValueError, r"num_matvecs must be an int >= 4"),
        (lambda A: hessopt.trace(A, 10.0), ValueError, r"num_matvecs must be an int >= 4 .* got 10.0"),
        (lambda A: hessopt.diagonal(A, 0), ValueError, r"num_matvecs must be an int >= 1"),
        (lambda A: hessopt.trace(A, probes=torch.ones(6, 4, dtype=DT)), ValueError, r"probes= is supported for method='hutchinson' only"),
        (lambda A: hessopt.trace(A, method="hutchinson", probes=torch.ones(5, 4, dtype=DT)), ValueError, r"probes must be a \(6, m\) tensor"),
        (lambda A: hessopt.diagonal(A, probes=torch.ones(6, dtype=DT)), ValueError, r"probes must be a \(6, m\) tensor .* got \(6,\)"),
        (lambda A: hessopt.trace(A, generator=1.5), TypeError, r"generator must be a torch.Generator, an int seed or None, not float"),
        (lambda A: hessopt.diagonal(A, generator="0"), TypeError, r"generator must be a torch.Generator, an int seed or None, not str"),
    ],
)
def test_bad_estimator_input(call, error, message):
    A = _symmetric(6)
    with pytest.raises(error, match=message):
        call(A)


def test_diagonal_of_a_half_precision_operator_is_summed_in_float32():
    # Rademacher probes on a diagonal matrix give the exact diagonal every sample; summed in float16
    # the 1000 samples of 0.1 stall near 256 * 0.1 (float16's spacing there is 0.03)
    d = torch.tensor([0.1, 0.3, 2.0, 7.0], dtype=torch.float16)
    est = hessopt.diagonal(hessopt.MatrixOperator(torch.diag(d)), num_matvecs=1000, generator=0)
    assert est.dtype == torch.float16
    torch.testing.assert_close(est, d, rtol=1e-3, atol=0)
