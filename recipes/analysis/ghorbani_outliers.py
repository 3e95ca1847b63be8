#!/usr/bin/env python
"""Ghorbani, Krishnan & Xiao (ICML 2019): Hessian outliers and gradient concentration, with and without BN.

Trains a CIFAR ResNet with and without BatchNorm (:func:`recipes.common.build_model`) and, every
``--every`` steps (and at initialization), measures on a fixed set of training images:

* the top-``k`` Hessian eigenvalues (k = 10 = number of classes; Lanczos, residual-checked);
* the eigenvalue density (SLQ, full reorthogonalization, float64 tridiagonal; the paper used 80-90
  Lanczos steps and several runs);
* the gradient concentration ``||V_k^T g||^2 / ||g||^2`` of the full-batch gradient (on the same
  images) in the top-k eigenspace (Gur-Ari et al. 2018; Ghorbani et al. section 4).

The paper's finding to test: without BN, large isolated outlier eigenvalues appear early in training
and the gradient concentrates in their eigenspace; with BN the outliers are much smaller relative to
the bulk and the concentration is weaker. The Hessian is taken in BatchNorm's train mode by default
(batch statistics: the loss the optimizer actually descends; running statistics untouched), as the
paper analyzes the training loss; ``--bn-mode eval`` for the inference-mode network.

Scale (honest): the paper trained ResNet-32 on CIFAR-10 for tens of thousands of steps and ran 80-90
Lanczos steps on the full data set; the default here is ResNet-20 for 4 epochs (about 780 steps at
batch 256), with 7 measurements on 512 training images and 60 Lanczos steps: about 4 minutes on one
H100 for both variants.

GPU (about 4 min on one H100):
    python recipes/analysis/ghorbani_outliers.py --device cuda --data-dir ../shared/data/cifar10-jpeg.tar.xz \\
        --out runs/ghorbani_outliers
CPU smoke test (digits, about a minute):
    python recipes/analysis/ghorbani_outliers.py --device cpu --dataset digits --model cifar_resnet8 --epochs 1 \\
        --every 10 --hessian-samples 128 --density-steps 20 --k 4 --out /tmp/gh
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hessopt  # noqa: E402
from hessopt.analysis import gradient_concentration  # noqa: E402
from recipes.common import build_model  # noqa: E402


def measure(model, batches, args, step, epoch):
    t0 = time.perf_counter()
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), batches, bn_mode=args.bn_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        top = hessopt.top_eigenvalues(op, k=args.k, tol=1e-3, max_matvecs=args.max_matvecs, generator=args.seed)
    conc = gradient_concentration(op, k=args.k, eigenvectors=top)
    dens = hessopt.spectral_density(op, num_runs=1, num_steps=args.density_steps, generator=args.seed + step)
    nodes, weights = torch.cat(dens.nodes), torch.cat(dens.weights) / len(dens.nodes)
    order = torch.argsort(nodes)
    cum = torch.cumsum(weights[order], 0)
    # bulk edge: the eigenvalue below which 99% of the spectral mass lies (outliers carry ~k/n of it)
    bulk_edge = float(nodes[order][min(int(torch.searchsorted(cum, torch.tensor(0.99, dtype=cum.dtype))), len(cum) - 1)])
    return {
        "step": step, "epoch": epoch, "loss": op.loss(),
        "eigenvalues": top.eigenvalues.tolist(), "error_bounds": top.error_bounds.tolist(),
        "converged": top.converged,
        "concentration": conc.fraction, "per_direction": conc.per_direction.tolist(), "gradient_norm": conc.gradient_norm,
                "bulk_edge": bulk_edge,
        "density": {"grid": dens.grid.tolist(), "density": dens.density.tolist(),
                    "nodes": [t.tolist() for t in dens.nodes], "weights": [w.tolist() for w in dens.weights]},
        "seconds": time.perf_counter() - t0,
        "matvecs": top.num_matvecs + dens.num_matvecs,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_study_args(p, out="runs/ghorbani_outliers", bn_mode="train")
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--every", type=int, default=130, help="measure every N optimizer steps (and at step 0 and the end)")
    p.add_argument("--k", type=int, default=10, help="top eigenvalues and eigenspace dimension (classes)")
    p.add_argument("--max-matvecs", type=int, default=80)
    p.add_argument("--density-steps", type=int, default=60)
    args = p.parse_args(argv)
    started = time.perf_counter()
    device, out, data, hess_data, test = common.load_study_data(args)
    augment = args.dataset == "cifar10"
    results = {"config": vars(args), "device": str(device), "runs": {}}
    for bn in (False, True):
        name = f"{args.model}{'' if bn else '_noBN'}"
        torch.manual_seed(args.seed)
        model = build_model(args.model, data.num_classes, in_chans=data.in_chans, batchnorm=bn).to(device)
        records = []

        def callback(step, epoch):
            try:
                rec = measure(model, hess_data, args, step, epoch)
            except hessopt.NonFiniteCurvatureError as err:  # diverged: keep the record, skip it in tables
                records.append({"step": step, "epoch": epoch, "non_finite": str(err)})
                print(f"{name:22s} step {step:5d}: non-finite loss/curvature", flush=True)
                return
            records.append(rec)
            print(f"{name:22s} step {step:5d}: loss {rec['loss']:.3f} λ1..k {rec['eigenvalues'][0]:.3g}..{rec['eigenvalues'][-1]:.3g} "
                  f"bulk(99%) {rec['bulk_edge']:.3g} grad in top-{args.k}: {rec['concentration']:.3f} ({rec['seconds']:.1f}s)",
                  flush=True)

        t0 = time.perf_counter()
        hist = common.train(model, data, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr if bn else args.lr_no_bn, device=device, seed=args.seed, augment=augment,
                            flip=augment, warmup_epochs=args.warmup_epochs,
                            max_steps_per_epoch=args.max_steps_per_epoch, callback=callback, callback_every=args.every)
        results["runs"][name] = {
            "batchnorm": bn, "records": records, "train_loss": hist["loss"],
            "diverged": bool(hist.get("diverged", False)),
            "test_accuracy": None if hist.get("diverged") else common.accuracy(model, test),
            "seconds": time.perf_counter() - t0,
        }
        common.save_json(results, out / "results.json")
    return common.finish(results, out, started, summarize, plot, args.no_plots)


def summarize(results) -> str:
    k = results["config"]["k"]
    lines = [f"| model | step | loss | λ1 | λ{k} | bulk edge (99% of spectral mass) | λ1 / bulk edge | gradient in top-{k} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in results["runs"].items():
        for r in (r for r in run["records"] if "non_finite" not in r):
            ratio = r["eigenvalues"][0] / r["bulk_edge"] if r["bulk_edge"] > 0 else float("nan")
            lines.append(f"| {name} | {r['step']} | {r['loss']:.3f} | {r['eigenvalues'][0]:.4g} | {r['eigenvalues'][-1]:.4g} "
                         f"| {r['bulk_edge']:.3g} | {ratio:.3g} | {r['concentration']:.3f} |")
        acc = run["test_accuracy"]
        lines.append(f"| {name} | final test accuracy | {'diverged' if acc is None else f'{100 * acc:.1f}%'} | | | | | |")
    return "\n".join(lines) + "\n"


def plot(results, out: Path):
    from matplotlib.figure import Figure

    names = list(results["runs"])
    fig = Figure(figsize=(10, 2.8), dpi=80, layout="constrained")
    axes = fig.subplots(1, 3)
    for i, name in enumerate(names):
        recs = [r for r in results["runs"][name]["records"] if "non_finite" not in r]
        if not recs:
            continue
        steps = [r["step"] for r in recs]
        top = [r["eigenvalues"][0] for r in recs]
        kth = [r["eigenvalues"][-1] for r in recs]
        axes[0].semilogy(steps, [max(v, 1e-6) for v in top], "o-", color=f"C{i}", ms=3, label=f"{name} λ1")
        axes[0].semilogy(steps, [max(v, 1e-6) for v in kth], "x--", color=f"C{i}", ms=3, label=f"{name} λk")
        axes[1].plot(steps, [r["concentration"] for r in recs], "o-", color=f"C{i}", ms=3, label=name)
        last = recs[-1]["density"]
        axes[2].semilogy(last["grid"], [max(v, 1e-8) for v in last["density"]], color=f"C{i}", lw=1, label=name)
    axes[0].set_title("top eigenvalues during training", fontsize=9)
    axes[0].set_xlabel("step")
    axes[1].set_title("fraction of ||g||² in top-k eigenspace", fontsize=9)
    axes[1].set_xlabel("step")
    axes[1].set_ylim(0, 1)
    axes[2].set_title("density at the end", fontsize=9)
    axes[2].set_xlabel("eigenvalue")
    axes[2].set_ylim(bottom=1e-8)
    for ax in axes:
        ax.legend(fontsize=6)
    fig.savefig(out / "ghorbani.png")


if __name__ == "__main__":
    main()
