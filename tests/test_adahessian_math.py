"""AdaHessian against oracles, in float64: AdamW, a Newton step, dense Hessians, a reference loop.

The reference loop (:func:`reference_adahessian`) is the update rule of the issue written out
naively from the formula, with probes drawn from the same seeded generator stream and ``z * Hz``
taken from the dense Hessian (``torch.func.hessian``): every later test that compares against it
checks lazy updates, bias correction by Hessian-update count, weight decay, Hessian power and
n_samples averaging at once.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessopt
from hessopt.optim.curvature import Hutchinson
from hessopt.probes import probe


def _closure(opt, loss_fn):
    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


def _coupled_loss(params):
    """A smooth loss with a dense (non-diagonal) Hessian over tensors of any shape."""
    total = sum(F.softplus(p * (k + 1) * 0.7).sum() + 0.25 * (p**4).sum() for k, p in enumerate(params))
    mix = sum(torch.tanh(p).sum() * (0.3 + 0.1 * k) for k, p in enumerate(params))
    return total + 0.5 * mix**2


def reference_adahessian(loss_fn, params0, steps, *, lr, betas, eps, weight_decay, hessian_power,
                         update_each, n_samples, seed, distribution="rademacher", clip=1.0):
    """The update rule of the issue, naively: dense Hessian, same probe stream, no averaging, the
    preconditioned update clipped to [-clip, clip] (clip=None: the paper's unbounded rule)."""
    b1, b2 = betas
    params = [p.detach().clone() for p in params0]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    h = 0
    trajectory = []
    for t in range(1, steps + 1):
        flat = torch.cat([p.reshape(-1) for p in params])

        def f(x):
            return loss_fn([c.view(s) for c, s in zip(x.split(sizes), shapes)])

        g = [c.view(s) for c, s in zip(torch.func.grad(f)(flat).split(sizes), shapes)]
        if (t - 1) % update_each == 0:
            H = torch.func.hessian(f)(flat)
            D = torch.zeros_like(flat)
            for _ in range(n_samples):
                z = torch.cat([probe(s, gen, dtype=flat.dtype, distribution=distribution).reshape(-1)
                               for s in shapes])
                D += z * (H @ z)
            D = [c.view(s).abs() for c, s in zip((D / n_samples).split(sizes), shapes)]
            v = [b2 * vi + (1 - b2) * d * d for vi, d in zip(v, D)]
            h += 1
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        u = [mi / (1 - b1**t) / ((vi / (1 - b2**h)).sqrt() ** hessian_power + eps) for mi, vi in zip(m, v)]
        if clip is not None:
            u = [ui.clamp(-clip, clip) for ui in u]
        params = [p * (1 - lr * weight_decay) - lr * ui for p, ui in zip(params, u)]
        trajectory.append([p.clone() for p in params])
    return trajectory


@pytest.mark.parametrize(
    "update_each,n_samples,hessian_power,weight_decay,distribution",
    [(1, 1, 1.0, 0.0, "rademacher"), (3, 2, 0.5, 0.01, "rademacher"), (2, 3, 1.0, 0.1, "gaussian")],
)
def test_matches_reference_loop(float64, update_each, n_samples, hessian_power, weight_decay, distribution):
    torch.manual_seed(0)
    params0 = [torch.randn(3), torch.randn(2, 2), torch.randn(())]
    params = [p.clone().requires_grad_() for p in params0]
    hyper = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=weight_decay,
                 hessian_power=hessian_power, update_each=update_each, n_samples=n_samples, seed=7)
    opt = hessopt.AdaHessian(params, distribution=distribution, averaging="none", **hyper)
    expected = reference_adahessian(_coupled_loss, params0, 7, distribution=distribution, **hyper)
    for step, want in enumerate(expected):
        opt.step(_closure(opt, lambda: _coupled_loss(params)))
        for p, w in zip(params, want):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14, msg=f"step {step + 1}")
    hessian_updates = len(range(0, 7, update_each))
    assert opt.state[params[0]]["curvature_updates"] == hessian_updates
    assert opt.state[params[0]]["step"] == 7


def test_reference_loop_detects_step_counted_bias_correction(float64):
    """Guard on the guard: with lazy updates, bias-correcting v by the step count moves the iterate."""
    torch.manual_seed(0)
    params0 = [torch.randn(3)]
    hyper = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.0, hessian_power=1.0,
                 update_each=3, n_samples=1, seed=7)
    params = [p.clone().requires_grad_() for p in params0]
    opt = hessopt.AdaHessian(params, **hyper)
    for _ in range(2):
        opt.step(_closure(opt, lambda: _coupled_loss(params)))
    # step 2 reuses v from step 1: h = 1, so v_hat = v / (1 - b2); by steps it would be v / (1 - b2^2)
    state = opt.state[params[0]]
    m_hat = state["exp_avg"] / (1 - 0.8**2)
    by_h = m_hat / ((state["exp_hessian_diag_sq"] / (1 - 0.95)).sqrt() + 1e-3)
    by_t = m_hat / ((state["exp_hessian_diag_sq"] / (1 - 0.95**2)).sqrt() + 1e-3)
    assert (by_h - by_t).abs().max() > 1e-3  # the two rules differ measurably here
    expected = reference_adahessian(_coupled_loss, params0, 2, **hyper)[-1][0]
    torch.testing.assert_close(params[0].detach(), expected, rtol=1e-12, atol=1e-14)


