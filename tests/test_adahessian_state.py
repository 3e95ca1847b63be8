"""State, resume, memory and robustness of AdaHessian (peers keep the Hessian on the Parameter,
outside state_dict, and leave backward(create_graph=True)'s parameter <-> grad reference cycle), and every
validation error with its message.
"""
from __future__ import annotations

import io
import re
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessopt
from hessopt.optim.adahessian import SecondOrderGraphError
from hessopt.optim.curvature import ExactDiagonal


class _Reshape(nn.Module):
    def forward(self, x):
        return x.unsqueeze(1)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), _Reshape(), nn.Conv1d(1, 2, 3), nn.Flatten(),
                         nn.Linear(8, 1)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64)


def _run(opt, model, steps):
    x, y = _data()
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


# -- state layout and resume ------------------------------------------------------------------------

def test_state_lives_in_optimizer_state_with_snake_case_keys():
    model = _model()
    attrs = {id(p): set(vars(p)) for p in model.parameters()}
    opt = hessopt.AdaHessian(model.parameters(), update_each=2)
    _run(opt, model, 3)
    snake = re.compile(r"^[a-z][a-z0-9_]*$")
    for key, state in opt.state.items():
        if isinstance(key, torch.Tensor):
            assert set(state) == {"step", "curvature_updates", "nonfinite_curvature", "curvature_overflows", "exp_avg", "exp_hessian_diag_sq"}
            assert state["step"] == 3 and state["curvature_updates"] == 2
        else:
            assert key == "adahessian"
        assert all(snake.match(k) for k in state)
    assert all(set(vars(p)) == attrs[id(p)] for p in model.parameters())  # nothing stored on the Parameter
    sd = opt.state_dict()
    assert all(isinstance(k, int) for k in sd["state"])  # parameter indices only, as torch's own
    saved = sd["param_groups"][0]["adahessian"]
    assert saved["step"] == 3 and saved["seed"] == 0 and set(saved["generator_states"]) == {"cpu"}


@pytest.mark.parametrize("split", [0, 3])
def test_resume_is_bit_identical_even_into_an_optimizer_with_another_seed(split):
    """6 uninterrupted steps == `split` steps, save (torch.save), load into a fresh optimizer built
    with seed=123, 6 - split more steps. split=0 saves before any probe was drawn."""
    hyper = dict(lr=0.05, update_each=2, n_samples=2, weight_decay=0.01, seed=5)
    full_model = _model()
    full = hessopt.AdaHessian(full_model.parameters(), **hyper)
    _run(full, full_model, 6)

    first_model = _model()
    first = hessopt.AdaHessian(first_model.parameters(), **hyper)
    _run(first, first_model, split)
    checkpoint = _roundtrip({"model": first_model.state_dict(), "opt": first.state_dict()})

    resumed_model = _model(seed=99)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = hessopt.AdaHessian(resumed_model.parameters(), **{**hyper, "seed": 123})
    resumed.load_state_dict(checkpoint["opt"])
    assert resumed.seed == 5
    _run(resumed, resumed_model, 6 - split)
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    a, b = full.state_dict(), resumed.state_dict()
    for k in a["state"]:
        for name, value in a["state"][k].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b["state"][k][name]), (k, name)
    assert torch.equal(a["param_groups"][0]["adahessian"]["generator_states"]["cpu"],
                       b["param_groups"][0]["adahessian"]["generator_states"]["cpu"])


