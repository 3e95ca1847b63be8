"""The three ways to drive AdaHessian (closure, explicit create_graph, AMP), lazy Hessian updates,
attention models, torch.compile, and the errors that say what to do (faults seen in peer AdaHessians: lazy
updates off by one, the AMP loss scale left in z*Hz, torch.compile's missing double backward).
"""
from __future__ import annotations

import io
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessopt
from hessopt.optim.adahessian import SecondOrderGraphError


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(dtype)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=dtype), torch.randn(16, 1, generator=g, dtype=dtype)


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _frozen_state(opt):
    """A deep, byte-level copy of the optimizer's state dict (later steps cannot change it)."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _assert_same_state(a, b, where="state_dict"):
    """Equal nested dicts / lists / tensors (the global entry in param_groups holds tensors)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)) and any(isinstance(x, (dict, list, tuple, torch.Tensor)) for x in a):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _explicit_step(opt, model, x, y, create_graph):
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward(create_graph=create_graph)
    opt.step()
    return loss


# -- closure vs explicit, lazy updates --------------------------------------------------------------

@pytest.mark.parametrize("update_each", [1, 3])
def test_closure_and_explicit_modes_give_identical_trajectories(update_each):
    x, y = _data()
    models = [_mlp() for _ in range(3)]
    opts = [hessopt.AdaHessian(m.parameters(), lr=0.05, update_each=update_each, weight_decay=0.01) for m in models]
    needs = []
    for _ in range(7):
        opts[0].step(_closure(opts[0], models[0], x, y))
        needs.append(opts[1].needs_hessian)
        _explicit_step(opts[1], models[1], x, y, create_graph=opts[1].needs_hessian)  # graph only when used
        _explicit_step(opts[2], models[2], x, y, create_graph=True)  # timm's loop: graph on every step
        for p, q, r in zip(*(m.parameters() for m in models)):
            assert torch.equal(p, q) and torch.equal(p, r)
    assert needs == [(t % update_each == 0) for t in range(7)]  # steps 1, 4, 7 for update_each=3
    p0 = next(models[0].parameters())
    assert opts[0].state[p0]["curvature_updates"] == len(range(0, 7, update_each))
    assert opts[0].state[p0]["step"] == 7


def test_closure_backward_builds_graph_only_on_hessian_steps():
    """The user's plain loss.backward() builds the graph on Hessian steps, under second_order_safe."""
    x, y = _data()
    model = _mlp()
    opt = hessopt.AdaHessian(model.parameters(), update_each=2)
    seen = []

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        seen.append((model[0].weight.grad.requires_grad,
                     F.scaled_dot_product_attention is not torch._C._nn.scaled_dot_product_attention))
        return loss

    backward = torch.autograd.backward
    for _ in range(4):
        loss = opt.step(closure)
        assert loss.grad_fn is None  # returned detached: it cannot keep the forward graph alive
    assert seen == [(True, True), (False, False), (True, True), (False, False)]
    assert torch.autograd.backward is backward  # restored

    def failing():
        opt.zero_grad()
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(failing)
    assert torch.autograd.backward is backward
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


def test_closure_graph_building_stays_in_its_thread():
    """While one thread's closure runs, another thread's plain backward stays a plain backward
    (no graph, no memory kept), and the original torch.autograd.backward is back afterwards."""
    import threading

    x, y = _data()
    model, other = _mlp(), _mlp()
    opt = hessopt.AdaHessian(model.parameters())
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def elsewhere():
        inside.wait(timeout=30)
        F.mse_loss(other(x), y).backward()  # runs while the closure below is still open
        seen["other"] = other[0].weight.grad.requires_grad
        done.set()

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        inside.set()
        assert done.wait(timeout=30)
        loss.backward()
        seen["closure"] = model[0].weight.grad.requires_grad
        return loss

    backward = torch.autograd.backward
    worker = threading.Thread(target=elsewhere)
    worker.start()
    opt.step(closure)
    worker.join(timeout=30)
    assert seen == {"other": False, "closure": True}
    assert torch.autograd.backward is backward


