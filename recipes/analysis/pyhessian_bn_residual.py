#!/usr/bin/env python
"""PyHessian (Yao et al. 2020, section 4): does BatchNorm smooth the landscape? do residual connections?

Trains CIFAR ResNets of several depths in four variants (BatchNorm on/off x residual connections
on/off, built by :func:`recipes.common.build_model`) for a few epochs on CIFAR-10, then measures the
Hessian of the training loss on a fixed set of training images (no augmentation, BatchNorm with
running statistics): top eigenvalue (Lanczos, residual-checked), trace (Hutch++, with standard
error) and the eigenvalue density (SLQ). PyHessian's finding to test: without BN, shallow nets are
*flatter* (smaller top eigenvalue and trace) than with BN, deep nets are much sharper; removing the
residual connections makes the deep nets sharper still: "BN does not always smooth; residual
connections do".

Scale (honest): PyHessian trained each model to convergence (~160+ epochs); the default here is
3 epochs per model (about 4 minutes for all 12 models on one H100), so these are spectra early in
training. Use --epochs to go further.

GPU (about 4 min on one H100):
    python recipes/analysis/pyhessian_bn_residual.py --device cuda --data-dir ../shared/data/cifar10-jpeg.tar.xz \\
        --out runs/pyhessian_bn_residual
CPU at reduced scale (the run in RESULTS.md: ResNet8/20, 1 epoch on 5,000 training images, Hessian on
64 of them), one process per model under nice, then merged:
    for d in 8 20; do for v in bn-res bn-plain nobn-res nobn-plain; do
      nice -n 10 python recipes/analysis/pyhessian_bn_residual.py --device cpu --threads 1 --depths $d \
        --variants $v --epochs 1 --train-subset 5000 --batch-size 64 --warmup-epochs 0.3 --hessian-samples 64 \
        --hessian-batch 64 --top-tol 1e-2 --top-max-matvecs 20 --trace-matvecs 12 --density-steps 20 \
        --test-samples 1000 --no-plots --out runs/pyh${d}_$v &
    done; done; wait
    python recipes/analysis/pyhessian_bn_residual.py --merge runs/pyh*_* --out recipes/analysis/results/pyhessian_cpu
CPU smoke test (digits, about a minute):
    python recipes/analysis/pyhessian_bn_residual.py --device cpu --dataset digits --depths 8 14 --epochs 1 \\
        --hessian-samples 128 --density-steps 20 --trace-matvecs 9 --out /tmp/pyh
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hessopt  # noqa: E402
from recipes.common import build_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_study_args(p, out="runs/pyhessian_bn_residual", bn_mode="eval")
    p.add_argument("--depths", nargs="+", type=int, default=[20, 32, 56])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--trace-matvecs", type=int, default=30)
    p.add_argument("--density-steps", type=int, default=40)
    p.add_argument("--top-tol", type=float, default=1e-3, help="Lanczos tolerance of the top eigenvalue")
    p.add_argument("--top-max-matvecs", type=int, default=60)
    p.add_argument("--train-subset", type=int, default=None,
                   help="train on a fixed random subset of this many training images (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--variants", nargs="+", default=["bn-res", "bn-plain", "nobn-res", "nobn-plain"],
                   choices=["bn-res", "bn-plain", "nobn-res", "nobn-plain"],
                   help="which of the four variants to run (split a study over processes, then --merge)")
    p.add_argument("--test-samples", type=int, default=4000, help="test images for the accuracy (at most 4000)")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="only merge the results.json of these runs into --out (summary, plots)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), args.no_plots)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    device, out, data, hess_data, test = common.load_study_data(args)
    if args.train_subset is not None and args.train_subset < data.train_x.shape[0]:
        # a fixed random subset (the JPEG folders are stored class by class); the Hessian images are
        # drawn by common.eval_batches from the full set with its own seed, so they mostly lie outside
        # the subset: pin them to the subset's first images instead, so the Hessian is of the
        # training loss the models were trained on
        idx = torch.randperm(data.train_x.shape[0], generator=torch.Generator().manual_seed(args.seed + 7))
        idx = idx[: args.train_subset]
        data = dataclasses.replace(data, train_x=data.train_x[idx], train_y=data.train_y[idx])
        hess_data = common.eval_batches(data, "train", max(1, args.hessian_samples // args.hessian_batch),
                                        min(args.hessian_batch, args.hessian_samples), device)
    if args.test_samples < sum(len(y) for _, y in test):
        x_all, y_all = torch.cat([x for x, _ in test]), torch.cat([y for _, y in test])
        test = [(x_all[: args.test_samples], y_all[: args.test_samples])]
    augment = args.dataset == "cifar10"
    print(f"data {args.dataset}: {data.train_x.shape[0]} train images; Hessian on "
          f"{sum(len(y) for _, y in hess_data)} of them; {sum(len(y) for _, y in test)} test images; "
          f"device {device}", flush=True)
    results = {"config": vars(args), "device": str(device), "runs": []}
    loss_fn = nn.CrossEntropyLoss()
    for depth, bn, res in itertools.product(args.depths, [True, False], [True, False]):
        if f"{'bn' if bn else 'nobn'}-{'res' if res else 'plain'}" not in args.variants:
            continue
        name = f"resnet{depth}{'' if bn else '_noBN'}{'' if res else '_plain'}"
        torch.manual_seed(args.seed)
        model = build_model(f"cifar_resnet{depth}", data.num_classes, in_chans=data.in_chans,
                            batchnorm=bn, residual=res).to(device)
        t0 = time.perf_counter()
        hist = common.train(model, data, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr if bn else args.lr_no_bn, device=device, seed=args.seed, augment=augment,
                            flip=augment, warmup_epochs=args.warmup_epochs,
                            max_steps_per_epoch=args.max_steps_per_epoch)
        train_s = time.perf_counter() - t0
        row = {"name": name, "depth": depth, "batchnorm": bn, "residual": res, "train_seconds": train_s,
               "final_train_loss": hist["loss"][-1] if hist["loss"] else None,
               "diverged": bool(hist.get("diverged", False))}
        if not row["diverged"]:
            row["test_accuracy"] = common.accuracy(model, test)
            t0 = time.perf_counter()
            # keep the first-order graph between products (a few hundred images: it fits; each product
            # then costs a double backward only, not also a forward and backward)
            op = hessopt.HessianOperator(model, loss_fn, hess_data, bn_mode=args.bn_mode, cache_graph=True)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    top = hessopt.top_eigenvalues(op, k=1, tol=args.top_tol, max_matvecs=args.top_max_matvecs,
                                                  generator=args.seed)
                tr = hessopt.trace(op, num_matvecs=args.trace_matvecs, generator=args.seed)
                dens = hessopt.spectral_density(op, num_runs=1, num_steps=args.density_steps, generator=args.seed)
            except hessopt.NonFiniteCurvatureError as err:
                row["diverged"], row["non_finite"] = True, str(err)
        if not row["diverged"]:
            row.update({
                "loss": op.loss(),
                "top_eigenvalue": float(top.eigenvalues[0]),
                "top_error_bound": float(top.error_bounds[0]),
                "top_converged": top.converged,
                "trace": tr.estimate, "trace_std_error": tr.std_error,
                "density": {"grid": dens.grid.tolist(), "density": dens.density.tolist(),
                            "nodes": [t.tolist() for t in dens.nodes], "weights": [w.tolist() for w in dens.weights]},
                "hessian_matvecs": top.num_matvecs + tr.num_matvecs + dens.num_matvecs,
                "hessian_seconds": time.perf_counter() - t0,
            })
            print(f"{name:24s} train {train_s:6.1f}s loss {row['final_train_loss']:.3f} test acc "
                  f"{row['test_accuracy']:.3f} | λ1 {row['top_eigenvalue']:9.3f} trace {tr.estimate:10.1f} ± "
                  f"{tr.std_error:6.1f} ({row['hessian_seconds']:.1f}s)", flush=True)
        else:
            print(f"{name:24s} diverged", flush=True)
        results["runs"].append(row)
        common.save_json(results, out / "results.json")
    return common.finish(results, out, started, summarize, plot, args.no_plots)


def merge(dirs, out: Path, no_plots: bool):
    """One results.json / summary.md / plots from runs of the same study split over processes."""
    parts = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    order = {(bn, res): i for i, (bn, res) in enumerate(VARIANTS)}
    runs = sorted((r for part in parts for r in part["runs"]),
                  key=lambda r: (r["depth"], order[(r["batchnorm"], r["residual"])]))
    results = {"config": parts[0]["config"], "device": parts[0]["device"], "runs": runs,
               "merged_from": [str(d) for d in dirs],
               "part_seconds": [part.get("seconds") for part in parts]}
    out.mkdir(parents=True, exist_ok=True)
    common.save_json(results, out / "results.json")
    summary = summarize(results)
    (out / "summary.md").write_text(summary)
    print(summary)
    if not no_plots:
        plot(results, out)
    return results


def summarize(results) -> str:
    lines = ["| model | BN | residual | train loss | test acc | top eigenvalue | trace ± s.e. |",
             "|---|:-:|:-:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        if r["diverged"]:
            lines.append(f"| {r['name']} | {'yes' if r['batchnorm'] else 'no'} | {'yes' if r['residual'] else 'no'} | diverged | | | |")
            continue
        lines.append(
            f"| {r['name']} | {'yes' if r['batchnorm'] else 'no'} | {'yes' if r['residual'] else 'no'} "
            f"| {r['final_train_loss']:.3f} | {100 * r['test_accuracy']:.1f}% | {r['top_eigenvalue']:.4g} "
            f"| {r['trace']:.4g} ± {r['trace_std_error']:.2g} |")
    return "\n".join(lines) + "\n"


def plot(results, out: Path):
    from matplotlib.figure import Figure

    runs = [r for r in results["runs"] if not r["diverged"]]
    depths = sorted({r["depth"] for r in runs})
    fig = Figure(figsize=(3.2 * len(depths), 2.8), dpi=80, layout="constrained")
    axes = fig.subplots(1, len(depths), squeeze=False)[0]
    for ax, depth in zip(axes, depths):
        for r in (r for r in runs if r["depth"] == depth):
            d = r["density"]
            ax.semilogy(d["grid"], [max(v, 1e-8) for v in d["density"]], lw=1,
                        label=f"{'BN' if r['batchnorm'] else 'no BN'}, {'res' if r['residual'] else 'plain'}")
        ax.set_ylim(bottom=1e-8)
        ax.set_title(f"ResNet{depth}: Hessian ESD", fontsize=9)
        ax.set_xlabel("eigenvalue")
        ax.legend(fontsize=6)
    fig.savefig(out / "pyhessian_density.png")
    fig = Figure(figsize=(7, 2.6), dpi=80, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for bn, res in itertools.product([True, False], [True, False]):
        rs = sorted((r for r in runs if r["batchnorm"] == bn and r["residual"] == res), key=lambda r: r["depth"])
        label = f"{'BN' if bn else 'no BN'}, {'res' if res else 'plain'}"
        ax1.semilogy([r["depth"] for r in rs], [max(r["top_eigenvalue"], 1e-6) for r in rs], "o-", label=label)
        ax2.semilogy([r["depth"] for r in rs], [max(r["trace"], 1e-6) for r in rs], "o-", label=label)
    ax1.set_title("top eigenvalue", fontsize=9)
    ax2.set_title("trace", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xlabel("depth")
        ax.legend(fontsize=6)
    fig.savefig(out / "pyhessian_top_trace.png")
    plot_grid(runs, out)


VARIANTS = ((True, True), (True, False), (False, True), (False, False))


def plot_grid(runs, out: Path):
    """One ESD panel per model, as in PyHessian's figures: rows = depth, columns = BN x residual;
    log density, each panel annotated with the top eigenvalue and the trace."""
    from matplotlib.figure import Figure

    depths = sorted({r["depth"] for r in runs})
    fig = Figure(figsize=(12, 2.6 * len(depths)), dpi=80, layout="constrained")
    axes = fig.subplots(len(depths), len(VARIANTS), squeeze=False)
    for i, depth in enumerate(depths):
        for j, (bn, res) in enumerate(VARIANTS):
            ax = axes[i][j]
            title = f"ResNet{depth}, {'BN' if bn else 'no BN'}, {'residual' if res else 'no residual'}"
            ax.set_title(title, fontsize=9)
            found = [r for r in runs if r["depth"] == depth and r["batchnorm"] == bn and r["residual"] == res]
            if not found:
                ax.text(0.5, 0.5, "diverged / not run", ha="center", va="center", transform=ax.transAxes)
                continue
            r = found[0]
            d = r["density"]
            ax.semilogy(d["grid"], [max(v, 1e-8) for v in d["density"]], lw=1, color="C0")
            ax.set_ylim(1e-8, None)
            ax.set_xlabel("eigenvalue", fontsize=8)
            if j == 0:
                ax.set_ylabel("density (log)", fontsize=8)
            ax.text(0.97, 0.95, f"λ1 = {r['top_eigenvalue']:.3g}\ntrace = {r['trace']:.3g}\n"
                    f"test acc {100 * r['test_accuracy']:.1f}%", ha="right", va="top",
                    transform=ax.transAxes, fontsize=7)
    fig.savefig(out / "pyhessian_esd_grid.png")


if __name__ == "__main__":
    main()