def test_resume_through_torch_distributed_checkpoint_state_dict_api():
    """torch.distributed.checkpoint's get/set_optimizer_state_dict (the FSDP2 / DCP path) map every
    ``state`` key to a parameter name: the optimizer-wide entry must not be there, and a run resumed
    through them is bit-identical."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    hyper = dict(lr=0.05, update_each=2, seed=5)
    full_model = _model()
    full = hessopt.AdaHessian(full_model.parameters(), **hyper)
    _run(full, full_model, 5)

    first_model = _model()
    first = hessopt.AdaHessian(first_model.parameters(), **hyper)
    _run(first, first_model, 3)
    saved = _roundtrip({"model": first_model.state_dict(), "opt": get_optimizer_state_dict(first_model, first)})
    assert set(saved["opt"]["state"]) == {name for name, _ in first_model.named_parameters()}

    resumed_model = _model(seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = hessopt.AdaHessian(resumed_model.parameters(), **{**hyper, "seed": 123})
    set_optimizer_state_dict(resumed_model, resumed, saved["opt"])
    assert resumed.seed == 5 and resumed.state["adahessian"]["step"] == 3
    assert "adahessian" not in resumed.param_groups[0]  # the entry is not left behind as a hyper-parameter
    _run(resumed, resumed_model, 2)
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_state_dict_without_the_optimizer_entry_is_refused_and_changes_nothing():
    """A state dict of another optimizer (or of hessopt 0.1.0, whose entry lived in ``state``) is
    refused before anything is loaded."""
    model = _model()
    opt = hessopt.AdaHessian(model.parameters(), seed=4)
    _run(opt, model, 2)
    new = opt.state_dict()
    old = {"state": {**new["state"], "adahessian": new["param_groups"][0]["adahessian"]},
           "param_groups": [{k: v for k, v in g.items() if k != "adahessian"} for g in new["param_groups"]]}
    fresh = hessopt.AdaHessian(_model().parameters())
    with pytest.raises(ValueError, match="not saved by hessopt.AdaHessian"):
        fresh.load_state_dict(old)
    with pytest.raises(ValueError, match="not saved by hessopt.AdaHessian"):
        fresh.load_state_dict(torch.optim.AdamW(_model().parameters()).state_dict())
    assert fresh.state["adahessian"]["step"] == 0 and len(fresh.state) == 1


def test_state_dict_global_entry_is_a_snapshot_and_not_shared():
    model = _model()
    opt = hessopt.AdaHessian(model.parameters())
    _run(opt, model, 2)
    saved = opt.state_dict()
    _run(opt, model, 1)
    assert saved["param_groups"][0]["adahessian"]["step"] == 2  # not moved by later steps
    twins = []
    for _ in range(2):
        m = _model()
        o = hessopt.AdaHessian(m.parameters())
        o.load_state_dict(saved)
        twins.append((o, m))
    _run(twins[0][0], twins[0][1], 1)
    assert twins[0][0].state["adahessian"]["step"] == 3
    assert twins[1][0].state["adahessian"]["step"] == 2  # the two loads do not share a counter
    assert saved["param_groups"][0]["adahessian"]["step"] == 2


def test_deepcopy_and_pickle_continue_the_same_run():
    """torch's Optimizer.__getstate__ keeps only defaults/state/param_groups: a copy of AdaHessian
    must also keep its options and probe streams, and then run on independently."""
    import copy

    model = _model()
    opt = hessopt.AdaHessian(model.parameters(), update_each=2, n_samples=2, seed=3)
    _run(opt, model, 3)
    copied_model, copied = copy.deepcopy((model, opt))
    pickled_model, pickled = _roundtrip_any((model, opt))
    for m, o in ((model, opt), (copied_model, copied), (pickled_model, pickled)):
        _run(o, m, 3)
    for p, q, r in zip(model.parameters(), copied_model.parameters(), pickled_model.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert copied.update_each == 2 and copied.seed == 3 and copied.state["adahessian"]["step"] == 6
    assert copied.state["adahessian"] is not opt.state["adahessian"]


def _roundtrip_any(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_load_state_dict_of_another_optimizer_raises():
    model = _model()
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="not saved by hessopt.AdaHessian"):
        hessopt.AdaHessian(model.parameters()).load_state_dict(adam.state_dict())


# -- graphs and memory ------------------------------------------------------------------------------

class _GraphTracer(nn.Module):
    """Identity layer whose autograd node carries a marker object: a weak reference to the marker
    dies exactly when the graph through this layer is freed. (saved_tensors_hooks cannot do this:
    a pack hook that keeps a node's own output creates a reference cycle of its own.)"""

    class _Marker:
        pass

    def __init__(self):
        super().__init__()
        self.refs = []
        tracer = self

        class Identity(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.marker = _GraphTracer._Marker()
                tracer.refs.append(weakref.ref(ctx.marker))
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                return grad * 1.0  # differentiable: the layer is transparent to the HVP

        self.fn = Identity

    def forward(self, x):
        return self.fn.apply(x)

    def alive(self):
        return sum(r() is not None for r in self.refs)


def _traced_model(tracer):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), tracer, nn.Linear(6, 1)).double()


