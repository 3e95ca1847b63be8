"""Nothing lost under bad input: non-finite batches, interrupted steps, schedules that starve a
parameter, zero or overflowing curvature, and arguments that cannot work (both optimizers)."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import hessopt


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


OPTIMIZERS = {
    "adahessian": lambda ps: hessopt.AdaHessian(ps, lr=0.1, update_each=2),
    "adahessian_gnb": lambda ps: hessopt.AdaHessian(ps, lr=0.1, curvature="gnb"),
    "adahessian_fd": lambda ps: hessopt.AdaHessian(ps, lr=0.1, curvature="finite_difference"),
    "sophia_h": lambda ps: hessopt.Sophia(ps, lr=0.01, update_each=2, curvature="hutchinson"),
    "sophia_g": lambda ps: hessopt.Sophia(ps, lr=0.01, update_each=2, curvature="gnb"),
}


def _snapshot(model, opt):
    """Everything a step may change: parameters, the optimizer's state dict (moments, counters,
    generator states), as plain copies."""
    return copy.deepcopy({"params": [p.detach().clone() for p in model.parameters()], "opt": opt.state_dict()})


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


# -- 1. a non-finite loss or gradient never poisons the model ------------------------------------------

def _nan_batch(x):
    bad = x.clone()
    bad[3, 1] = float("nan")
    return bad


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nonfinite_batch_changes_nothing_and_the_next_good_batch_trains_normally(name):
    """good, NaN, good equals good, good bit for bit; the skip is counted and warned about."""
    x, y = _data()
    x2, y2 = _data(seed=2)
    runs = []
    for with_bad in (True, False):
        model = _mlp()
        opt = OPTIMIZERS[name](model.parameters())
        opt.step(_closure(opt, model, x, y))
        if with_bad:
            before = _snapshot(model, opt)
            with pytest.warns(RuntimeWarning, match="not finite.*changed nothing.*skipped"):
                loss = opt.step(_closure(opt, model, _nan_batch(x), y))
            assert not torch.isfinite(loss)
            after = _snapshot(model, opt)
            before["opt"]["param_groups"][0][opt._global_key]["skipped_steps"] += 1  # the only change: the count
            assert _equal(before, after)
            assert opt.skipped_steps == 1
        for _ in range(3):
            opt.step(_closure(opt, model, x2, y2))
        runs.append((model, opt))
    (a, oa), (b, ob) = runs
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    sa, sb = oa.state_dict(), ob.state_dict()
    sa["param_groups"][0][oa._global_key]["skipped_steps"] = 0
    assert _equal(sa, sb)


def _where_nan_loss(model, x, y):
    """A finite loss whose gradient is NaN (the classic torch.where trap)."""
    out = F.cross_entropy(model(x), y)
    w = model[0].weight
    trap = torch.where(torch.tensor(True), torch.zeros(()), torch.sqrt(-(w.abs().sum() + 1.0)))
    return out + trap


@pytest.mark.parametrize("form", ["closure", "explicit"])
def test_finite_loss_with_nan_gradient_is_skipped_in_both_forms(form):
    x, y = _data()
    model = _mlp()
    opt = hessopt.AdaHessian(model.parameters(), lr=0.1)
    before = _snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="gradient of this step is not finite"):
        if form == "closure":
            def closure():
                opt.zero_grad()
                loss = _where_nan_loss(model, x, y)
                loss.backward()
                return loss
            loss = opt.step(closure)
            assert torch.isfinite(loss)
        else:
            opt.zero_grad()
            _where_nan_loss(model, x, y).backward(create_graph=True)
            opt.step()
    after = _snapshot(model, opt)
    assert _equal(before["params"], after["params"]) and opt.state_dict()["state"] == {}
    assert opt.state["adahessian"]["step"] == 0 and opt.skipped_steps == 1
    opt.step(_closure(opt, model, x, y))  # trains normally afterwards
    assert opt.state["adahessian"]["step"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_raise_mode_raises_and_changes_nothing():
    x, y = _data()
    model = _mlp()
    opt = hessopt.Sophia(model.parameters(), nonfinite="raise")
    opt.step(_closure(opt, model, x, y))
    before = _snapshot(model, opt)
    with pytest.raises(hessopt.NonFiniteError, match="loss of this step is not finite.*nonfinite='skip'"):
        opt.step(_closure(opt, model, _nan_batch(x), y))
    assert _equal(before, _snapshot(model, opt)) and opt.skipped_steps == 0
    with pytest.raises(ValueError, match="nonfinite must be 'skip' or 'raise'"):
        hessopt.AdaHessian(model.parameters(), nonfinite="ignore")


def test_skip_warnings_thin_out():
    """Warned at the 1st, 2nd, 4th, 8th ... skip, each time with the count."""
    x, y = _data()
    model = _mlp()
    opt = hessopt.AdaHessian(model.parameters())
    counts = []
    for _ in range(9):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(_closure(opt, model, _nan_batch(x), y))
        counts.append(len(caught))
    assert counts == [1, 1, 0, 1, 0, 0, 0, 1, 0] and opt.skipped_steps == 9


# -- 2. a step is all or nothing -----------------------------------------------------------------------

class _RaiseOnCall(TorchFunctionMode):
    """Raise KeyboardInterrupt at the n-th torch function call."""

    def __init__(self, n):
        super().__init__()
        self.n, self.calls = n, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt(f"interrupted at call {self.n}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, foreach", [("adahessian", False), ("adahessian", True), ("sophia_g", True),
                                           ("adahessian_fd", False)])
def test_interrupt_at_every_point_leaves_before_or_after_never_a_mix(name, foreach):
    """A step interrupted at its n-th torch call, for every n: parameters, moments, counters and
    probe generators equal either the state before the step or after it."""
    x, y = _data()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = x.double()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}]
    opt = OPTIMIZERS[name](groups)
    opt.foreach = foreach
    opt.step(_closure(opt, model, x, y))  # state exists

    def fresh():
        m = copy.deepcopy(model)
        o = copy.deepcopy(opt)
        # the copy must optimize the copied model's parameters
        mapping = {id(p): q for p, q in zip(model.parameters(), m.parameters())}
        o2 = OPTIMIZERS[name]([{"params": [mapping[id(p)] for p in g["params"]], **{k: v for k, v in g.items() if k != "params"}}
                               for g in opt.param_groups])
        o2.foreach = foreach
        o2.load_state_dict(opt.state_dict())
        del o
        return m, o2

    m0, o0 = fresh()
    before = _snapshot(m0, o0)
    o0.step(_closure(o0, m0, x, y))
    after = _snapshot(m0, o0)
    assert not _equal(before, after)
    n, outcomes = 1, {"before": 0, "after": 0}
    while True:
        m, o = fresh()
        mode = _RaiseOnCall(n)
        try:
            with mode:
                o.step(_closure(o, m, x, y))
        except KeyboardInterrupt:
            pass
        finally:
            # the fault can also hit torch's own grad-mode switches (no_grad's exit): not hessopt's state
            torch.set_grad_enabled(True)
        state = _snapshot(m, o)
        if _equal(state, before):
            outcomes["before"] += 1
        elif _equal(state, after):
            outcomes["after"] += 1
        else:
            pytest.fail(f"interrupted at torch call {n}: the state is neither before nor after the step")
        if mode.calls < n:  # the step finished before the n-th call: every point has been tried
            break
        n += 1
    assert outcomes["before"] >= 10 and outcomes["after"] >= 1


def test_failed_step_rewinds_the_probe_generator_so_a_retry_equals_a_run_that_never_failed():
    x, y = _data()
    failing = [True]

    class Flaky(hessopt.Hutchinson):
        def estimate(self, inputs):
            result = super().estimate(inputs)  # draws the probes ...
            if failing[0]:
                failing[0] = False
                raise RuntimeError("the curvature pass failed (a fused kernel, say)")  # ... then fails
            return result

    runs = []
    for curvature in (Flaky(), hessopt.Hutchinson()):
        model = _mlp()
        opt = hessopt.AdaHessian(model.parameters(), curvature=curvature)
        if isinstance(curvature, Flaky):
            with pytest.raises(RuntimeError, match="curvature pass failed"):
                opt.step(_closure(opt, model, x, y))
        for _ in range(3):
            opt.step(_closure(opt, model, x, y))
        runs.append(model)
    assert all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), runs[1].parameters()))


def test_mismatched_state_dict_is_refused_before_anything_changes():
    x, y = _data()
    model = _mlp()
    opt = hessopt.AdaHessian(model.parameters())
    opt.step(_closure(opt, model, x, y))
    other = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3))  # same count, other shapes
    foreign = hessopt.AdaHessian(other.parameters())
    foreign.step(_closure(foreign, other, x, y))
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="has shape .* but the parameter has shape .*another model"):
        opt.load_state_dict(foreign.state_dict())
    assert _equal(before, _snapshot(model, opt))
    opt.step(_closure(opt, model, x, y))  # still usable


# -- 3. no update lost or exploded by the schedule or the curvature ----------------------------------

@pytest.mark.parametrize("make", [lambda ps: hessopt.AdaHessian(ps, lr=0.1, update_each=2),
                                  lambda ps: hessopt.Sophia(ps, lr=0.01, update_each=10, curvature="hutchinson")])
def test_parameters_seen_only_on_off_schedule_steps_are_updated(make):
    """Two heads trained on alternating steps: each head receives gradients only every other step."""
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 5), [nn.Linear(5, 3), nn.Linear(5, 3)]
    opt = make([*trunk.parameters(), *heads[0].parameters(), *heads[1].parameters()])
    x, y = _data()
    start = [h.weight.detach().clone() for h in heads]
    for step in range(12):
        head = heads[step % 2]
        opt.step(_closure(opt, lambda inp: head(torch.tanh(trunk(inp))), x, y))
    for h, s in zip(heads, start):
        assert opt.state[h.weight]["curvature_updates"] >= 1 and opt.state[h.weight]["step"] >= 4
        assert not torch.equal(h.weight, s)


def test_zero_curvature_parameter_takes_a_bounded_step_by_default():
    """L1 regression: the Hessian is exactly zero. The paper's rule (clip=None) steps by lr m / eps
    and explodes; the default clip bounds each coordinate's step by lr."""
    torch.manual_seed(0)
    X = torch.randn(64, 5)
    y = X @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1 * torch.randn(64)
    results = {}
    for clip in (1.0, None):
        model = nn.Linear(5, 1)
        opt = hessopt.AdaHessian(model.parameters(), clip=clip)  # the defaults otherwise
        loss0 = float((model(X).squeeze(1) - y).abs().mean())

        def closure():
            opt.zero_grad()
            loss = (model(X).squeeze(1) - y).abs().mean()
            loss.backward()
            return loss

        opt.step(closure)
        results[clip] = (loss0, float((model(X).squeeze(1) - y).abs().mean()))
    loss0, bounded = results[1.0]
    assert bounded < loss0 + 0.15 * 6  # at most lr per coordinate: 5 weights and a bias, |x| ~ 1
    assert results[None][1] > 100 * loss0  # the unbounded rule: lr * m / eps


