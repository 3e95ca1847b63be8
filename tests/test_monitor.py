"""CurvatureMonitor: values against a dense Hessian, no effect on training, logging and plots."""
import json
import math
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hessopt
from hessopt.monitor import CurvatureMonitor, read_jsonl




def _tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    return model, x, y


def _dense_hessian_and_gradient(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        chunks = theta.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.func.hessian(loss)(flat), torch.func.grad(loss)(flat)


def test_records_match_the_dense_hessian():
    model, x, y = _tiny_problem()
    H, g = _dense_hessian_and_gradient(model, x, y)
    evals, evecs = torch.linalg.eigh(H)
    k = 3
    mon = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=1, k=k, tol=1e-10, trace_matvecs=30,
                           density=True, density_steps=23, tensorboard=False)
    r = mon.compute(0)
    top = evals.flip(0)[:k]
    assert torch.allclose(torch.tensor(r["top_eigenvalues"], dtype=torch.float64), top, rtol=1e-8, atol=1e-10)
    assert r["eigenvalues_converged"]
    exact_trace = float(H.trace())
    assert abs(r["trace"] - exact_trace) <= 5 * r["trace_std_error"] + 1e-9
    V = evecs.flip(1)[:, :k]
    exact_concentration = float((V.T @ g).pow(2).sum() / g.pow(2).sum())
    assert r["gradient_concentration"] == pytest.approx(exact_concentration, rel=1e-6)
    assert r["gradient_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    # with n Lanczos steps the quadrature is exact: its nodes are eigenvalues of H, its weights sum to 1
    nodes, weights = (torch.tensor(r["density"][key][0], dtype=torch.float64) for key in ("nodes", "weights"))
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-10)
    for t in nodes[weights > 1e-8]:
        assert float((evals - t).abs().min()) < 1e-8
    assert r["loss"] == pytest.approx(float(nn.functional.cross_entropy(model(x), y).detach()), rel=1e-12)
    assert list(r) == ["step", "num_params", "top_eigenvalues", "eigenvalue_error_bounds", "eigenvalues_converged",
                       "trace", "trace_std_error", "loss", "density", "gradient_norm", "gradient_concentration",
                       "num_matvecs", "seed", "time_s"]  # the shared names of hessopt.results
    assert set(r["density"]) == {"nodes", "weights", "sigma", "num_matvecs"}
    assert 30 + 23 + k <= r["num_matvecs"] <= 23 + 30 + 23  # Lanczos may stop early on convergence


