"""hessopt.integrations.timm: AdaHessian through timm's optimizer factory, with timm's training convention.

timm's train.py calls ``loss.backward(create_graph=getattr(optimizer, "is_second_order", False))``
and then ``optimizer.step()`` (its loss-scaler-free loop); these tests drive the optimizers the same way.
Run against another timm with ``PYTHONPATH=DIR`` (``pip install --target DIR --no-deps timm==X``).
"""
import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")
import timm.optim  # noqa: E402

import hessopt  # noqa: E402
from hessopt.integrations import timm as integration  # noqa: E402
from hessopt.integrations.timm import train as launcher  # noqa: E402

NAME = integration.NAME  # "hessopt-adahessian"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TIMM_FUSED_ATTN", None)
    return env


def _timm_loop(model, opt, batches):
    """timm train.py's update without a loss scaler."""
    second_order = getattr(opt, "is_second_order", False)
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward(create_graph=second_order)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _curvature_updates(opt, p):
    """Hessian estimates folded into p's second moment so far (the state key's name has changed before)."""
    state = opt.state[p]
    assert state["exp_hessian_diag_sq"].abs().sum() > 0
    return state.get("curvature_updates", state.get("hessian_step"))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def test_factory_returns_hessopt_adahessian_and_trains_a_timm_resnet18():
    integration.register()
    info = timm.optim.get_optimizer_info(NAME)
    assert info.second_order and info.opt_class is hessopt.AdaHessian
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, pretrained=False)
    opt = timm.optim.create_optimizer_v2(model, opt=NAME, lr=0.15, weight_decay=5e-4 / 0.15)
    assert isinstance(opt, hessopt.AdaHessian)
    # timm's grouping: no weight decay on biases and norm weights, the decoupled coefficient on the rest
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, pytest.approx(5e-4 / 0.15)]
    assert getattr(opt, "is_second_order", False)  # what timm's train.py reads
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    _timm_loop(model, opt, [(x, y)] * 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert _curvature_updates(opt, next(model.parameters())) == 2
    assert all(p.grad is None or not p.grad.requires_grad for p in model.parameters())  # graph released


def test_register_is_idempotent_and_leaves_timms_own_names_alone():
    integration.register()
    integration.register()
    model = torch.nn.Linear(3, 2)
    assert type(timm.optim.create_optimizer_v2(model, opt="adahessian")).__module__ == "timm.optim.adahessian"
    for name in (NAME, "HESSOPT-ADAHESSIAN", "hessopt_adahessian"):  # the underscore spelling once registered
        assert isinstance(timm.optim.create_optimizer_v2(model, opt=name), hessopt.AdaHessian)
    assert isinstance(timm.optim.create_optimizer_v2(model, opt="adamw"), torch.optim.AdamW)
    assert NAME in timm.optim.list_optimizers("hessopt*")


def test_other_hessopt_names_are_refused_instead_of_cut_to_a_timm_name():
    integration.register()
    model = torch.nn.Linear(3, 2)
    for name in ("hessopt_sgd", "hessopt_adamw", "lookahead_hessopt_adahesian"):
        with pytest.raises(ValueError, match=r"unknown hessopt optimizer.*hessopt-adahessian"):
            timm.optim.create_optimizer_v2(model, opt=name)


def test_without_register_timm_refuses_the_hyphen_name_but_reads_the_underscore_one_as_its_own(monkeypatch):
    """Why NAME has a hyphen: timm's own factory (the function register() wraps, on a registry without
    hessopt's entry) keeps only the part after the last underscore."""
    integration.register()
    registry = timm.optim._optim_factory.default_registry
    timms_own = registry.create_optimizer.__wrapped__
    monkeypatch.delitem(registry._optimizers, NAME)
    model = torch.nn.Linear(3, 2)
    silently = timms_own(model, "hessopt_adahessian")
    assert type(silently).__module__ == "timm.optim.adahessian"  # timm's own: the trap the hyphen avoids
    with pytest.raises(ValueError, match=r"hessopt-adahessian not found"):
        timms_own(model, NAME)


def test_timm_versions_outside_the_tested_range(monkeypatch):
    low, high = integration.TESTED_TIMM_RANGE
    for version in ("0.9.16", "1.0.11", "1.1.0", "2.0.0"):
        monkeypatch.setattr(timm, "__version__", version)
        with pytest.raises(ValueError, match=rf"tested with timm {low} to {high}, but timm {version}.*force=True"):
            integration.register()
    integration.register(force=True)  # the escape hatch
    monkeypatch.setattr(timm, "__version__", "1.0.99")
    with pytest.warns(UserWarning, match=r"1\.0\.99 is newer"):
        integration.register()
    for version in (low, high, "1.0.29.dev0", "1.0.20+cpu"):
        monkeypatch.setattr(timm, "__version__", version)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            integration.register()


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"hessopt\[timm\]"):
        integration.register()


