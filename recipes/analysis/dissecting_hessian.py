#!/usr/bin/env python
"""Reproduce the structure findings of "Dissecting Hessian" (Wu, Zhu et al. 2020) on small nets.

For small MLPs and CNNs trained on the 8x8 digits (CPU, one thread, under 2 minutes), with and without
BatchNorm, several seeds each, and for every Linear/Conv2d layer's *weight* Hessian (exact, by
Lanczos on :class:`hessopt.HessianOperator` with ``params=[layer.weight]``, on a fixed set of
training images, BatchNorm in eval mode):

1. **overlap across seeds** of the layer-wise top-k eigenspaces (k = 10 classes), against the chance
   level k/n; also the overlap of the input-side direction (top right singular vector of the reshaped
   top eigenvector) and of the output-side subspace (left singular vectors of the reshaped top-k
   eigenvectors), which are comparable across seeds only where the coordinates are fixed (pixels at
   the first layer's input, classes at the last layer's output: hidden units are permuted between
   independently trained networks);
2. **rank structure** of the reshaped top eigenvectors: stable rank and rank-one energy;
3. **Kronecker approximation** ``E[M] (x) E[xx^T]`` (:func:`hessopt.analysis.kronecker_factors`):
   overlap of its top-k eigenspace with the exact one, and its top eigenvalues against the exact ones.

Run:  python recipes/analysis/dissecting_hessian.py --out recipes/analysis/results/dissecting
Tiny smoke run:  ... --seeds 0 1 --epochs 2 --num-samples 128 --k 4
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from hessopt.analysis import eigenspace_overlap, kronecker_factors, low_rank_structure  # noqa: E402
from recipes.common import build_model, load_dataset  # noqa: E402


class MLP(nn.Module):
    """64 -> 64 -> 32 -> 10 ReLU network on flattened 8x8 digits, optional BatchNorm after each hidden Linear."""

    def __init__(self, batchnorm: bool, widths=(64, 64, 32), num_classes: int = 10):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Linear(a, b, bias=not batchnorm)]
            if batchnorm:
                layers += [nn.BatchNorm1d(b)]
            layers += [nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        return self.fc(self.features(x.flatten(1)))


def build(arch: str, batchnorm: bool) -> nn.Module:
    if arch == "mlp":
        return MLP(batchnorm)
    return build_model("digits_cnn", 10, in_chans=1, batchnorm=batchnorm)


def weight_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def side_subspace(V: torch.Tensor, shape, side: str, r: int) -> torch.Tensor:
    """Top-r left (output side) or right (input side) singular vectors of the reshaped eigenvectors, stacked."""
    m = shape[0]
    d = V.shape[0] // m
    mats = [V[:, i].double().reshape(m, d) for i in range(V.shape[1])]
    if side == "input":
        U = torch.linalg.svd(torch.cat(mats, 0), full_matrices=False)[2].T  # (d, .)
    else:
        U = torch.linalg.svd(torch.cat(mats, 1), full_matrices=False)[0]  # (m, .)
    return U[:, :r]


def analyze_model(model, batch, k, tol, seed):
    rows = {}
    loss_fn = nn.CrossEntropyLoss()
    for name, layer in weight_layers(model):
        t0 = time.perf_counter()
        kf = kronecker_factors(model, layer, loss_fn, batch, k=k, exact=True, tol=tol, generator=seed, max_matvecs=400)
        V = kf.exact_eigenvectors
        shape = tuple(layer.weight.shape)
        top = low_rank_structure(V[:, 0], shape)
        ranks = [low_rank_structure(V[:, i], shape).stable_rank for i in range(V.shape[1])]
        S_eigs = torch.linalg.eigvalsh(kf.output_factor).flip(0)
        A_eigs = torch.linalg.eigvalsh(kf.input_factor).flip(0)
        reduce = {}
        if isinstance(layer, nn.Conv2d):  # positions matter: also the "reduce" factorization
            kr = kronecker_factors(model, layer, loss_fn, batch, k=k, exact=False, positions="reduce")
            reduce = {"kron_reduce_eigenvalues": kr.eigenvalues.tolist(),
                      "kron_reduce_exact_overlap": eigenspace_overlap(kr.eigenvectors, V, orthonormalize=True)}
        rows[name] = {
            "shape": list(shape),
            "num_params": layer.weight.numel(),
            "exact_eigenvalues": kf.exact_eigenvalues.tolist(),
            "kron_eigenvalues": kf.eigenvalues.tolist(),
            "kron_exact_overlap": kf.overlap,
            "top_eigvec_stable_rank": top.stable_rank,
            "top_eigvec_rank1_energy": top.rank1_energy,
            "topk_mean_stable_rank": sum(ranks) / len(ranks),
            "top_eigvec_singular_values": (top.singular_values / top.singular_values[0]).tolist()[:10],
            "input_factor_top_share": float(A_eigs[0] / A_eigs.clamp_min(0).sum()),
            "output_factor_top_eigs": S_eigs[:k].tolist(),
            **reduce,
            "seconds": time.perf_counter() - t0,
            "_V": V.detach().cpu(),
        }
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/dissecting_hessian")
    p.add_argument("--archs", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--num-samples", type=int, default=512, help="training images the Hessians are taken on")
    p.add_argument("--k", type=int, default=10, help="top eigenspace dimension (the number of classes)")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (tiny models: 1 is fastest, and far faster on a shared machine)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--from-results", default=None, help="only rewrite summary.md and the plots from a results.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        import json

        results = json.loads(Path(args.from_results).read_text())
        results["models"] = {k: {int(s): v for s, v in per.items()} for k, per in results["models"].items()}
        (out / "summary.md").write_text(summarize(results))
        if not args.no_plots:
            plot(results, out)
        return results
    device = common.pick_device(args.device)
    torch.set_num_threads(args.threads)
    data = load_dataset("digits")
    batch = common.eval_batches(data, "train", 1, args.num_samples, device)[0]
    test = common.eval_batches(data, "test", 1, data.test_x.shape[0], device)
    results = {"config": vars(args), "models": {}, "overlaps": {}}
    started = time.perf_counter()
    for arch, bn in itertools.product(args.archs, [False, True]):
        key = f"{arch}{'_bn' if bn else ''}"
        per_seed = {}
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = build(arch, bn).to(device)
            hist = common.train(model, data, epochs=args.epochs, batch_size=64, lr=args.lr, device=device, seed=seed,
                                augment=False, flip=False, weight_decay=5e-4, warmup_epochs=1)
            acc = common.accuracy(model, test)
            rows = analyze_model(model, batch, args.k, args.tol, seed)
            per_seed[seed] = {"test_accuracy": acc, "final_train_loss": hist["loss"][-1], "layers": rows}
            print(f"{key} seed {seed}: test acc {acc:.3f}; " + "; ".join(
                f"{n}: λ1 {r['exact_eigenvalues'][0]:.3g}, kron-overlap {r['kron_exact_overlap']:.2f}, "
                f"srank {r['top_eigvec_stable_rank']:.2f}" for n, r in rows.items()), flush=True)
        # overlaps across seeds
        layer_names = list(per_seed[args.seeds[0]]["layers"])
        ov = {}
        for name in layer_names:
            full, inp, outp = [], [], []
            for s1, s2 in itertools.combinations(args.seeds, 2):
                r1, r2 = per_seed[s1]["layers"][name], per_seed[s2]["layers"][name]
                V1, V2 = r1["_V"], r2["_V"]
                full.append(eigenspace_overlap(V1, V2, orthonormalize=True))
                shape = r1["shape"]
                inp.append(eigenspace_overlap(side_subspace(V1, shape, "input", 1), side_subspace(V2, shape, "input", 1)))
                r = min(args.k - 1, shape[0])
                outp.append(eigenspace_overlap(side_subspace(V1, shape, "output", r), side_subspace(V2, shape, "output", r)))
            n = per_seed[args.seeds[0]]["layers"][name]["num_params"]
            m, d = shape[0], n // shape[0]
            ov[name] = {
                "full": sum(full) / len(full), "full_all": full, "chance_full": args.k / n,
                "input_side": sum(inp) / len(inp), "chance_input": 1 / d,
                "output_side": sum(outp) / len(outp), "chance_output": min(args.k - 1, m) / m,
            }
        results["overlaps"][key] = ov
        for seed in per_seed:
            for r in per_seed[seed]["layers"].values():
                r.pop("_V")
        results["models"][key] = per_seed
    return common.finish(results, out, started, summarize, plot, args.no_plots)


def _mean(xs):
    return sum(xs) / len(xs)


def summarize(results) -> str:
    lines = ["| model | layer | weight | test acc | λ1 exact | λ1 Kron | Kron vs exact overlap | λ1 / overlap Kron-reduce | "
             "stable rank top eigvec | rank-1 energy | overlap across seeds (chance) | input side (chance) | output side (chance) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, per_seed in results["models"].items():
        seeds = list(per_seed)
        acc = _mean([per_seed[s]["test_accuracy"] for s in seeds])
        for name in per_seed[seeds[0]]["layers"]:
            rs = [per_seed[s]["layers"][name] for s in seeds]
            ov = results["overlaps"][key][name]
            red = "n/a (P = 1)"
            if "kron_reduce_eigenvalues" in rs[0]:
                red = (f"{_mean([r['kron_reduce_eigenvalues'][0] for r in rs]):.3g} / "
                       f"{_mean([r['kron_reduce_exact_overlap'] for r in rs]):.2f}")
            lines.append(
                f"| {key} | `{name}` | {'x'.join(map(str, rs[0]['shape']))} | {100 * acc:.1f}% "
                f"| {_mean([r['exact_eigenvalues'][0] for r in rs]):.3g} | {_mean([r['kron_eigenvalues'][0] for r in rs]):.3g} "
                f"| {_mean([r['kron_exact_overlap'] for r in rs]):.2f} | {red} "
                f"| {_mean([r['top_eigvec_stable_rank'] for r in rs]):.2f} "
                f"| {_mean([r['top_eigvec_rank1_energy'] for r in rs]):.2f} "
                f"| {ov['full']:.2f} ({ov['chance_full']:.3f}) | {ov['input_side']:.2f} ({ov['chance_input']:.3f}) "
                f"| {ov['output_side']:.2f} ({ov['chance_output']:.2f}) |")
    return "\n".join(lines) + "\n"


def plot(results, out: Path):
    from matplotlib.figure import Figure

    keys = list(results["models"])
    fig = Figure(figsize=(10, 3.0), dpi=70, layout="constrained")
    axes = fig.subplots(1, 3)
    labels, full, chance, kron, kron_red, srank = [], [], [], [], [], []
    for key in keys:
        per_seed = results["models"][key]
        seeds = list(per_seed)
        for name in per_seed[seeds[0]]["layers"]:
            rs = [per_seed[s]["layers"][name] for s in seeds]
            labels.append(f"{key}:{name.split('.')[-1]}")
            full.append(results["overlaps"][key][name]["full"])
            chance.append(results["overlaps"][key][name]["chance_full"])
            kron.append(_mean([r["kron_exact_overlap"] for r in rs]))
            kron_red.append(_mean([r.get("kron_reduce_exact_overlap", r["kron_exact_overlap"]) for r in rs]))
            srank.append(_mean([r["top_eigvec_stable_rank"] for r in rs]))
    xs = list(range(len(labels)))
    axes[0].bar(xs, full, label="across seeds")
    axes[0].plot(xs, chance, "k_", markersize=10, label="chance k/n")
    axes[0].set_title("top-k eigenspace overlap across seeds", fontsize=9)
    axes[1].bar([x - 0.2 for x in xs], kron, width=0.4, color="C1", label="expand (KFC)")
    axes[1].bar([x + 0.2 for x in xs], kron_red, width=0.4, color="C3", label="reduce")
    axes[1].set_title("overlap: Kronecker vs exact top-k", fontsize=9)
    axes[2].bar(xs, srank, color="C2")
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[2].set_title("stable rank of reshaped top eigenvector", fontsize=9)
    for ax in axes:
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
    axes[0].set_ylim(0, 1)
    axes[1].set_ylim(0, 1)
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=6)
    fig.savefig(out / "dissecting_summary.png")

    fig = Figure(figsize=(10, 2.4), dpi=60, layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        per_seed = results["models"][key]
        first = per_seed[list(per_seed)[0]]
        for j, (name, r) in enumerate(first["layers"].items()):
            ax.semilogy(r["exact_eigenvalues"], "o-", color=f"C{j}", ms=3, label=f"{name} exact")
            best = r.get("kron_reduce_eigenvalues", r["kron_eigenvalues"])
            ax.semilogy(best, "x--", color=f"C{j}", ms=4, label=f"{name} Kron" + (" (reduce)" if "kron_reduce_eigenvalues" in r else ""))
        ax.set_title(f"{key}: top-k eigenvalues (seed {list(per_seed)[0]})", fontsize=8)
        ax.set_xlabel("index")
        ax.legend(fontsize=5)
    fig.savefig(out / "dissecting_eigenvalues.png")


if __name__ == "__main__":
    main()