def _explicit_steps(opt, model, tracer, steps):
    """timm-style explicit loop, create_graph on every step; graphs alive after each step."""
    x, y = _data()
    alive, grad_refs = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward(create_graph=True)
        grad_refs.append(weakref.ref(model[0].weight.grad))
        opt.step()
        del loss
        alive.append(tracer.alive())
    return alive, grad_refs


def test_no_gradient_keeps_its_graph():
    """update_each=4 with create_graph on every step: the graphs of non-Hessian steps are never
    consumed by an HVP; only the optimizer's detaching of p.grad frees them (PyTorch warns of the reference cycle)."""
    tracer = _GraphTracer()
    model = _traced_model(tracer)
    opt = hessopt.AdaHessian(model.parameters(), update_each=4)
    alive, grad_refs = _explicit_steps(opt, model, tracer, 8)
    assert alive == [0] * 8, alive
    assert all(r() is None for r in grad_refs)  # the graph-carrying gradients died (no gc needed)
    for p in model.parameters():
        assert p.grad.grad_fn is None and not p.grad.requires_grad
    x, y = _data()

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        loss = opt.step(closure)  # returned detached: holding it keeps no graph
        assert loss.grad_fn is None and tracer.alive() == 0


@pytest.mark.parametrize("release", [True, False])
def test_memory_does_not_grow_and_the_check_can_fail(release):
    """Train-and-drop many models: with the release nothing survives; without it (the peers' bug)
    each model stays alive in a parameter<->gradient reference cycle that gc cannot collect."""
    import gc

    tracer = _GraphTracer()
    x, y = _data()
    for _ in range(6):
        model = _traced_model(tracer)
        opt = hessopt.AdaHessian(model.parameters(), update_each=4)
        if not release:
            opt._release_graphs = lambda: None
        for _ in range(2):  # a Hessian step and a plain one
            opt.zero_grad()
            F.mse_loss(model(x), y).backward(create_graph=True)
            opt.step()
        del model, opt
    gc.collect()
    assert tracer.alive() == (0 if release else 6)


# -- what gets stepped ------------------------------------------------------------------------------