# -- Lookahead ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lookahead_" + NAME, "lookahead_hessopt_adahessian"])
def test_lookahead_keeps_second_order_and_equals_lookahead_by_hand(name):
    """timm's Lookahead around AdaHessian, driven by timm's loop, equals AdaHessian alone with timm's
    slow-weight rule applied by hand: every k=6 steps ``slow += 0.5 * (fast - slow); fast = slow``,
    the slow weights starting from the fast ones at the first of those steps (as timm's code does)."""
    integration.register()
    model = _mlp()
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(model, opt=name, lr=0.1)
    assert isinstance(opt, integration.SecondOrderLookahead) and isinstance(opt, timm.optim.Lookahead)
    assert isinstance(opt._base_optimizer, hessopt.AdaHessian)
    assert opt.is_second_order is True and opt.needs_hessian is True
    batches = _batches(13)

    ref_opt = timm.optim.create_optimizer_v2(reference, opt=NAME, lr=0.1)  # same groups, same probes
    slow = None
    for i, (x, y) in enumerate(batches, 1):
        _timm_loop(reference, ref_opt, [(x, y)])
        if i % 6 == 0:
            with torch.no_grad():
                if slow is None:
                    slow = [p.detach().clone() for p in reference.parameters()]
                for s, p in zip(slow, reference.parameters()):
                    s.add_(p - s, alpha=0.5)
                    p.copy_(s)

    losses = _timm_loop(model, opt, batches)
    assert all(torch.isfinite(torch.tensor(losses)))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert all(g["lookahead_step"] == 13 for g in opt.param_groups)
    assert all(p.grad is None for p in model.parameters())  # zero_grad reached AdaHessian's
    _timm_loop(plain, timm.optim.create_optimizer_v2(plain, opt=NAME, lr=0.1), batches)
    assert not torch.equal(plain[0].weight, model[0].weight)  # Lookahead did change the run


def test_lookahead_state_dict_round_trip_resumes_exactly():
    integration.register()
    batches = _batches(9)
    model = _mlp()
    opt = integration.lookahead(hessopt.AdaHessian(model.parameters(), lr=0.1))
    _timm_loop(model, opt, batches[:5])
    resumed_model = copy.deepcopy(model)
    resumed = integration.lookahead(hessopt.AdaHessian(resumed_model.parameters(), lr=0.1))
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _timm_loop(model, opt, batches[5:])  # crosses the slow-weight update at step 6
    _timm_loop(resumed_model, resumed, batches[5:])
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_lookahead_under_grad_scaler_unscales_the_hessian_and_skips_inf_steps():
    """GradScaler hands grad_scale/found_inf to the optimizer it is given: the wrapper passes them on,
    so z*Hz is unscaled like the gradient (scale 1024 and no scaler take the same steps), and a step
    with an inf gradient moves neither the fast nor the slow weights."""
    batches = _batches(7)
    plain_model, scaled_model = _mlp(), _mlp()
    plain = integration.lookahead(hessopt.AdaHessian(plain_model.parameters(), lr=0.1))
    scaled = integration.lookahead(hessopt.AdaHessian(scaled_model.parameters(), lr=0.1))
    assert scaled._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    _timm_loop(plain_model, plain, batches)
    for x, y in batches:  # timm's NativeScaler: scale(loss).backward(create_graph=...), then scaler.step(opt)
        loss = torch.nn.functional.cross_entropy(scaled_model(x), y)
        scaler.scale(loss).backward(create_graph=scaled.is_second_order)
        scaler.step(scaled)
        scaler.update()
        scaled.zero_grad()
    for p, q in zip(plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    before = [p.detach().clone() for p in scaled_model.parameters()]
    steps = [g["lookahead_step"] for g in scaled.param_groups]
    x, y = batches[0]
    loss = torch.nn.functional.cross_entropy(scaled_model(x), y) * float("inf")
    scaler.scale(loss).backward(create_graph=True)
    scaler.step(scaled)
    scaler.update()
    scaled.zero_grad()
    assert all(torch.equal(a, p) for a, p in zip(before, scaled_model.parameters()))
    assert [g["lookahead_step"] for g in scaled.param_groups] == steps
    assert not any(hasattr(o, "grad_scale") or hasattr(o, "found_inf") for o in (scaled, scaled._base_optimizer))


def test_lookahead_does_not_count_a_step_that_adahessian_skipped_as_non_finite():
    """A NaN batch changes nothing in AdaHessian (nonfinite="skip"): Lookahead's clock and slow
    weights do not move either, so the run equals one without that batch."""
    batches = _batches(5)
    clean_model, nan_model = _mlp(), _mlp()
    clean = integration.lookahead(hessopt.AdaHessian(clean_model.parameters(), lr=0.1), k=2)
    with_nan = integration.lookahead(hessopt.AdaHessian(nan_model.parameters(), lr=0.1), k=2)
    _timm_loop(clean_model, clean, batches)
    x, y = batches[0]
    bad = [(x * float("nan"), y)]
    with pytest.warns(RuntimeWarning, match="not finite"):
        _timm_loop(nan_model, with_nan, batches[:2] + bad + batches[2:])
    assert with_nan._base_optimizer.skipped_steps == 1
    assert [g["lookahead_step"] for g in with_nan.param_groups] == [5] * len(with_nan.param_groups)
    for p, q in zip(clean_model.parameters(), nan_model.parameters()):
        assert torch.equal(p, q)


# -- timm's attention and the launcher -------------------------------------------------------------


def _tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                             num_classes=3, embed_dim=16, num_heads=2)


