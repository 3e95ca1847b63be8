"""curvature_summary: exact on a known spectrum, one seeding rule, the shared field names."""
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hessopt
from hessopt.summary import derive_seed, summary_seed

DT = torch.float64


def _known_matrix(n=50):
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    evals = torch.cat([torch.tensor([40.0, 25.0, 12.0, 8.0, 5.0], dtype=DT), torch.linspace(2.0, -1.0, n - 5, dtype=DT)])
    A = Q @ torch.diag(evals) @ Q.T
    return (A + A.T) / 2, evals


def test_exact_eigenvalues_and_trace_within_its_error_on_a_known_spectrum():
    A, evals = _known_matrix()
    s = hessopt.curvature_summary(hessopt.MatrixOperator(A), k=5, tol=1e-10, trace_matvecs=60, density=True,
                                  density_steps=50, generator=0)
    assert s.top_eigenvalues.tolist() == pytest.approx(evals[:5].tolist(), abs=1e-8)
    assert s.eigenvalues_converged
    assert bool((s.eigenvalue_error_bounds <= 1e-8).all())
    # Hutch++ is unbiased; with 60 products on n = 50 its standard error is a real spread, not 0
    assert s.trace_std_error > 0
    assert abs(s.trace - float(evals.sum())) <= 4 * s.trace_std_error
    # 50 Lanczos steps on n = 50: the quadrature nodes are the eigenvalues
    nodes, weights = s.density.nodes[0], s.density.weights[0]
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (nodes[weights > 1e-10, None] - evals[None, :]).abs().min(dim=1).values.max() < 1e-8
    # a matrix has neither loss nor gradient: those fields are absent, not made up
    assert s.loss is None and s.gradient_concentration is None and s.gradient_norm is None
    d = s.to_dict()
    assert "loss" not in d and "gradient_concentration" not in d and "eigenvectors" not in d
    assert set(d["density"]) == {"nodes", "weights", "sigma", "num_matvecs"}
    assert d["num_matvecs"] == s.num_matvecs >= 5 + 60 + 50 and s.density.num_matvecs == 50
    json.dumps(d)


def test_the_seeding_rule_is_the_documented_one():
    A, _ = _known_matrix(30)
    op = hessopt.MatrixOperator(A)
    s = hessopt.curvature_summary(op, k=2, trace_matvecs=12, density=True, density_steps=7, generator=11)
    assert s.seed == 11
    eig = hessopt.top_eigenvalues(op, k=2, tol=1e-3, generator=11)
    tr = hessopt.trace(op, num_matvecs=12, generator=12)
    dens = hessopt.spectral_density(op, num_steps=7, generator=13)
    assert torch.equal(s.top_eigenvalues, eig.eigenvalues)
    assert (s.trace, s.trace_std_error) == (tr.estimate, tr.std_error)
    assert torch.equal(s.density.nodes[0], dens.nodes[0]) and torch.equal(s.density.weights[0], dens.weights[0])
    # the quantities asked for do not change the others
    assert hessopt.curvature_summary(op, k=2, trace_matvecs=12, generator=11).trace == s.trace


def test_same_seed_same_numbers_and_generator_or_none_give_one_seed():
    A, _ = _known_matrix(30)
    op = hessopt.MatrixOperator(A)
    kw = dict(k=2, trace_matvecs=12, density=True, density_steps=6)
    a, b = (hessopt.curvature_summary(op, generator=5, **kw).to_dict() for _ in range(2))
    assert a == b
    assert hessopt.curvature_summary(op, generator=6, **kw).trace != a["trace"]
    # a Generator gives one seed by one draw from it
    g = torch.Generator().manual_seed(3)
    s = hessopt.curvature_summary(op, generator=g, **kw)
    assert s.seed == summary_seed(torch.Generator().manual_seed(3))
    assert s.to_dict() == hessopt.curvature_summary(op, generator=s.seed, **kw).to_dict()
    # None draws the seed from torch's global generator (the rule of every estimator's generator=None)
    torch.manual_seed(123)
    first = hessopt.curvature_summary(op, **kw)
    torch.manual_seed(123)
    assert hessopt.curvature_summary(op, **kw).to_dict() == first.to_dict()
    assert derive_seed(2**61 - 2, 3) == 2  # seeds wrap modulo the prime 2**61 - 1


def test_trace_options_exact_small_space_and_skipped():
    A, evals = _known_matrix(10)
    op = hessopt.MatrixOperator(A)
    exact = hessopt.curvature_summary(op, k=1, trace_matvecs=30, generator=0)  # sketch of 10 = n spans it
    assert exact.trace == pytest.approx(float(evals.sum()), abs=1e-10) and exact.trace_std_error == 0.0
    skipped = hessopt.curvature_summary(op, k=1, trace_matvecs=0, generator=0)
    assert math.isnan(skipped.trace) and math.isnan(skipped.trace_std_error)
    hutch = hessopt.curvature_summary(op, k=1, trace_matvecs=8, trace_method="hutchinson", generator=0)
    assert hutch.trace == hessopt.trace(op, num_matvecs=8, method="hutchinson", generator=1).estimate
    assert hessopt.curvature_summary(op, k=50, generator=0).top_eigenvalues.numel() == 10  # k capped at n


def test_gradient_concentration_and_loss_on_a_model_against_the_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(7, 3, dtype=DT), torch.tensor([0, 1, 1, 0, 1, 0, 0])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        params = {n: c.view(s) for n, c, s in zip(names, theta.split([s.numel() for s in shapes]), shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    H, g = torch.func.hessian(loss)(flat), torch.func.grad(loss)(flat)
    evals, evecs = torch.linalg.eigh(H)
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    s = hessopt.curvature_summary(op, k=3, tol=1e-10, generator=0)
    V = evecs.flip(1)[:, :3]
    assert s.gradient_concentration == pytest.approx(float((V.T @ g).pow(2).sum() / (g @ g)), rel=1e-6)
    assert s.gradient_norm == pytest.approx(float(g.norm()), rel=1e-10)
    assert s.loss == pytest.approx(float(loss(flat)), rel=1e-12)
    quiet = hessopt.curvature_summary(op, k=3, tol=1e-10, generator=0, gradient_concentration=False, loss=False)
    assert quiet.gradient_concentration is None and quiet.loss is None
    assert torch.equal(quiet.top_eigenvalues, s.top_eigenvalues)
    assert "| top eigenvalues |" in s.to_markdown() and "gradient concentration" in s.to_markdown()


def test_summary_argument_errors():
    op = hessopt.MatrixOperator(torch.eye(4, dtype=DT))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        hessopt.curvature_summary(op, k=0)
    with pytest.raises(ValueError, match=r"trace_matvecs must be an int >= 0 \(0 skips the trace\)"):
        hessopt.curvature_summary(op, trace_matvecs=-1)
    with pytest.raises(ValueError, match="Hutch\\+\\+ needs"):
        hessopt.curvature_summary(op, trace_matvecs=3)
    with pytest.raises(ValueError, match="unknown trace method"):
        hessopt.curvature_summary(op, trace_method="exact")
    with pytest.raises(TypeError, match="generator must be a torch.Generator, an int seed or None"):
        hessopt.curvature_summary(op, generator="seed")
    with pytest.raises(TypeError):
        hessopt.curvature_summary(op, 3)  # keyword-only options