def test_equals_adamw_with_gradient_curvature(float64):
    """curvature='gradient', k=1: AdaHessian is AdamW step for step (weight decay, 3 groups)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 5), torch.randn(32, 1)

    def groups(net):
        return [
            {"params": net[0].parameters(), "lr": 0.01, "weight_decay": 0.1},
            {"params": net[2].parameters(), "lr": 0.003, "betas": (0.8, 0.99), "eps": 1e-6},
            {"params": net[4].parameters()},
        ]

    ada = hessopt.AdaHessian(groups(model), lr=0.02, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.01,
                             curvature="gradient", clip=None)
    adamw = torch.optim.AdamW(groups(twin), lr=0.02, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.01,
                              foreach=False)
    for _ in range(12):
        ada.step(_closure(ada, lambda: F.mse_loss(model(x), y)))
        adamw.step(_closure(adamw, lambda: F.mse_loss(twin(x), y)))
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert not ada.needs_hessian  # the gradient needs no graph


def test_one_step_on_separable_quadratic_is_newton(float64):
    """1/2 sum a_i (x_i - c_i)^2, betas (0, 0), lr 1, k 1, eps 0: one step lands on c exactly.

    With a diagonal Hessian, z * Hz = a * z^2 = a for Rademacher z, so D is exact.
    """
    a = [torch.tensor([0.5, 2.0, 30.0]), torch.tensor([[1.0, 4.0], [0.1, 8.0]])]
    c = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([[3.0, 0.0], [-1.0, 2.0]])]
    x = [torch.zeros(3, requires_grad=True), torch.ones(2, 2, requires_grad=True)]
    opt = hessopt.AdaHessian(x, lr=1.0, betas=(0.0, 0.0), eps=0.0, hessian_power=1.0, clip=None)

    def loss():
        return sum(0.5 * (ai * (xi - ci) ** 2).sum() for ai, xi, ci in zip(a, x, c))

    opt.step(_closure(opt, loss))
    for xi, ci in zip(x, c):
        torch.testing.assert_close(xi.detach(), ci, rtol=0, atol=1e-15)


def test_hutchinson_exact_for_diagonal_hessian(float64, dense_hessian):
    """A model whose Hessian is diagonal (elementwise): one Rademacher probe gives diag(H) exactly."""

    class Elementwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))
            self.b = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return F.softplus(self.w * x).sum() + torch.cosh(self.b).sum()

    torch.manual_seed(1)
    model, x = Elementwise(), torch.randn(4, 3)
    H = dense_hessian(model, lambda out: out, x)
    assert torch.count_nonzero(H - torch.diag(torch.diagonal(H))) == 0  # really diagonal
    params = list(model.parameters())
    grads = torch.autograd.grad(model(x), params, create_graph=True)
    est = Hutchinson(1)(params, grads, {torch.device("cpu"): torch.Generator().manual_seed(3)})
    torch.testing.assert_close(torch.cat([e.reshape(-1) for e in est]), torch.diagonal(H), rtol=1e-13, atol=0)
    # through the optimizer: betas (0, 0) leave v = D^2
    opt = hessopt.AdaHessian(params, betas=(0.0, 0.0))
    opt.step(_closure(opt, lambda: model(x)))
    v = torch.cat([opt.state[p]["exp_hessian_diag_sq"].reshape(-1) for p in params])
    torch.testing.assert_close(v.sqrt(), torch.diagonal(H).abs(), rtol=1e-13, atol=0)


def test_hutchinson_average_is_exact_expectation_over_all_signs(float64, monkeypatch):
    """n_samples = 2^n probes enumerating every sign vector: the mean is diag(H), exactly."""
    A = torch.tensor([[2.0, 1.0, -0.5, 0.3], [1.0, 3.0, 0.2, 0.0], [-0.5, 0.2, 1.0, 0.7], [0.3, 0.0, 0.7, 4.0]])
    signs = iter(torch.tensor([[1.0 if (k >> i) & 1 else -1.0 for i in range(4)] for k in range(16)]))
    monkeypatch.setattr("hessopt.optim.curvature.probe", lambda shape, *a, **k: next(signs).view(shape))
    x = torch.randn(4, requires_grad=True)
    grads = torch.autograd.grad(0.5 * x @ A @ x, [x], create_graph=True)
    est = Hutchinson(16)([x], grads, {x.device: torch.Generator()})[0]
    torch.testing.assert_close(est, torch.diagonal(A), rtol=0, atol=1e-15)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_n_samples_average_matches_manual_average(float64, distribution):
    """D of n_samples=4 equals the mean of 4 manual z * Hz drawn from the same generator stream."""
    torch.manual_seed(2)
    params = [torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    opt = hessopt.AdaHessian(params, betas=(0.0, 0.0), n_samples=4, seed=11, distribution=distribution)
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.func.hessian(lambda f: _coupled_loss([f[:3], f[3:].view(2, 2)]))(flat0)
    gen = torch.Generator().manual_seed(11)
    manual = torch.zeros(7)
    for _ in range(4):
        z = torch.cat([probe(p.shape, gen, dtype=torch.float64, distribution=distribution).reshape(-1)
                       for p in params])
        manual += z * (H @ z)
    manual /= 4
    opt.step(_closure(opt, lambda: _coupled_loss(params)))
    v = torch.cat([opt.state[p]["exp_hessian_diag_sq"].reshape(-1) for p in params])
    torch.testing.assert_close(v.sqrt(), manual.abs(), rtol=1e-12, atol=1e-15)


def test_exact_diagonal_curvature(float64, dense_hessian):
    """curvature='exact' feeds diag(H) of a dense-Hessian model into v."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    H = dense_hessian(model, lambda out: F.mse_loss(out, y), x)
    params = list(model.parameters())
    opt = hessopt.AdaHessian(params, betas=(0.0, 0.0), curvature="exact")
    opt.step(_closure(opt, lambda: F.mse_loss(model(x), y)))
    v = torch.cat([opt.state[p]["exp_hessian_diag_sq"].reshape(-1) for p in params])
    torch.testing.assert_close(v.sqrt(), torch.diagonal(H).abs(), rtol=1e-12, atol=1e-15)


