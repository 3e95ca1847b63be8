"""The fairseq plugin's optimizer, driven exactly as fairseq's trainer drives it (no fairseq-train run).

Oracle: ``hessopt.AdaHessian`` stepping on the MEAN loss (explicit mode). fairseq instead
back-propagates a SUM over tokens (possibly in several sub-batches, --update-freq) and divides
``p.grad.data`` afterwards (``multiply_grads``); the plugin must reproduce the oracle's parameters
and Hessian moments, which is only true if it scales the Hutchinson estimate by the same factors.
"""
import copy
import importlib
import inspect
import runpy
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("fairseq")

import hessopt  # noqa: E402
from hessopt.integrations import fairseq as hf  # noqa: E402
from hessopt.integrations.fairseq.optimizer import (  # noqa: E402
    FairseqAdaHessian,
    FairseqAdaHessianConfig,
    UnsupportedFairseqOption,
    check_fairseq_options,
)




FAIRSEQ_DEFAULTS = dict(
    seed=1, fp16=False, bf16=False, memory_efficient_fp16=False, memory_efficient_bf16=False, amp=False,
    tpu=False, ddp_backend="pytorch_ddp", zero_sharding="none", use_bmuf=False,
)


def make_cfg(**overrides):
    """The config fairseq-train would build (interpolations resolved), with ``overrides``."""
    values = dict(FAIRSEQ_DEFAULTS, lr=[0.25])
    values.update(overrides)
    return FairseqAdaHessianConfig(**values)


def test_defaults_are_adahessians_defaults():
    cfg = make_cfg()
    signature = inspect.signature(hessopt.AdaHessian).parameters
    plugin = FairseqAdaHessian(cfg, [nn.Parameter(torch.zeros(3))])
    for name, value in plugin.hessopt_kwargs.items():
        if name in ("lr", "seed"):
            continue  # fairseq's --lr and --seed
        assert value == signature[name].default, name


def test_options_map_onto_adahessian_arguments():
    cfg = make_cfg(lr=[0.3, 0.1], adahessian_betas="(0.8, 0.95)", adahessian_eps=1e-3, weight_decay=0.01,
                   hessian_power=0.5, block_length=4, update_each=2, n_samples=3, seed=7)
    params = [nn.Parameter(torch.zeros(2, 8))]
    plugin = FairseqAdaHessian(cfg, params)
    expected = dict(lr=0.3, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.01, hessian_power=0.5, block_length=4,
                    update_each=2, n_samples=3, seed=7)
    assert plugin.hessopt_kwargs == expected
    hessopt.AdaHessian(params, **expected)  # the same kwargs construct the optimizer directly
    inner = plugin.optimizer
    assert isinstance(inner, hessopt.AdaHessian)
    group = inner.param_groups[0]
    for key in ("lr", "betas", "eps", "weight_decay", "hessian_power", "block_length"):
        assert group[key] == expected[key], key
    assert inner.update_each == 2 and inner.seed == 7 and inner.curvature.source.n_samples == 3
    assert plugin.get_lr() == 0.3
    plugin.set_lr(0.02)  # what fairseq's lr schedulers call
    assert group["lr"] == 0.02


@pytest.mark.parametrize(
    "option, value, match",
    [
        ("fp16", True, "--fp16/--bf16"),
        ("bf16", True, "FP16Optimizer"),
        ("memory_efficient_fp16", True, "--memory-efficient-fp16"),
        ("memory_efficient_bf16", True, "MemoryEfficientFP16Optimizer"),
        ("amp", True, "--amp"),
        ("tpu", True, "--tpu"),
        ("ddp_backend", "fully_sharded", "--ddp-backend fully_sharded"),
        ("ddp_backend", "slowmo", "--ddp-backend slowmo"),
        ("zero_sharding", "os", "--zero-sharding os"),
        ("use_bmuf", True, "--use-bmuf"),
    ],
)
def test_unsupported_options_are_rejected_at_construction(option, value, match):
    with pytest.raises(UnsupportedFairseqOption, match=match):
        FairseqAdaHessian(make_cfg(**{option: value}), [nn.Parameter(torch.zeros(3))])
    assert issubclass(UnsupportedFairseqOption, ValueError)


@pytest.mark.parametrize("backend", ["c10d", "pytorch_ddp", "legacy_ddp", "no_c10d"])
def test_supported_ddp_backends_pass_the_check(backend):
    check_fairseq_options(make_cfg(ddp_backend=backend))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches(step):
    g = torch.Generator().manual_seed(100 + step)
    # two sub-batches of different sizes (fairseq's --update-freq 2), classification targets
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in (4, 7)]


