"""hessopt.integrations.timm: AdaHessian through timm's optimizer factory, with timm's training convention."""
import sys

import pytest
import torch

timm = pytest.importorskip("timm")
import timm.optim  # noqa: E402

import hessopt  # noqa: E402
from hessopt.integrations import timm as integration  # noqa: E402




def test_factory_returns_hessopt_adahessian_and_trains_a_timm_resnet18():
    integration.register()
    info = timm.optim.get_optimizer_info("hessopt_adahessian")
    assert info.second_order and info.opt_class is hessopt.AdaHessian
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, pretrained=False)
    opt = timm.optim.create_optimizer_v2(model, opt="hessopt_adahessian", lr=0.15, weight_decay=5e-4 / 0.15)
    assert isinstance(opt, hessopt.AdaHessian)
    # timm's grouping: no weight decay on biases and norm weights, the decoupled coefficient on the rest
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, pytest.approx(5e-4 / 0.15)]
    second_order = getattr(opt, "is_second_order", False)  # what timm's train.py reads
    assert second_order
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward(create_graph=second_order)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    state = opt.state[next(model.parameters())]
    assert state["hessian_step"] == 2 and state["exp_hessian_diag_sq"].abs().sum() > 0
    assert all(p.grad is None or not p.grad.requires_grad for p in model.parameters())  # graph released


def test_register_is_idempotent_and_leaves_timms_own_names_alone():
    integration.register()
    integration.register()
    model = torch.nn.Linear(3, 2)
    assert type(timm.optim.create_optimizer_v2(model, opt="adahessian")).__module__ == "timm.optim.adahessian"
    assert isinstance(timm.optim.create_optimizer_v2(model, opt="HESSOPT_ADAHESSIAN"), hessopt.AdaHessian)
    assert isinstance(timm.optim.create_optimizer_v2(model, opt="adamw"), torch.optim.AdamW)
    assert "hessopt_adahessian" in timm.optim.list_optimizers("hessopt*")


def test_untested_timm_versions_are_refused(monkeypatch):
    monkeypatch.setattr(timm, "__version__", "0.9.16")
    with pytest.raises(ValueError, match=r"tested with timm 1\.0\.29.*force=True"):
        integration.register()
    integration.register(force=True)  # the escape hatch


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"hessopt\[timm\]"):
        integration.register()
