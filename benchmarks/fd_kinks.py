"""Finite differences across kinks: the errors that freezing ReLU / max-pooling patterns removes.

    OMP_NUM_THREADS=2 python benchmarks/fd_kinks.py [--out benchmarks/results/cpu-fd-kinks]

Each case is computed twice, with the activation pattern frozen at theta (hessopt's behaviour) and
without (``op._fd.piecewise = False`` for the operators; for the optimizer, no pattern recorded), against
the exact double-backward value:

* ``relu_mlp_product``: ``HessianOperator(method="finite_difference") @ v`` on a 784-1024-1024-10 ReLU
  MLP (1,863,690 parameters), 64 random inputs, float64, default step, a unit Gaussian ``v``:
  relative error of the product;
* ``relu_mlp_top_eigenvalue``: the top eigenvalue of the same model's Hessian by finite-difference
  products in float32 and in float64 (Lanczos, tol 1e-4, at most 60 products) against the exact
  float64 value;
* ``maxpool_cnn_product``: the small conv / max-pool / tanh CNN of
  ``tests/test_curvature_operators.py`` (2,098 parameters, 64 images of 16x16, float64);
* ``optimizer_central_differences``: one AdaHessian step with ``FiniteDifference(scheme="central")``
  on the ReLU / leaky-ReLU MLP of ``tests/test_curvature_sources.py`` (1024 samples, float64):
  largest relative error of the squared-curvature moment against the exact Hutchinson step (same probes).

Whether a step crosses a kink is a matter of chance (it depends on the data and the probe); these
are the seeds the figures in the docs were measured with. Writes ``fd_kinks.json`` and ``fd_kinks.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import hessopt  # noqa: E402
import hessopt.optim._base as optim_base  # noqa: E402

F64 = torch.float64


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _relu_mlp(dtype=F64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    return model.to(dtype), (x.to(dtype), y)


def _fd(model, data, frozen: bool):
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data, method="finite_difference")
    op._fd.piecewise = frozen
    return op


def relu_mlp_product():
    model, data = _relu_mlp()
    exact = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(exact.num_params, dtype=F64, generator=torch.Generator().manual_seed(1))
    v /= v.norm()
    want = exact @ v
    return {"frozen": _rel(_fd(model, data, True) @ v, want), "unfrozen": _rel(_fd(model, data, False) @ v, want)}


def relu_mlp_top_eigenvalue():
    model, data = _relu_mlp()
    exact = hessopt.top_eigenvalues(hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data), k=1, tol=1e-9,
                                    max_matvecs=150, check_multiplicity=False, generator=0)
    out = {"exact_float64": float(exact.eigenvalues[0])}
    for name, dtype in (("float32", torch.float32), ("float64", F64)):
        m, d = _relu_mlp(dtype)
        for frozen in (True, False):
            r = hessopt.top_eigenvalues(_fd(m, d, frozen), k=1, tol=1e-4, max_matvecs=60, check_multiplicity=False,
                                        generator=0)
            out[f"{name}_{'frozen' if frozen else 'unfrozen'}"] = {
                "eigenvalue": float(r.eigenvalues[0]), "matvecs": r.num_matvecs, "converged": bool(r.converged)}
    return out


def maxpool_cnn_product():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).to(F64)
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(64, 3, 16, 16, generator=gen, dtype=F64), torch.arange(64) % 10)
    exact = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(exact.num_params, generator=gen, dtype=F64)
    want = exact @ v
    return {"frozen": _rel(_fd(model, data, True) @ v, want), "unfrozen": _rel(_fd(model, data, False) @ v, want)}


def _optimizer_moment(curvature, frozen: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 128), nn.ReLU(inplace=True), nn.Linear(128, 128), nn.LeakyReLU(0.1),
                          nn.Linear(128, 10)).to(F64)
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(1024, 16, generator=gen, dtype=F64), torch.arange(1024) % 10
    opt = hessopt.AdaHessian(model.parameters(), lr=1e-3, curvature=curvature, seed=3)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    recorder = optim_base.frozen_activations
    if not frozen:  # no pattern recorded, so none replayed
        optim_base.frozen_activations = contextlib.contextmanager(lambda masks=None: (yield []))
    try:
        opt.step(closure)
    finally:
        optim_base.frozen_activations = recorder
    return [opt.state[p]["exp_hessian_diag_sq"] for p in model.parameters()]


def optimizer_central_differences():
    exact = _optimizer_moment("hutchinson")

    def err(moment):
        return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(moment, exact))

    return {"frozen": err(_optimizer_moment(hessopt.FiniteDifference(scheme="central"))),
            "unfrozen": err(_optimizer_moment(hessopt.FiniteDifference(scheme="central"), frozen=False))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/fd-kinks"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}", "python"] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    for case in (relu_mlp_product, maxpool_cnn_product, optimizer_central_differences, relu_mlp_top_eigenvalue):
        record[case.__name__] = case()
        print(case.__name__, json.dumps(record[case.__name__]), flush=True)
    (args.out / "fd_kinks.json").write_text(json.dumps(record, indent=2))
    top = record["relu_mlp_top_eigenvalue"]
    lines = [f"# Finite differences across kinks ({record['date']}, {record['machine']}, "
             f"{record['torch_threads']} torch threads)", "", f"Command: `{record['command']}`", "",
             "| case | error, pattern frozen (hessopt) | error, not frozen |", "|---|---|---|"]
    for name in ("relu_mlp_product", "maxpool_cnn_product", "optimizer_central_differences"):
        lines.append(f"| {name} (relative) | {record[name]['frozen']:.2e} | {record[name]['unfrozen']:.3g} |")
    lines += ["", f"Top eigenvalue of the ReLU MLP's Hessian, exact (float64 double backward): "
              f"{top['exact_float64']:.6f}", "", "| products in | frozen | not frozen |", "|---|---|---|"]
    for name in ("float32", "float64"):
        f, u = top[f"{name}_frozen"], top[f"{name}_unfrozen"]
        lines.append(f"| {name} | {f['eigenvalue']:.6f} ({f['matvecs']} products) | "
                     f"{u['eigenvalue']:.6f} ({u['matvecs']} products, converged: {u['converged']}) |")
    (args.out / "fd_kinks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