def _mixed_problem(seed):
    """Tensors of every rank and two dtypes in two groups, with a coupled loss."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, 3, 3), (3, 2, 4), (4, 5), (5,), (), (2, 2, 2, 2, 2)]
    ps = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    ps.append(torch.randn(3, 4, generator=g).requires_grad_())  # a float32 tensor: its own foreach batch

    def loss():
        return _coupled_loss(ps[:-1]) + (F.softplus(ps[-1]).sum() * ps[0].sum()).double() * 0.1

    groups = [
        {"params": ps[:3], "lr": 0.02, "weight_decay": 0.05, "hessian_power": 0.7},
        {"params": ps[3:], "betas": (0.8, 0.9), "block_length": 2},
    ]
    return ps, groups, loss


def test_foreach_matches_for_loop():
    """The multi-tensor kernels give the for-loop result to 1e-15 (float64), mixed shapes, lazy updates."""
    runs = []
    for foreach in (False, True):
        ps, groups, loss = _mixed_problem(5)
        opt = hessopt.AdaHessian(groups, lr=0.05, update_each=2, n_samples=2, foreach=foreach)
        for _ in range(5):
            opt.step(_closure(opt, loss))
        runs.append(ps)
    for p, q in zip(*runs):
        atol = 1e-15 if p.dtype == torch.float64 else 1e-7
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


def test_converges_on_logistic_regression_to_lbfgs_optimum(float64):
    """Real data (scikit-learn digits, 3 vs 8), L2-regularised logistic regression."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    keep = (y == 3) | (y == 8)
    X, y = torch.tensor(X[keep] / 16.0), torch.tensor((y[keep] == 8).astype(float))

    def loss_fn(w, b):
        return F.binary_cross_entropy_with_logits(X @ w + b, y) + 5e-3 * (w @ w)

    w, b = torch.zeros(64, requires_grad=True), torch.zeros((), requires_grad=True)
    lbfgs = torch.optim.LBFGS([w, b], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                              line_search_fn="strong_wolfe")
    lbfgs.step(_closure(lbfgs, lambda: loss_fn(w, b)))
    f_star = loss_fn(w, b).item()
    w2, b2 = torch.zeros(64, requires_grad=True), torch.zeros((), requires_grad=True)
    opt = hessopt.AdaHessian([w2, b2], lr=1.0)
    gap0 = loss_fn(w2, b2).item() - f_star
    for _ in range(150):
        opt.step(_closure(opt, lambda: loss_fn(w2, b2)))
    gap = loss_fn(w2, b2).item() - f_star
    assert gap0 > 0.5 and 0 <= gap < 1e-3, (gap0, gap)


def test_converges_on_rosenbrock(float64):
    """From the classic start (-1.2, 1): f 24.2 -> below 1e-3, near the minimum (1, 1)."""
    p = torch.tensor([-1.2, 1.0], requires_grad=True)

    def rosenbrock():
        return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

    opt = hessopt.AdaHessian([p], lr=2.0)
    for _ in range(1500):
        opt.step(_closure(opt, rosenbrock))
    assert rosenbrock().item() < 1e-3
    assert (p.detach() - 1).abs().max() < 0.05
    assert math.isfinite(opt.state[p]["exp_hessian_diag_sq"].sum().item())