@pytest.mark.parametrize("call", [
    lambda loss, ps: loss.backward(retain_graph=True),
    lambda loss, ps: torch.autograd.backward([loss]),
    lambda loss, ps: torch.autograd.backward(loss, None, None, False),  # create_graph=False, positionally
    lambda loss, ps: loss.backward(inputs=ps),
], ids=["retain_graph", "autograd.backward", "positional_false", "inputs"])
def test_closure_backward_variants_all_build_the_graph(call):
    x, y = _data()
    model = _mlp()
    opt = hessopt.AdaHessian(model.parameters())
    graph = []

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        call(loss, list(model.parameters()))
        graph.append(all(p.grad.requires_grad for p in model.parameters()))
        return loss

    opt.step(closure)
    assert graph == [True] and opt.state[model[0].weight]["curvature_updates"] == 1


def test_parameter_without_hessian_is_not_stepped_until_its_first_estimate():
    """A tensor first used on a non-Hessian step waits (never divides by eps alone); the next step
    then brings a Hessian estimate even off the update_each schedule."""
    x, y = _data()
    model = _mlp()
    late = nn.Linear(4, 1).double()
    opt = hessopt.AdaHessian(list(model.parameters()) + list(late.parameters()), update_each=4)
    opt.step(_closure(opt, model, x, y))  # step 1: Hessian, `late` unused
    before = [p.detach().clone() for p in late.parameters()]

    def both():
        opt.zero_grad()
        loss = F.mse_loss(model(x) + late(x), y)
        loss.backward()
        return loss

    opt.step(both)  # step 2: no Hessian step; `late` has a gradient but no curvature yet
    assert all(torch.equal(p, b) for p, b in zip(late.parameters(), before))
    assert opt.state[late.weight]["curvature_updates"] == 0 and opt.state[late.weight]["step"] == 0
    assert opt.needs_hessian  # off schedule, because `late` has none
    opt.step(both)
    assert opt.state[late.weight]["curvature_updates"] == 1 and opt.state[late.weight]["step"] == 1
    assert not torch.equal(late.weight, before[0]) and torch.isfinite(late.weight).all()
    assert not opt.needs_hessian  # back on schedule (global step 3, next Hessian at 5)


