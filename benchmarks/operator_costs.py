"""Cost of one product of each curvature operator, relative to one gradient (forward + backward).

    OMP_NUM_THREADS=1 python benchmarks/operator_costs.py [--device cpu|cuda] [--repeats 20] [--json OUT]

Model: a small CNN (conv 3->16 -> BatchNorm (eval) -> ReLU -> conv 16->32 -> ReLU -> pool ->
linear 32->10, about 5k parameters; batch 64 of 3x32x32, cross-entropy). Every operator is timed
with its graph/gradient cache off (each product pays its own forward pass, like a data-set
operator) and, where it has one, with the cache on (a single batch, the products after the first).
Median of ``--repeats`` runs after two warm-up runs. Timings on a shared machine are noisy: say so
next to any figure taken from this script.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hessopt  # noqa: E402


def build(device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (64,), generator=gen).to(device)
    return model, (x, y)


def timed(fn, repeats, device):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model, (x, y) = build(device)
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())

    def gradient():
        torch.autograd.grad(loss_fn(model(x), y), params)

    base = timed(gradient, args.repeats, device)
    ops = {
        "hessian (double backward)": hessopt.HessianOperator(model, loss_fn, (x, y), cache_graph=False),
        "hessian (double backward, cached graph)": hessopt.HessianOperator(model, loss_fn, (x, y)),
        "hessian (forward-over-reverse)": hessopt.HessianOperator(model, loss_fn, (x, y), method="forward_over_reverse"),
        "hessian (finite differences)": hessopt.HessianOperator(model, loss_fn, (x, y), method="finite_difference"),
        "ggn": hessopt.GGNOperator(model, loss_fn, (x, y), cache_graph=False),
        "ggn (cached backward graph)": hessopt.GGNOperator(model, loss_fn, (x, y)),
        "ggn (finite differences)": hessopt.GGNOperator(model, loss_fn, (x, y), method="finite_difference"),
        "empirical fisher (vmap)": hessopt.EmpiricalFisherOperator(model, loss_fn, (x, y), cache_gradients=False),
        "empirical fisher (cached per-sample gradients)": hessopt.EmpiricalFisherOperator(model, loss_fn, (x, y)),
    }
    rows = {}
    for name, op in ops.items():
        v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(2)).to(device)
        seconds = timed(lambda: op @ v, args.repeats, device)
        rows[name] = {"seconds": seconds, "x_gradient": seconds / base}
    record = {
        "command": " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}", "python"] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs" if device.type == "cpu"
        else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "num_params": sum(p.numel() for p in params),
        "gradient_seconds": base,
        "products": rows,
    }
    print(f"one gradient: {base * 1e3:.2f} ms ({record['num_params']} parameters, {record['machine']}, "
          f"{record['torch_threads']} thread(s), {record['date']})")
    for name, row in rows.items():
        print(f"  {name:48s} {row['seconds'] * 1e3:8.2f} ms  {row['x_gradient']:5.2f}x gradient")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