class _ConvNet(nn.Module):
    """Conv1d and Conv3d kernels, an unused layer and a frozen (but used) layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 3, 3)
        self.conv3 = nn.Conv3d(1, 2, (2, 3, 2))
        self.unused = nn.Linear(3, 3)
        self.frozen = nn.Conv1d(3, 3, 1)
        self.frozen.requires_grad_(False)

    def forward(self, x1, x3):
        return torch.tanh(self.frozen(self.conv1(x1))).pow(2).mean() + torch.tanh(self.conv3(x3)).pow(2).mean()


@pytest.mark.parametrize("mode", ["closure", "explicit"])
def test_unused_and_frozen_parameters_are_skipped(mode):
    torch.manual_seed(0)
    net = _ConvNet().double()
    x1, x3 = torch.randn(2, 2, 6), torch.randn(2, 1, 4, 5, 4)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = hessopt.AdaHessian(net.parameters(), lr=0.01)
    for _ in range(3):
        if mode == "closure":
            def closure():
                opt.zero_grad()
                loss = net(x1.double(), x3.double())
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.zero_grad()
            net(x1.double(), x3.double()).backward(create_graph=True)
            opt.step()
    for name, p in net.named_parameters():
        changed = not torch.equal(p, before[name])
        skipped = name.startswith(("unused", "frozen"))
        assert changed != skipped, name
        assert (p in opt.state) != skipped, name
    for conv in (net.conv1, net.conv3):  # kernel-averaged curvature: constant over kernel positions
        v = opt.state[conv.weight]["exp_hessian_diag_sq"]
        assert torch.equal(v, v.flatten(2)[..., :1].reshape(v.shape[:2] + (1,) * (v.dim() - 2)).expand_as(v))


def test_sparse_gradients_raise():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = hessopt.AdaHessian(emb.parameters())
    emb(torch.tensor([1, 2])).pow(2).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"sparse gradients.*sparse=False"):
        opt.step()
    assert torch.equal(emb.weight, before) and emb.weight not in opt.state


def test_nonfinite_hessian_estimate_is_skipped_counted_and_warned_once():
    model = _model()
    params = list(model.parameters())
    bad = {1: {0}, 2: {0, 2}}  # step -> indices of parameters whose estimate is NaN/inf
    calls = []

    def curvature(ps, grads, generators):
        step = len(calls)
        calls.append(step)
        out = [torch.ones_like(p) for p in ps]
        for i in bad.get(step, ()):
            out[i] = out[i] * float("nan") if i == 0 else out[i] * float("inf")
        return out

    curvature.needs_graph = False
    opt = hessopt.AdaHessian(params, curvature=curvature)
    _run(opt, model, 1)
    v0 = [opt.state[p]["exp_hessian_diag_sq"].clone() for p in params]
    with pytest.warns(RuntimeWarning, match=r"not finite.*nonfinite_curvature.*once"):
        _run(opt, model, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second bad step does not warn again
        _run(opt, model, 1)
    assert opt.state[params[0]]["nonfinite_curvature"] == 2
    assert opt.state[params[2]]["nonfinite_curvature"] == 1
    assert opt.state[params[1]]["nonfinite_curvature"] == 0
    assert opt.state[params[0]]["curvature_updates"] == 1 and opt.state[params[1]]["curvature_updates"] == 3
    assert torch.equal(opt.state[params[0]]["exp_hessian_diag_sq"], v0[0])  # untouched by NaN
    assert all(torch.isfinite(p).all() for p in params)
    assert all(opt.state[p]["step"] == 3 for p in params)  # a skip still steps with the old v


def test_nonfinite_first_estimate_holds_the_parameter_until_a_finite_one():
    model = _model()
    params = list(model.parameters())
    first = [True]

    def curvature(ps, grads, generators):
        out = [torch.ones_like(p) for p in ps]
        if first[0]:
            out[0] = out[0] * float("nan")
            first[0] = False
        return out

    curvature.needs_graph = False
    opt = hessopt.AdaHessian(params, curvature=curvature, update_each=5)
    before = params[0].detach().clone()
    with pytest.warns(RuntimeWarning):
        _run(opt, model, 1)
    assert torch.equal(params[0], before) and opt.state[params[0]]["step"] == 0
    assert not torch.equal(params[1], _model().state_dict()["0.bias"])  # the others moved
    assert opt._curvature_due()  # off schedule: params[0] still has no estimate
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # the pending flag survives a resume
    fresh = hessopt.AdaHessian(params, curvature=curvature, update_each=5)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    assert fresh._curvature_due()
    _run(opt, model, 1)
    assert opt.state[params[0]]["curvature_updates"] == 1 and not torch.equal(params[0], before)
    assert not opt._curvature_due()  # every parameter has an estimate: back on schedule


def test_param_groups_keep_their_own_hyperparameters():
    model = _model()
    groups = [{"params": model[0].parameters(), "lr": 0.0},
              {"params": model[3].parameters(), "weight_decay": 0.5, "hessian_power": 0.5},
              {"params": model[5].parameters()}]
    opt = hessopt.AdaHessian(groups, lr=0.1)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    _run(opt, model, 2)
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))  # lr 0
    assert [g["hessian_power"] for g in opt.param_groups] == [1.0, 0.5, 1.0]
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "betas": (0.5, 0.6)})
    assert opt.param_groups[-1]["betas"] == (0.5, 0.6) and opt.param_groups[-1]["lr"] == 0.1


def test_tensor_learning_rate_is_accepted():
    model = _model()
    opt = hessopt.AdaHessian(model.parameters(), lr=torch.tensor(0.05))
    _run(opt, model, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- validation errors ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(lr=-0.1), ValueError, "lr must be a non-negative number"),
        (dict(lr=float("nan")), ValueError, "lr must be a non-negative number"),
        (dict(betas=(0.9, 1.0)), ValueError, r"betas must be two numbers in \[0, 1\)"),
        (dict(betas=(0.9,)), ValueError, r"betas must be two numbers"),
        (dict(eps=-1e-8), ValueError, "eps must be a non-negative number"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay must be a non-negative number"),
        (dict(hessian_power=1.5), ValueError, r"hessian_power must be in \[0, 1\]"),
        (dict(averaging="spatial"), ValueError, "averaging must be one of"),
        (dict(block_length=0), ValueError, "block_length must be None or a positive int"),
        (dict(block_length=2.0), ValueError, "block_length must be None or a positive int"),
        (dict(update_each=0), ValueError, "update_each must be a positive int"),
        (dict(update_each=True), ValueError, "update_each must be a positive int"),
        (dict(n_samples=0), ValueError, "n_samples must be a positive int"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(distribution="uniform"), ValueError, "distribution must be one of"),
        (dict(curvature="diagonal"), ValueError, r"curvature must be None, one of \('hutchinson'"),
        (dict(curvature=3), TypeError, "curvature must be None, one of .* or a callable"),
    ],
)
def test_invalid_arguments_raise_with_a_message(kwargs, error, match):
    with pytest.raises(error, match=match):
        hessopt.AdaHessian(_model().parameters(), **kwargs)


def test_invalid_group_values_raise_in_constructor_and_add_param_group():
    model = _model()
    with pytest.raises(ValueError, match="hessian_power must be in"):
        hessopt.AdaHessian([{"params": model[0].parameters(), "hessian_power": -1.0}])
    opt = hessopt.AdaHessian(model[0].parameters())
    with pytest.raises(ValueError, match="averaging must be one of"):
        opt.add_param_group({"params": model[3].parameters(), "averaging": "blocks"})
    assert len(opt.param_groups) == 1  # the bad group was not added


def test_curvature_source_errors():
    model = _model()
    opt = hessopt.AdaHessian(model.parameters(), curvature=lambda ps, gs, gens: [torch.ones(1)])
    with pytest.raises(ValueError, match=r"returned 1 tensors for 6 parameters"):
        _run(opt, model, 1)
    opt = hessopt.AdaHessian(model.parameters(), curvature=ExactDiagonal(max_entries=10))
    with pytest.raises(ValueError, match=r"one HVP per entry.*max_entries=10.*curvature='hutchinson'"):
        _run(opt, model, 1)
    assert all(not s for p, s in opt.state.items() if isinstance(p, torch.Tensor))


def test_missing_graph_error_type():
    model = _model()
    opt = hessopt.AdaHessian(model.parameters())
    x, y = _data()
    F.mse_loss(model(x), y).backward()
    with pytest.raises(SecondOrderGraphError, match=r"create_graph=True.*opt.step\(closure\).*linear in every parameter"):
        opt.step()


def test_curvature_source_constructor_errors():
    from hessopt.optim.curvature import Hutchinson, make_curvature

    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        Hutchinson(0)
    with pytest.raises(ValueError, match=r"distribution must be one of \('rademacher', 'gaussian'\)"):
        Hutchinson(1, "sphere")
    assert isinstance(make_curvature(None, 3), Hutchinson) and make_curvature("hutchinson", 3).n_samples == 3
    assert isinstance(make_curvature("exact"), ExactDiagonal)
    assert make_curvature("gradient").needs_graph is False
