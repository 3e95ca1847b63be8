"""hessopt.Sophia against oracles, in float64: a reference loop written from the formula, the clip
bound, the Newton step on a separable quadratic, the three driving forms, resume and copies."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessopt
from hessopt.probes import probe


def _closure(opt, loss_fn):
    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss
    return closure


def _coupled_loss(params):
    total = sum(F.softplus(p * (k + 1) * 0.7).sum() + 0.25 * (p**4).sum() for k, p in enumerate(params))
    mix = sum(torch.tanh(p).sum() * (0.3 + 0.1 * k) for k, p in enumerate(params))
    return total + 0.5 * mix**2


def reference_sophia(loss_fn, params0, steps, *, lr, betas, rho, eps, weight_decay, update_each, seed,
                     bias_correction):
    """Sophia-H written out from the formula: dense Hessian, the optimizer's probe stream."""
    b1, b2 = betas
    params = [p.detach().clone() for p in params0]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    n = 0
    out = []
    for t in range(1, steps + 1):
        flat = torch.cat([p.reshape(-1) for p in params])

        def f(x):
            return loss_fn([c.view(s) for c, s in zip(x.split(sizes), shapes)])

        g = [c.view(s) for c, s in zip(torch.func.grad(f)(flat).split(sizes), shapes)]
        if (t - 1) % update_each == 0:
            H = torch.func.hessian(f)(flat)
            z = torch.cat([probe(s, gen, dtype=flat.dtype).reshape(-1) for s in shapes])
            hhat = [c.view(s) for c, s in zip((z * (H @ z)).split(sizes), shapes)]
            h = [b2 * hi + (1 - b2) * d for hi, d in zip(h, hhat)]
            n += 1
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        c1 = 1 - b1**t if bias_correction else 1.0
        c2 = 1 - b2**n if bias_correction else 1.0
        params = [p - lr * torch.clamp((mi / c1) / torch.clamp(rho * hi / c2, min=eps), -1, 1) - lr * weight_decay * p
                  for p, mi, hi in zip(params, m, h)]
        out.append([p.clone() for p in params])
    return out


@pytest.mark.parametrize("update_each, bias_correction, weight_decay", [(1, True, 0.0), (3, False, 0.1), (2, True, 0.2)])
@pytest.mark.parametrize("foreach", [False, True])
def test_sophia_h_matches_reference_loop(float64, update_each, bias_correction, weight_decay, foreach):
    torch.manual_seed(0)
    params0 = [torch.randn(3), torch.randn(2, 2), torch.randn(())]
    params = [p.clone().requires_grad_() for p in params0]
    hyper = dict(lr=0.05, betas=(0.9, 0.95), rho=0.5, eps=1e-12, weight_decay=weight_decay, update_each=update_each,
                 seed=7, bias_correction=bias_correction)
    opt = hessopt.Sophia(params, curvature="hutchinson", foreach=foreach, **hyper)
    expected = reference_sophia(_coupled_loss, params0, 7, **hyper)
    for step, want in enumerate(expected):
        opt.step(_closure(opt, lambda: _coupled_loss(params)))
        for p, w in zip(params, want):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14, msg=f"step {step + 1}")


def test_clipping_bounds_every_coordinate_by_lr(float64):
    """Huge gradients, tiny or zero or negative curvature: no coordinate moves by more than lr (+ decay)."""
    w = torch.zeros(6, requires_grad=True)
    a = torch.tensor([1e-9, 0.0, -3.0, 1.0, 1e3, 1e-3])  # curvature per coordinate
    c = torch.tensor([1e6, -1e6, 5.0, 1e-3, 2.0, -7.0])
    lr = 0.01
    opt = hessopt.Sophia([w], lr=lr, rho=0.04, weight_decay=0.0, update_each=1, curvature="exact")
    for _ in range(5):
        before = w.detach().clone()
        opt.step(_closure(opt, lambda: (0.5 * a * (w - c) ** 2).sum() + ((w - c).abs() * (a == 0)).sum()))
        assert ((w.detach() - before).abs() <= lr * (1 + 1e-12)).all()
        assert torch.isfinite(w).all()


def test_newton_step_on_separable_quadratic_until_the_clip_binds(float64):
    """1/2 sum a_i (x_i - c_i)^2 with exact curvature, betas (0, 0), lr = rho: the step is
    (c - x) where |c - x| * ... <= 1, i.e. the Newton step; clipped to lr * sign where it is larger."""
    a = torch.tensor([0.5, 2.0, 30.0, 4.0])
    c = torch.tensor([0.01, -0.02, 0.003, 5.0])  # the last one is too far: the clip binds
    x = torch.zeros(4, requires_grad=True)
    rho = 0.5
    opt = hessopt.Sophia([x], lr=rho, betas=(0.0, 0.0), rho=rho, weight_decay=0.0, update_each=1, curvature="exact")
    opt.step(_closure(opt, lambda: (0.5 * a * (x - c) ** 2).sum()))
    newton = c.clone()
    newton[3] = rho * 1.0  # clip(m / (rho h), 1) = 1: a step of lr
    torch.testing.assert_close(x.detach(), newton, rtol=0, atol=1e-15)