@pytest.mark.parametrize("update_each", [1, 2])
def test_fairseq_driving_equals_adahessian_on_the_mean_loss(update_each):
    """Sum losses over two sub-batches, divide the gradient afterwards, clip it: same as hessopt on the mean."""
    clip = 0.05  # active: the gradient norm is ~0.5
    kwargs = dict(lr=0.1, betas=(0.9, 0.98), eps=1e-4, weight_decay=1e-3, hessian_power=1.0, block_length=2,
                  update_each=update_each, n_samples=2, seed=5)
    model_p, model_r = _model(), _model()
    cfg = make_cfg(lr=[kwargs["lr"]], adahessian_betas=str(kwargs["betas"]), adahessian_eps=kwargs["eps"],
                   weight_decay=kwargs["weight_decay"], hessian_power=1.0, block_length=2, update_each=update_each,
                   n_samples=2, seed=5)
    plugin = FairseqAdaHessian(cfg, list(model_p.parameters()))
    reference = hessopt.AdaHessian(model_r.parameters(), **kwargs)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    graphs = []
    for step in range(4):
        batches = _batches(step)
        sample_size = sum(len(y) for _, y in batches)
        # the fairseq trainer's sequence (Trainer.train_step)
        plugin.zero_grad()
        for x, y in batches:
            plugin.backward(loss_fn(model_p(x), y))
        graphs.append(next(model_p.parameters()).grad.requires_grad)
        plugin.multiply_grads(1.0 / sample_size)
        # fairseq's clip_grad_norm scales p.grad.detach() in place like this (its norm is float32 only)
        torch.nn.utils.clip_grad_norm_([p.grad.detach() for p in model_p.parameters()], clip)
        plugin.step()
        # the oracle: mean loss, explicit mode, gradient clipped in place (not the curvature)
        reference.zero_grad()
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        (loss_fn(model_r(x), y) / sample_size).backward(create_graph=reference.needs_hessian)
        torch.nn.utils.clip_grad_norm_([p.grad.detach() for p in model_r.parameters()], clip)
        reference.step()
    assert graphs == [True, update_each == 1, True, update_each == 1]
    for p, r in zip(model_p.parameters(), model_r.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(plugin.optimizer.state[p]["exp_hessian_diag_sq"],
                                   reference.state[r]["exp_hessian_diag_sq"], rtol=1e-10, atol=1e-14)
    assert plugin.optimizer.state[next(model_p.parameters())]["curvature_updates"] == (4 if update_each == 1 else 2)


def test_forward_between_zero_grad_and_step_is_second_order_safe():
    """fairseq runs the forward pass after zero_grad(): attention must be twice differentiable there."""
    original = torch.nn.functional.scaled_dot_product_attention
    plugin = FairseqAdaHessian(make_cfg(update_each=2), [nn.Parameter(torch.ones(2))])
    plugin.zero_grad()  # step 0 is a Hessian step
    assert torch.nn.functional.scaled_dot_product_attention is not original
    p = plugin.optimizer.param_groups[0]["params"][0]
    plugin.backward((p ** 3).sum())
    plugin.step()
    assert torch.nn.functional.scaled_dot_product_attention is original
    plugin.zero_grad()  # step 1 reuses the Hessian: nothing to patch, plain backward
    assert torch.nn.functional.scaled_dot_product_attention is original
    plugin.backward((p ** 3).sum())
    assert not p.grad.requires_grad
    plugin.step()


def test_transformer_layer_hessian_step_through_the_plugin():
    """nn.TransformerEncoderLayer (fused attention) gets a Hessian estimate with the zero_grad/backward/step sequence."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    plugin = FairseqAdaHessian(make_cfg(lr=[0.01]), list(layer.parameters()))
    x = torch.randn(3, 5, 8)
    plugin.zero_grad()
    plugin.backward(layer(x).pow(2).sum())
    plugin.multiply_grads(1 / 15)
    plugin.step()
    diag = [plugin.optimizer.state[p]["exp_hessian_diag_sq"] for p in layer.parameters()]
    assert all(torch.isfinite(d).all() for d in diag) and any(d.abs().sum() > 0 for d in diag)


def test_checkpoint_round_trip_keeps_the_probe_stream():
    """state_dict/load_state_dict through the fairseq API (with optimizer_overrides) resumes the probes."""
    def run(steps, plugin, model):
        for step in range(steps):
            x, y = _batches(step)[0]
            plugin.zero_grad()
            plugin.backward(nn.functional.cross_entropy(model(x), y, reduction="sum"))
            plugin.multiply_grads(1 / len(y))
            plugin.step()

    model_a = _model()
    a = FairseqAdaHessian(make_cfg(lr=[0.05], seed=3), list(model_a.parameters()))
    run(3, a, model_a)
    saved = copy.deepcopy(a.state_dict())  # as fairseq's checkpoint file is (torch returns state by reference)
    model_b = _model()
    model_b.load_state_dict(model_a.state_dict())
    b = FairseqAdaHessian(make_cfg(lr=[0.05], seed=3), list(model_b.parameters()))
    b.load_state_dict(saved, optimizer_overrides={"lr": 0.05})
    run(2, a, model_a)
    run(2, b, model_b)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_user_dir_is_not_named_fairseq(capsys):
    """fairseq imports --user-dir DIR as the top-level module basename(DIR): 'fairseq' would collide."""
    import os

    assert os.path.basename(hf.USER_DIR) == "hessopt_adahessian"
    assert os.path.isfile(os.path.join(hf.USER_DIR, "__init__.py"))
    runpy.run_module("hessopt.integrations.fairseq", run_name="__main__")
    assert capsys.readouterr().out.strip() == hf.USER_DIR


def test_missing_fairseq_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "fairseq" or m.startswith("fairseq.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "hessopt.integrations.fairseq.optimizer")
    monkeypatch.delattr(hf, "optimizer")
    with pytest.raises(ImportError, match=r"pip install 'hessopt\[fairseq\]'"):
        importlib.import_module("hessopt.integrations.fairseq.optimizer")
    with pytest.raises(ImportError, match=r"hessopt\[fairseq\]"):
        hf.FairseqAdaHessian  # noqa: B018 - the lazy attribute imports the optimizer module