class _Net(nn.Module):
    """BatchNorm (running statistics) and dropout (global RNG): everything the monitor must not touch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _train(monitor_kwargs, optimizer="sgd", steps=4):
    torch.manual_seed(0)
    model = _Net()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 1, 6, 6, generator=gen), torch.randint(0, 3, (6,), generator=gen)) for _ in range(steps)]
    held_out = (torch.randn(5, 1, 6, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen))
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = hessopt.AdaHessian(model.parameters(), lr=0.05)
    mon = None
    if monitor_kwargs is not None:
        mon = CurvatureMonitor(model, nn.CrossEntropyLoss(), held_out, tensorboard=False, **monitor_kwargs)
    model.train()
    for step, (x, y) in enumerate(data, 1):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        if mon is not None:
            mon.step(step)
    assert model.training
    return model, [None if p.grad is None else p.grad.clone() for p in model.parameters()], torch.get_rng_state(), mon


@pytest.mark.parametrize("optimizer", ["sgd", "adahessian"])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_training_with_the_monitor_is_bit_identical(optimizer, bn_mode):
    ref_model, ref_grads, ref_rng, _ = _train(None, optimizer)
    model, grads, rng, mon = _train(dict(every=1, k=2, max_matvecs=6, trace_matvecs=6, density=True,
                                         density_steps=5, bn_mode=bn_mode), optimizer)
    assert len(mon.records) == 4
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm running statistics
    assert all(torch.equal(a, b) for a, b in zip(ref_grads, grads))
    assert torch.equal(ref_rng, rng)


def test_a_record_depends_on_its_step_only():
    model, x, y = _tiny_problem()
    a = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=1, k=2, max_matvecs=6, tensorboard=False)
    b = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=1, k=2, max_matvecs=6, tensorboard=False)
    b.compute(1)
    torch.manual_seed(123)  # the global RNG plays no part
    ra, rb = a.compute(3), b.compute(3)
    for key in ("top_eigenvalues", "trace", "trace_std_error", "gradient_concentration"):
        assert ra[key] == rb[key]
    c = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=5, tensorboard=False)
    assert c.due(0) and c.due(10) and not c.due(7) and c.step(7) is None


def test_jsonl_and_tensorboard_output(tmp_path):
    pytest.importorskip("tensorboard")
    model, x, y = _tiny_problem()
    log = tmp_path / "run" / "curvature.jsonl"
    with CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=2, k=2, max_matvecs=6, log_path=log) as mon:
        for step in range(5):
            mon.step(step, epoch=7)
    records = read_jsonl(log)
    assert [r["step"] for r in records] == [0, 2, 4] and all(r["epoch"] == 7 for r in records)
    assert records == json.loads(json.dumps(mon.records))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_options(tmp_path, monkeypatch):
    model, x, y = _tiny_problem()
    with pytest.raises(ValueError, match="tensorboard_dir"):
        CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), tensorboard=True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"hessopt\[tensorboard\]"):
        CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), tensorboard=True, tensorboard_dir=str(tmp_path))
    quiet = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), log_path=tmp_path / "c.jsonl")
    assert quiet._writer is None  # not installed and not required: JSONL only


def test_monitor_argument_errors():
    model, x, y = _tiny_problem()
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="every must be an int >= 0"):
        CurvatureMonitor(model, loss, (x, y), every=-1)
    with pytest.raises(ValueError, match="trace_matvecs must be an int >= 4"):
        CurvatureMonitor(model, loss, (x, y), trace_matvecs=3)
    with pytest.raises(ValueError, match="bn_mode"):
        CurvatureMonitor(model, loss, (x, y), bn_mode="batch")
    with pytest.raises(ValueError, match="max_matvecs"):
        CurvatureMonitor(model, loss, (x, y), k=5, max_matvecs=2)
    with pytest.raises(TypeError, match="tensorboard must be"):
        CurvatureMonitor(model, loss, (x, y), tensorboard="yes")


def test_plots_from_a_run_directory(tmp_path):
    pytest.importorskip("matplotlib")
    from recipes.common.plotting import plot_run  # the recipes' metrics plot lives beside the recipes
    model, x, y = _tiny_problem()
    mon = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=1, k=2, max_matvecs=6, density=True,
                           density_steps=8, log_path=tmp_path / "curvature.jsonl", tensorboard=False)
    mon.compute(0)
    mon.compute(1)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for e in (1, 2):
            f.write(json.dumps({"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_acc": 0.5 + 0.1 * e}) + "\n")
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["curvature.png", "density.png", "training.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_all_zero_products_are_flagged():
    model, x, y = _tiny_problem()
    handles = [p.register_hook(lambda g: g.detach() * 0) for p in model.parameters()]  # kills the graph
    mon = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), k=2, max_matvecs=6, trace_matvecs=4, tensorboard=False)
    with pytest.warns(RuntimeWarning, match="exactly zero"):
        mon.compute(0)
    for h in handles:
        h.remove()


# A record of 0.1.0's monitor (before it was built on curvature_summary), for this problem and options.
_RECORD_0_1_0 = {
    "step": 4, "top_eigenvalues": [0.5922140373252631, 0.39975974574603335],
    "eigenvalue_error_bounds": [0.0758135676847243, 0.1469181366236973], "eigenvalues_converged": False,
    "trace": 1.9812792175133802, "trace_std_error": 1.15699042724639, "loss": 0.7664771246475445,
    "density": {"nodes": [[-0.7032021871037223, -0.15966843085365384, 0.022812001524232167, 0.5532763183072663,
                           0.706491297727251]],
                "weights": [[0.0014462359003535033, 0.07777770653848716, 0.715584115254982, 0.1644514778068281,
                             0.04074046449934918]],
                "sigma": 0.014096934848309735},
    "gradient_norm": 0.3629975097331908, "gradient_concentration": 0.406150225404792, "num_matvecs": 20,
}


def _old_record_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    mon = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=1, k=2, max_matvecs=6, trace_matvecs=9,
                           density=True, density_steps=5, seed=3, tensorboard=False)
    return model, x, y, mon


def test_records_keep_their_content_and_seeds():
    model, x, y, mon = _old_record_problem()
    r = mon.compute(4)
    # the same seeds as before: eigenvalues s, trace s + 1, density s + 2 with s = 1000003 seed + 7 step
    s = 3 * 1_000_003 + 7 * 4
    assert r["seed"] == s
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.warns(RuntimeWarning):
        eig = hessopt.top_eigenvalues(op, k=2, tol=1e-3, max_matvecs=6, generator=torch.Generator().manual_seed(s))
    tr = hessopt.trace(op, num_matvecs=9, generator=torch.Generator().manual_seed(s + 1))
    dens = hessopt.spectral_density(op, num_steps=5, generator=torch.Generator().manual_seed(s + 2))
    assert r["top_eigenvalues"] == eig.eigenvalues.tolist() and r["trace"] == tr.estimate
    assert r["density"]["nodes"] == [dens.nodes[0].tolist()] and r["density"]["weights"] == [dens.weights[0].tolist()]
    # and the numbers of 0.1.0's records (to rounding: the Lanczos kernel may reorder a sum)
    for key, old in _RECORD_0_1_0.items():
        new = r[key]
        if key == "density":
            assert set(new) == {"nodes", "weights", "sigma", "num_matvecs"}
            for field in ("nodes", "weights"):
                assert new[field][0] == pytest.approx(old[field][0], rel=1e-12, abs=1e-14), field
            assert new["sigma"] == pytest.approx(old["sigma"], rel=1e-12)
        elif isinstance(old, list):
            assert new == pytest.approx(old, rel=1e-12), key
        elif isinstance(old, float):
            assert new == pytest.approx(old, rel=1e-12), key
        else:
            assert new == old, key
    assert r["num_params"] == 23  # was density.num_params; now beside the other quantities