def test_gnb_sophia_trains_a_classifier_in_the_plain_closure(float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = hessopt.Sophia(model.parameters(), lr=0.02, update_each=5)
    losses = [float(opt.step(_closure(opt, lambda: F.cross_entropy(model(x), y)))) for _ in range(60)]
    assert losses[-1] < 0.6 * losses[0]
    state = opt.state[model[0].weight]
    assert state["curvature_updates"] == 12 and (state["hessian"] >= 0).all()  # GNB is non-negative


def test_off_steps_run_the_closure_plainly():
    """needs_curvature is False on the k-1 other steps: no graph is built or kept there."""
    model = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    opt = hessopt.Sophia(model.parameters(), update_each=3, curvature="hutchinson")
    seen = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seen.append(model.weight.grad.requires_grad)
        return loss

    due = []
    for _ in range(6):
        due.append(opt.needs_curvature)
        opt.step(closure)
    assert due == [True, False, False, True, False, False] and seen == due


def test_explicit_and_closure_forms_agree(float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    a = hessopt.Sophia(model.parameters(), lr=0.01, update_each=2, curvature="hutchinson")
    b = hessopt.Sophia(twin.parameters(), lr=0.01, update_each=2, curvature="hutchinson")
    for _ in range(5):
        a.step(_closure(a, lambda: F.mse_loss(model(x), y)))
        b.zero_grad()
        F.mse_loss(twin(x), y).backward(create_graph=b.needs_hessian)
        b.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_grad_scaler_form_equals_unscaled(float64):
    """fp16-style loss scaling (GradScaler on CPU): the curvature is unscaled with the gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    a = hessopt.Sophia(model.parameters(), lr=0.01, update_each=2, curvature="hutchinson")
    b = hessopt.Sophia(twin.parameters(), lr=0.01, update_each=2, curvature="hutchinson")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(4):
        a.step(_closure(a, lambda: F.mse_loss(model(x), y)))
        b.zero_grad()
        scaler.scale(F.mse_loss(twin(x), y)).backward(create_graph=b.needs_hessian)
        scaler.step(b)
        scaler.update()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["gnb", "hutchinson"])
def test_resume_is_bit_identical(curvature):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = hessopt.Sophia(model.parameters(), lr=0.01, update_each=3, curvature=curvature, seed=3)

    def run(o, m, n):
        for _ in range(n):
            o.step(_closure(o, lambda: F.cross_entropy(m(x), y)))

    run(opt, model, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(opt, model, 5)
    buf.seek(0)
    saved = torch.load(buf)
    model2 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model2.load_state_dict(saved["model"])
    opt2 = hessopt.Sophia(model2.parameters(), lr=0.01, update_each=3, curvature=curvature, seed=99)
    opt2.load_state_dict(saved["opt"])
    run(opt2, model2, 5)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="not saved by hessopt.Sophia"):
        hessopt.Sophia(model2.parameters()).load_state_dict(hessopt.AdaHessian(model2.parameters()).state_dict())


def test_copies_keep_every_option_and_their_own_probe_stream():
    import pickle

    model = nn.Linear(3, 2)
    opt = hessopt.Sophia(model.parameters(), update_each=4, curvature="hutchinson", bias_correction=False,
                         nonfinite="raise", seed=11)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.update_each, clone.bias_correction, clone.nonfinite, clone.seed) == (4, False, "raise", 11)
        assert repr(clone.curvature) == repr(opt.curvature)


def test_presets_and_arguments():
    model = nn.Linear(3, 2)
    g = hessopt.Sophia.from_preset(model.parameters(), "sophia-g", lr=1e-3)
    assert g.update_each == 10 and type(g.curvature).__name__ == "GaussNewtonBartlett"
    assert g.param_groups[0]["rho"] == 0.05 and g.param_groups[0]["lr"] == 1e-3
    h = hessopt.Sophia.from_preset(model.parameters(), "sophia-h")
    assert type(h.curvature).__name__ == "Hutchinson" and h.is_second_order and not g.is_second_order
    with pytest.raises(ValueError, match="preset must be one of"):
        hessopt.Sophia.from_preset(model.parameters(), "sophia-x")
    with pytest.raises(ValueError, match="rho must be positive"):
        hessopt.Sophia(model.parameters(), rho=0.0)
    with pytest.raises(ValueError, match="eps must be positive"):
        hessopt.Sophia(model.parameters(), eps=0.0)
    with pytest.raises(TypeError, match="bias_correction must be a bool"):
        hessopt.Sophia(model.parameters(), bias_correction="yes")


@pytest.mark.parametrize("curvature", ["gnb", "hutchinson"])
def test_capture_block_is_the_explicit_form_of_every_source(float64, curvature):
    """`with opt.capture(): forward; backward` then opt.step() equals the closure form bit for bit,
    with and without GradScaler-style loss scaling."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    twins = [copy.deepcopy(model), copy.deepcopy(model)]
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    make = lambda ps: hessopt.Sophia(ps, lr=0.01, update_each=2, curvature=curvature)  # noqa: E731
    a, b, c = make(model.parameters()), make(twins[0].parameters()), make(twins[1].parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for _ in range(5):
        a.step(_closure(a, lambda: F.cross_entropy(model(x), y)))
        b.zero_grad()
        with b.capture():
            F.cross_entropy(twins[0](x), y).backward()
        b.step()
        c.zero_grad()
        with c.capture():
            scaler.scale(F.cross_entropy(twins[1](x), y)).backward()
        scaler.step(c)
        scaler.update()
    for p, q, r in zip(model.parameters(), *[t.parameters() for t in twins]):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)


def test_gnb_without_closure_or_capture_says_how():
    model = nn.Linear(3, 2)
    opt = hessopt.Sophia(model.parameters())
    F.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    with pytest.raises(ValueError, match="needs the closure.*opt.capture"):
        opt.step()