def test_hessian_step_without_graph_raises_and_changes_nothing():
    x, y = _data()
    model = _mlp()
    opt = hessopt.AdaHessian(model.parameters(), update_each=2)
    opt.step(_closure(opt, model, x, y))
    opt.step(_closure(opt, model, x, y))
    assert opt.needs_hessian
    params = [p.detach().clone() for p in model.parameters()]
    state = _frozen_state(opt)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()  # no create_graph
    with pytest.raises(SecondOrderGraphError, match=r"create_graph=True.*closure"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    _assert_same_state(_frozen_state(opt), state)
    assert isinstance(SecondOrderGraphError("x"), ValueError)  # catchable as the validation error it is
    _explicit_step(opt, model, x, y, create_graph=True)  # and the run goes on
    assert opt.state[model[0].weight]["curvature_updates"] == 2


def test_parameter_that_stops_receiving_gradients_costs_at_most_update_each_minus_one_extra_hessian_steps():
    """`late` appears on a lazy step and is never used again: it waits for an estimate for
    update_each - 1 more steps (all curvature steps, so that a parameter used on every other step
    gets one), then the schedule holds instead of a Hessian on every step."""
    x, y = _data()
    model = _mlp()
    late = nn.Linear(4, 1).double()
    opt = hessopt.AdaHessian(list(model.parameters()) + list(late.parameters()), update_each=4)
    opt.step(_closure(opt, model, x, y))  # step 1: Hessian

    def both():
        opt.zero_grad()
        loss = F.mse_loss(model(x) + late(x), y)
        loss.backward()
        return loss

    opt.step(both)  # step 2: lazy; `late` gets state but no estimate
    assert opt.needs_hessian
    opt.step(_closure(opt, model, x, y))  # step 3: an extra Hessian step; `late` unused (no gradient)
    assert opt.state[late.weight]["curvature_updates"] == 0
    schedule = []
    for _ in range(6):  # steps 4..9: extra Hessian steps 4 and 6, then only the schedule (5 and 9)
        schedule.append(opt.needs_hessian)
        opt.step(_closure(opt, model, x, y))
    assert schedule == [True, True, True, False, False, True]


def test_closure_whose_loss_is_linear_in_every_parameter_gets_its_own_message():
    """The closure's backward built the graph, so "call create_graph=True" would be wrong advice."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 1).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    opt = hessopt.AdaHessian(lin.parameters())
    before = [p.detach().clone() for p in lin.parameters()]

    def closure():
        opt.zero_grad()
        loss = lin(x).mean()  # linear in weight and bias: the gradient does not depend on them
        loss.backward()
        return loss

    with pytest.raises(SecondOrderGraphError, match=r"create_graph=True, yet no gradient carries a graph.*"
                                                    r"linear in every parameter.*first-order optimizer"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(lin.parameters(), before))
    assert not opt.state[lin.weight] and opt.state["adahessian"]["step"] == 0
    assert all(p.grad is None or not p.grad.requires_grad for p in lin.parameters())


# -- AMP --------------------------------------------------------------------------------------------
# torch 2.14's torch.amp.GradScaler("cpu") works, so these tests use the real scaler (no emulation):
# it hands AdaHessian (_step_supports_amp_scaling = True) grad_scale and found_inf, and AdaHessian
# unscales gradient and z*Hz alike.

def _scaler_run(init_scale, steps=4, update_each=1):
    x, y = _data()
    model = _mlp()
    opt = hessopt.AdaHessian(model.parameters(), lr=0.05, update_each=update_each)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward(create_graph=opt.needs_hessian)
        scaler.step(opt)
        scaler.update()
    return model, opt


def test_grad_scaler_unscales_the_hessian_like_the_gradient():
    """Loss scale 1 and 1024 (and no scaler) give the same steps: z*Hz is unscaled too (peers leave the loss scale in it)."""
    x, y = _data()
    plain = _mlp()
    opt = hessopt.AdaHessian(plain.parameters(), lr=0.05)
    for _ in range(4):
        opt.step(_closure(opt, plain, x, y))
    (m1, o1), (m1024, o1024) = _scaler_run(1.0), _scaler_run(1024.0)
    for p, q, r in zip(plain.parameters(), m1.parameters(), m1024.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-14, atol=0)
        torch.testing.assert_close(r, p, rtol=1e-14, atol=0)
    w = m1024[0].weight
    torch.testing.assert_close(o1024.state[w]["exp_hessian_diag_sq"], opt.state[plain[0].weight]["exp_hessian_diag_sq"],
                               rtol=1e-13, atol=0)
    assert not hasattr(o1024, "grad_scale") and not hasattr(o1024, "found_inf")


def test_grad_scaler_overflow_step_is_skipped_without_touching_state():
    x, y = _data()
    model = _mlp()
    opt = hessopt.AdaHessian(model.parameters(), lr=0.05, update_each=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for factor in (1.0, 1.0):
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y) * factor).backward(create_graph=opt.needs_hessian)
        scaler.step(opt)
        scaler.update()
    assert opt.needs_hessian
    params, state = [p.detach().clone() for p in model.parameters()], _frozen_state(opt)
    opt.zero_grad()
    scaler.scale(F.mse_loss(model(x), y) * float("inf")).backward(create_graph=True)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # the scaler saw the overflow
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    _assert_same_state(_frozen_state(opt), state)
    assert opt.needs_hessian  # the skipped Hessian step is retried
    opt.zero_grad()
    scaler.scale(F.mse_loss(model(x), y)).backward(create_graph=True)
    scaler.step(opt)
    assert opt.state[model[0].weight]["curvature_updates"] == 2


def test_grad_scaler_unscale_before_hessian_step_raises_and_cleans_up():
    x, y = _data()
    model = _mlp()
    opt = hessopt.AdaHessian(model.parameters(), update_each=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    opt.zero_grad()
    scaler.scale(F.mse_loss(model(x), y)).backward(create_graph=True)
    scaler.unscale_(opt)
    with pytest.raises(ValueError, match=r"unscale_.*opt.needs_hessian"):
        scaler.step(opt)
    # GradScaler deletes these only after a successful step; stale ones would corrupt the next one
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert not opt.state[model[0].weight]
    # unscale_ is fine on steps without a Hessian (e.g. gradient clipping there)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward(create_graph=opt.needs_hessian)
        if not opt.needs_hessian:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    assert opt.state[model[0].weight]["step"] == 2


def test_bf16_autocast_trains_in_both_modes():
    x, y = _data(torch.float32)
    for mode in ("closure", "explicit"):
        model = _mlp(dtype=torch.float32)
        opt = hessopt.AdaHessian(model.parameters(), lr=0.05)
        losses = []
        for _ in range(15):
            opt.zero_grad()

            def closure():
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(x)
                assert out.dtype == torch.bfloat16
                loss = F.mse_loss(out.float(), y)
                loss.backward(create_graph=mode == "explicit")
                return loss

            if mode == "closure":
                losses.append(opt.step(closure).item())
            else:
                losses.append(closure().item())
                opt.step()
        assert losses[-1] < 0.8 * losses[0], (mode, losses)
        state = opt.state[model[0].weight]
        assert state["curvature_updates"] == 15 and torch.isfinite(state["exp_hessian_diag_sq"]).all()


# -- attention, compile -----------------------------------------------------------------------------

def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2)


def test_transformer_encoder_trains_in_closure_mode():
    """nn.TransformerEncoder with PyTorch's default attention kernels: no peer survives the HVP."""
    model = _encoder()
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(4, 5, 16, generator=g), torch.randn(4, 5, 16, generator=g)
    opt = hessopt.AdaHessian(model.parameters(), lr=0.02)
    losses = []
    for _ in range(12):
        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(s["curvature_updates"] == 12 for p, s in opt.state.items() if isinstance(p, torch.Tensor))


def test_explicit_mode_through_fused_attention_says_what_to_do():
    model = _encoder()
    x = torch.randn(2, 5, 16)
    opt = hessopt.AdaHessian(model.parameters())
    params = [p.detach().clone() for p in model.parameters()]
    model(x).pow(2).mean().backward(create_graph=True)
    with pytest.raises(RuntimeError, match=r"attention.*opt.step\(closure\).*second_order_safe"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.state["adahessian"]["step"] == 0 and len(opt.state) == 1
    opt.zero_grad()
    with hessopt.second_order_safe():  # the documented fix
        loss = model(x).pow(2).mean()
    loss.backward(create_graph=True)
    opt.step()
    assert opt.state["adahessian"]["step"] == 1


@pytest.mark.parametrize("mode", ["closure", "explicit"])
def test_compiled_model_raises_a_clear_error(mode):
    """torch.compile cannot differentiate twice (it has no double backward). aot_eager compiles in about a second;
    inductor on CPU (about 20 s here, checked by hand) fails the same way with the same message."""
    torch._dynamo.reset()
    model = _mlp(dtype=torch.float32)
    compiled = torch.compile(model, backend="aot_eager")
    x, y = _data(torch.float32)
    opt = hessopt.AdaHessian(model.parameters())
    params = [p.detach().clone() for p in model.parameters()]
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"torch.compile.*double backward.*uncompiled"):
        if mode == "closure":
            opt.step(_closure(opt, compiled, x, y))
        else:
            _explicit_step(opt, compiled, x, y, create_graph=True)
    assert time.perf_counter() - start < 20
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is None or not p.grad.requires_grad for p in model.parameters())
    assert opt.state["adahessian"]["step"] == 0 and len(opt.state) == 1