def test_timm_vit_hessian_step_with_written_out_and_with_routed_fused_attention(monkeypatch):
    """timm's fused attention is F.scaled_dot_product_attention (what second_order_safe routes); off,
    timm writes attention out. Fused and not routed, the explicit Hessian step fails; written out,
    or fused and routed, it works, and both give the same step."""
    from timm.layers import set_fused_attn, use_fused_attn

    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    results = {}
    fused_before = use_fused_attn()
    try:
        set_fused_attn(True)  # fused and not routed: the Hessian step cannot go through the kernel
        model = _tiny_vit()
        with pytest.raises(RuntimeError, match=r"attention"):
            _timm_loop(model, hessopt.AdaHessian(model.parameters(), lr=0.01), [(x, y)])
        for fused in (False, True):
            set_fused_attn(fused)
            torch.manual_seed(0)
            model = _tiny_vit()
            assert model.blocks[0].attn.fused_attn is fused
            opt = hessopt.AdaHessian(model.parameters(), lr=0.01)
            with hessopt.second_order_safe() if fused else torch.enable_grad():
                _timm_loop(model, opt, [(x, y)])
            results[fused] = [p.detach().clone() for p in model.parameters()]
    finally:
        set_fused_attn(fused_before)
    for a, b in zip(results[False], results[True]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


FAKE_TRAIN = '''
"""A stand-in for timm's train.py: argparse, create_optimizer_v2, timm's second-order backward."""
import argparse, json, os, sys
import torch, timm, timm.optim

p = argparse.ArgumentParser()
p.add_argument("--opt", default="sgd")
p.add_argument("--model", default="vit")
p.add_argument("--out", required=True)
args = p.parse_args()
torch.manual_seed(0)
if args.model == "vit":
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                              num_classes=3, embed_dim=16, num_heads=2)
    x = torch.randn(4, 3, 16, 16)
else:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    x = torch.randn(4, 3, 16, 16)
y = torch.randint(0, 3, (4,))
optimizer = timm.optim.create_optimizer_v2(model, opt=args.opt, lr=0.01, weight_decay=1e-4)
second_order = hasattr(optimizer, "is_second_order") and optimizer.is_second_order
losses = []
for _ in range(2):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward(create_graph=second_order)
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
base = getattr(optimizer, "_base_optimizer", optimizer)
json.dump({
    "class": type(optimizer).__module__ + "." + type(optimizer).__name__,
    "base": type(base).__module__ + "." + type(base).__name__,
    "second_order": bool(second_order), "argv": sys.argv, "name": __name__, "losses": losses,
    "fused_attn": [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")],
    "env": os.environ.get("TIMM_FUSED_ATTN"),
    "hessian_steps": sorted({s.get("curvature_updates", s.get("hessian_step")) for s in base.state.values()
                             if "exp_hessian_diag_sq" in s and s["exp_hessian_diag_sq"].abs().sum() > 0}),
}, open(args.out, "w"))
'''


def _write_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(FAKE_TRAIN)
    return script, tmp_path / "result.json"


def test_launcher_as_a_command_runs_a_train_script_with_hessopt_registered(tmp_path):
    """``python -m hessopt.integrations.timm.train train.py ARGS``: a fresh process, so TIMM_FUSED_ATTN=0 is
    in place before timm's first import and a tiny timm ViT takes Hessian steps."""
    script, out = _write_script(tmp_path)
    cmd = [sys.executable, "-m", "hessopt.integrations.timm.train", str(script), "--opt", "hessopt_adahessian",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["class"] == "hessopt.optim.adahessian.AdaHessian" and r["second_order"]
    assert r["name"] == "__main__" and r["argv"] == [str(script), "--opt", "hessopt_adahessian", "--out", str(out)]
    assert r["env"] == "0" and r["fused_attn"] == [False]  # written-out attention
    assert r["hessian_steps"] == [2] and all(l == l for l in r["losses"])
    assert "registered in timm" in proc.stderr


@pytest.fixture
def launch(tmp_path, monkeypatch):
    """Run the launcher in this process (timm already imported), restoring what it changes."""
    from timm.layers import set_fused_attn, use_fused_attn

    fused = use_fused_attn()
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("TIMM_FUSED_ATTN", raising=False)
    script, out = _write_script(tmp_path)

    def run(*args):
        launcher.main([str(script), *args, "--out", str(out)])
        return json.loads(out.read_text())

    yield run
    set_fused_attn(fused)


def test_launcher_after_timm_was_imported_turns_fused_attention_off(launch):
    from timm.layers import set_fused_attn

    set_fused_attn(True)
    r = launch("--opt", NAME)
    assert r["class"] == "hessopt.optim.adahessian.AdaHessian" and r["second_order"]
    assert r["env"] == "0" and r["fused_attn"] == [False] and r["hessian_steps"] == [2]


def test_launcher_keeps_fused_attention_when_asked_and_routes_it(launch, monkeypatch, capsys):
    from timm.layers import set_fused_attn

    set_fused_attn(True)
    monkeypatch.setenv("TIMM_FUSED_ATTN", "1")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    r = launch("--opt", NAME)
    assert r["env"] == "1" and r["fused_attn"] == [True] and r["hessian_steps"] == [2]
    assert "routed by hessopt.second_order_safe()" in capsys.readouterr().err
    assert torch.nn.functional.scaled_dot_product_attention is sdpa  # the routing ends with the run


def test_launcher_lookahead_and_a_first_order_optimizer(launch):
    r = launch("--opt", "lookahead_" + NAME, "--model", "linear")
    assert r["class"].endswith("SecondOrderLookahead") and r["base"].endswith("AdaHessian") and r["second_order"]
    assert r["hessian_steps"] == [2]
    r = launch("--opt", "adamw", "--model", "linear")
    assert r["class"] == "torch.optim.adamw.AdamW" and not r["second_order"]


def test_launcher_refuses_names_timm_would_cut_and_missing_scripts(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"timm would read this as 'adamw' and drop 'my'"):
        launcher.check_opt("my_adamw")
    with pytest.raises(ValueError, match=r"drop 'foo'"):
        launcher.check_opt("lookahead_foo_adam")
    with pytest.warns(UserWarning, match=r"timm's own Adahessian.*--opt hessopt-adahessian"):
        launcher.check_opt("adahessian")
    for fine in ("adamw", "lookahead_adam", NAME, "hessopt_adahessian"):
        launcher.check_opt(fine)
    (tmp_path / "x.py").write_text("raise SystemExit('must not run')\n")
    with pytest.raises(ValueError, match=r"drop 'my'"):
        launcher.main([str(tmp_path / "x.py"), "--opt=my_adamw"])
    with pytest.raises(SystemExit, match=r"(?s)not a file.*git repository at the tag of the installed timm"):
        launcher.main([str(tmp_path / "missing.py")])
    with pytest.raises(SystemExit):
        launcher.main([])
    launcher.main(["--help"])
    assert "git clone" in capsys.readouterr().out