def test_overflowing_curvature_keeps_the_moment_finite_counted_and_warned():
    w = nn.Parameter(torch.ones(3))
    opt = hessopt.AdaHessian([w], lr=0.01)

    def closure():
        opt.zero_grad()
        loss = (1e25 * w**2).sum() + (w**2).sum()  # z * Hz = 2e25: its square overflows float32
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="square overflows torch.float32.*curvature_overflows"):
        opt.step(closure)
    state = opt.state[w]
    assert torch.isfinite(state["exp_hessian_diag_sq"]).all() and state["curvature_overflows"] == 1
    assert torch.isfinite(w).all() and not torch.equal(w, torch.ones(3))


# -- 6. clear errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "lr must be a number or a one-element tensor"),
    (dict(eps=None), TypeError, "eps must be a real number, got NoneType"),
    (dict(eps="1e-4"), TypeError, "eps must be a real number, got str"),
    (dict(weight_decay="0.1"), TypeError, "weight_decay must be a real number"),
    (dict(betas=(0.9, "0.99")), TypeError, "betas must be two real numbers"),
    (dict(clip=0.0), ValueError, "clip must be positive or None"),
    (dict(foreach="yes"), TypeError, "foreach must be None or a bool"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        hessopt.AdaHessian(nn.Linear(2, 1).parameters(), **kwargs)


def test_a_one_element_tensor_lr_works():
    model = _mlp()
    opt = hessopt.AdaHessian(model.parameters(), lr=torch.tensor(0.1))
    opt.step(_closure(opt, model, *_data()))
    assert opt.state["adahessian"]["step"] == 1


def test_complex_and_sparse_layout_parameters_are_refused_up_front():
    with pytest.raises(TypeError, match="complex parameters.*view_as_real"):
        hessopt.AdaHessian([nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="dense \\(strided\\) parameters only"):
        hessopt.Sophia([nn.Parameter(torch.randn(3, 3).to_sparse())])
    opt = hessopt.AdaHessian([nn.Parameter(torch.randn(2))])
    with pytest.raises(TypeError, match="complex parameters"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1


def test_a_foreign_wrapper_of_autograd_backward_does_not_break_later_steps():
    """Other code wraps torch.autograd.backward during a closure (a profiler, a logging hook):
    every later step still works (it used to recurse forever)."""
    x, y = _data()
    model = _mlp()
    opt = hessopt.AdaHessian(model.parameters())
    original = torch.autograd.backward
    calls = []

    def closure():
        opt.zero_grad()
        inner = torch.autograd.backward
        if not calls:
            def foreign(*args, **kwargs):
                calls.append(1)
                return inner(*args, **kwargs)
            torch.autograd.backward = foreign
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    try:
        for _ in range(4):
            opt.step(closure)
        assert opt.state[model[0].weight]["curvature_updates"] == 4  # the graph was built every time
    finally:
        torch.autograd.backward = original  # the foreign code puts back what it saw first
    assert len(calls) >= 4
    opt.step(_closure(opt, model, x, y))  # and the graph is still built after that
    assert opt.state[model[0].weight]["curvature_updates"] == 5
