#!/usr/bin/env python
"""Prune a trained digits CNN by Hessian sensitivity, against magnitude pruning at equal sparsity.

One-shot pruning (no fine-tuning afterwards, so the table measures the ranking alone) of the zoo's
``digits_cnn`` without BatchNorm (conv 3x3 16 -> conv 3x3 stride 2 32 -> pool -> linear; biases in
the convs, 5,130 parameters) trained on scikit-learn's 8x8 digits, several seeds. The Hessian is
that of the mean cross-entropy on the whole training set (1,437 images), and all Hessian scores
come from **one** call of :func:`hessopt.analysis.hessian_sensitivity` per model (``--num-probes``
Rademacher probes, full-model Hessian-vector products):

Unstructured (weights of conv1, conv2, fc; biases kept), global ranking over all layers:

* ``magnitude``: remove the smallest ``|w_i|``;
* ``obd``: Optimal Brain Damage (LeCun, Denker & Solla 1990), remove the smallest saliency
  ``0.5 * H_ii * w_i^2`` with ``H_ii`` the Hutchinson diagonal estimate (negative estimates,
  from noise or negative curvature, are clipped to 0: the quadratic model then predicts no loss);
* ``channel-trace``: OBD with each entry's ``H_ii`` replaced by its output channel's average trace
  ``avg_trace_c`` (pooling 10-145 entries per estimate, like AdaHessian's spatial averaging);
* ``avg-trace``: the layer-level version, ``avg_trace(layer) * w_i^2`` (HAWQ-V2's sensitivity used
  as a per-layer weight on magnitude: only one number per layer is estimated, so it is far less noisy).

With ``--check-diagonal`` the first seed's exact diagonals of ``conv1.weight`` and ``fc.weight``
(dense layer Hessians, 144 + 320 products) are compared with the Hutchinson estimates: how noisy is
the per-entry curvature that OBD ranks by?

Structured (output channels of conv1 and conv2: weight slice and bias; the classifier rows are
classes and are kept), global ranking over both layers, sparsity = fraction of the 48 channels:

* ``channel-norm``: remove the smallest ``||W_c||^2``;
* ``channel-hessian``: remove the smallest ``avg_trace_c * ||W_c||^2`` (the second-order loss
  increase of zeroing channel c with its Hessian block replaced by its average trace, the
  quantization-perturbation score with Q(W_c) = 0);
* ``channel-quadratic``: remove the smallest second-order Taylor estimate of the loss change of
  zeroing the channel alone, ``-g_c^T W_c + 0.5 W_c^T H_cc W_c`` (one Hessian-vector product per
  channel, 48 in all: the whole channel block instead of its average trace).

Run (CPU, one thread; a few minutes per seed on a busy 2-core machine, seeds can run in parallel and be --merge'd):
    python recipes/analysis/prune_by_sensitivity.py --out recipes/analysis/results/prune
Smoke test:  ... --seeds 0 --epochs 1 --num-probes 4 --sparsities 0.5 --no-plots
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path for recipes.common)

import hessopt  # noqa: E402
from hessopt.analysis import hessian_sensitivity  # noqa: E402
from recipes.common import build_model, load_dataset  # noqa: E402

UNSTRUCTURED = ("magnitude", "obd", "channel-trace", "avg-trace")
STRUCTURED = ("channel-norm", "channel-hessian", "channel-quadratic")
WEIGHTS = ("conv1.weight", "conv2.weight", "fc.weight")
CHANNEL_LAYERS = ("conv1", "conv2")


def prune_lowest(scores: Dict[str, torch.Tensor], fraction: float) -> Dict[str, torch.Tensor]:
    """Keep-masks removing the ``fraction`` of entries with the lowest scores, ranked across all tensors
    (ties broken by position, so exactly ``round(fraction * total)`` entries go)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = int(round(fraction * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    masks, o = {}, 0
    for name, s in scores.items():
        masks[name] = keep[o:o + s.numel()].reshape(s.shape)
        o += s.numel()
    return masks


def unstructured_scores(method: str, model: nn.Module, sens) -> Dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out = {}
    for name in WEIGHTS:
        w2 = params[name].detach().double().pow(2)
        layer = name.rsplit(".", 1)[0]
        if method == "magnitude":
            out[name] = w2
        elif method == "obd":
            block = sens[layer]
            diag = block.diagonal[block.param_names.index(name)]
            out[name] = 0.5 * diag.clamp_min(0) * w2
        elif method == "channel-trace":
            block = sens[layer]
            per_channel = block.channel_avg_trace.clamp_min(0).reshape(-1, *([1] * (w2.dim() - 1)))
            out[name] = 0.5 * per_channel * w2
        elif method == "avg-trace":
            out[name] = sens[layer].avg_trace * w2
        else:
            raise ValueError(method)
    return out


def channel_quadratic(op, model: nn.Module) -> Dict[str, torch.Tensor]:
    """``-g^T v_c + 0.5 v_c^T H v_c`` for ``v_c`` = channel c's weights and bias (zero elsewhere):
    the second-order loss change of zeroing that channel alone."""
    names = list(op.param_names)
    offsets = [0]
    for p in op.params:
        offsets.append(offsets[-1] + p.numel())
    g = op.gradient().double()
    flat = torch.cat([p.detach().reshape(-1) for p in op.params])
    out = {}
    for layer in CHANNEL_LAYERS:
        parts = [names.index(f"{layer}.weight"), names.index(f"{layer}.bias")]
        C = op.params[parts[0]].shape[0]
        scores = torch.empty(C, dtype=torch.float64)
        for c in range(C):
            v = torch.zeros_like(flat)
            for i in parts:
                block = v[offsets[i]:offsets[i + 1]].view(op.params[i].shape[0], -1)
                block[c] = flat[offsets[i]:offsets[i + 1]].view(op.params[i].shape[0], -1)[c]
            hv = (op @ v).double()
            v64 = v.double()
            scores[c] = -torch.dot(g, v64) + 0.5 * torch.dot(v64, hv)
        out[layer] = scores
    return out


def channel_scores(method: str, sens, quadratic=None) -> Dict[str, torch.Tensor]:
    if method == "channel-quadratic":
        return {layer: quadratic[layer] for layer in CHANNEL_LAYERS}
    if method == "channel-norm":
        return {layer: sens[layer].channel_sq_norm for layer in CHANNEL_LAYERS}
    if method == "channel-hessian":
        return {layer: sens[layer].channel_removal_score for layer in CHANNEL_LAYERS}
    raise ValueError(method)


def apply_unstructured(model: nn.Module, masks: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].mul_(keep.to(params[name].dtype))


def apply_channels(model: nn.Module, masks: Dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer, keep in masks.items():
            conv = modules[layer]
            k = keep.to(conv.weight.dtype)
            conv.weight.mul_(k.reshape(-1, *([1] * (conv.weight.dim() - 1))))
            if conv.bias is not None:
                conv.bias.mul_(k)


def evaluate_pruning(model, sens, test, sparsities, quadratic) -> Dict[str, Dict[str, List[float]]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows: Dict[str, Dict[str, List[float]]] = {}
    for method in UNSTRUCTURED + STRUCTURED:
        accs, removed = [], []
        for s in sparsities:
            model.load_state_dict(state)
            if method in UNSTRUCTURED:
                masks = prune_lowest(unstructured_scores(method, model, sens), s)
                apply_unstructured(model, masks)
                removed.append(sum(int((~m).sum()) for m in masks.values()))
            else:
                masks = prune_lowest(channel_scores(method, sens, quadratic), s)
                apply_channels(model, masks)
                params = dict(model.named_parameters())
                removed.append(sum(int((~m).sum()) * (params[f"{l}.weight"][0].numel() + 1) for l, m in masks.items()))
            accs.append(common.accuracy(model, test))
        rows[method] = {"accuracy": accs, "params_removed": removed}
    model.load_state_dict(state)
    return rows


def check_diagonal(model, loss_fn, hess_data, sens) -> Dict[str, Dict[str, float]]:
    """Exact diagonals of the small weight tensors (dense layer Hessians) against the Hutchinson estimate."""
    params = dict(model.named_parameters())
    out = {}
    for name in ("conv1.weight", "fc.weight"):
        layer_op = hessopt.HessianOperator(model, loss_fn, hess_data, params=[params[name]], cache_graph=True)
        exact = layer_op.to_dense().double().diagonal().cpu()
        block = sens[name.rsplit(".", 1)[0]]
        est = block.diagonal[block.param_names.index(name)].reshape(-1)
        w2 = params[name].detach().double().pow(2).reshape(-1)
        keep = int(0.5 * w2.numel())

        def kept(scores):  # which entries survive 50% pruning within the tensor
            mask = torch.zeros(w2.numel(), dtype=torch.bool)
            mask[torch.argsort(scores, descending=True)[:keep]] = True
            return mask

        exact_obd = kept(exact * w2)
        out[name] = {
            "num_entries": int(w2.numel()),
            "negative_fraction": float((est < 0).double().mean()),
            "exact_negative_fraction": float((exact < 0).double().mean()),
            "correlation": float(torch.corrcoef(torch.stack([exact, est]))[0, 1]),
            "relative_error": float((est - exact).norm() / exact.norm()),
            # agreement of the 50% keep-sets with OBD on the exact diagonal
            "keep_overlap_hutchinson_obd": float((kept(est.clamp_min(0) * w2) & exact_obd).sum() / keep),
            "keep_overlap_magnitude": float((kept(w2) & exact_obd).sum() / keep),
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-probes", type=int, default=256, help="Hutchinson probes (= Hessian-vector products) per model")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check-diagonal", action="store_true",
                   help="compare the first seed's Hutchinson diagonal with the exact one (conv1, fc weights)")
    p.add_argument("--out", default="runs/prune_by_sensitivity")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="only merge the results.json of runs of other seeds into --out (summary, plots)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), args.no_plots)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    data = load_dataset("digits")
    n_train = data.train_x.shape[0]
    hess_data = common.eval_batches(data, "train", 1, n_train, device)  # the whole training set, one batch
    test = common.eval_batches(data, "test", 1, data.test_x.shape[0], device)
    results = {"config": vars(args), "num_train": n_train, "num_test": int(data.test_x.shape[0]), "models": []}
    loss_fn = nn.CrossEntropyLoss()
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = build_model("digits_cnn", data.num_classes, in_chans=1, batchnorm=False)
        t0 = time.perf_counter()
        hist = common.train(model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            device=device, seed=seed, augment=False, log=lambda *a: None)
        train_s = time.perf_counter() - t0
        model.eval()
        t0 = time.perf_counter()
        op = hessopt.HessianOperator(model, loss_fn, hess_data, cache_graph=True)
        sens = hessian_sensitivity(op, model, num_probes=args.num_probes, generator=seed)
        hess_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        quadratic = channel_quadratic(op, model)
        quad_s = time.perf_counter() - t0
        dense = common.accuracy(model, test)
        t0 = time.perf_counter()
        pruning = evaluate_pruning(model, sens, test, args.sparsities, quadratic)
        row = {"seed": seed, "train_seconds": train_s, "sensitivity_seconds": hess_s, "channel_quadratic_seconds": quad_s,
               "channel_quadratic": {k: v.tolist() for k, v in quadratic.items()},
               "prune_seconds": time.perf_counter() - t0, "final_train_loss": hist["loss"][-1],
               "dense_accuracy": dense, "sensitivity": sens.to_dict(), "pruning": pruning}
        if args.check_diagonal and seed == args.seeds[0]:
            results["diagonal_check"] = check_diagonal(model, loss_fn, hess_data, sens)
            for name, c in results["diagonal_check"].items():
                print(f"  {name}: Hutchinson diagonal vs exact: {100 * c['negative_fraction']:.0f}% negative "
                      f"(exact {100 * c['exact_negative_fraction']:.0f}%), correlation {c['correlation']:.2f}, "
                      f"relative error {c['relative_error']:.2f}", flush=True)
        results["models"].append(row)
        print(f"seed {seed}: dense {100 * dense:.1f}% (train {train_s:.1f}s, {args.num_probes} HVPs {hess_s:.1f}s)",
              flush=True)
        for method, r in pruning.items():
            print(f"  {method:16s} " + " ".join(f"{100 * a:5.1f}" for a in r["accuracy"]), flush=True)
        common.save_json(results, out / "results.json")
    return common.finish(results, out, started, summarize, plot, args.no_plots)


def merge(dirs, out: Path, no_plots: bool):
    """One results.json / summary.md / plot from runs of the same settings on different seeds."""
    parts = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    results = dict(parts[0])
    results["models"] = sorted((m for part in parts for m in part["models"]), key=lambda m: m["seed"])
    results["config"] = dict(parts[0]["config"], seeds=[m["seed"] for m in results["models"]], merge=None)
    results["merged_from"] = [str(d) for d in dirs]
    results["part_seconds"] = [part.get("seconds") for part in parts]
    for part in parts:
        if "diagonal_check" in part:
            results["diagonal_check"] = part["diagonal_check"]
    out.mkdir(parents=True, exist_ok=True)
    common.save_json(results, out / "results.json")
    summary = summarize(results)
    (out / "summary.md").write_text(summary)
    print(summary)
    if not no_plots:
        plot(results, out)
    return results


def _stats(values: List[float]):
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def table(results, methods) -> Dict[str, List[tuple]]:
    """``{method: [(mean, std) of test accuracy at each sparsity]}`` over seeds."""
    sp = results["config"]["sparsities"]
    return {m: [_stats([r["pruning"][m]["accuracy"][i] for r in results["models"]]) for i in range(len(sp))]
            for m in methods}


def summarize(results) -> str:
    sp = results["config"]["sparsities"]
    n = len(results["models"])
    dense = _stats([r["dense_accuracy"] for r in results["models"]])
    lines = [f"Test accuracy (%), mean ± std over {n} seed(s); dense model {100 * dense[0]:.1f} ± {100 * dense[1]:.1f}.", ""]
    for title, methods, unit in (("unstructured (fraction of conv+fc weights removed)", UNSTRUCTURED, "weights"),
                                 ("structured (fraction of the 48 conv channels removed)", STRUCTURED, "channels")):
        lines += [f"**{title}**", "", "| method | " + " | ".join(f"{100 * s:.0f}%" for s in sp) + " |",
                  "|---|" + "---:|" * len(sp)]
        for m, row in table(results, methods).items():
            lines.append(f"| {m} | " + " | ".join(f"{100 * a:.1f} ± {100 * s:.1f}" for a, s in row) + " |")
        if unit == "channels":
            for m in methods:
                removed = [_stats([r["pruning"][m]["params_removed"][i] for r in results["models"]])[0] for i in range(len(sp))]
                lines.append(f"| {m}: parameters removed | " + " | ".join(f"{v:.0f}" for v in removed) + " |")
        lines.append("")
    if "diagonal_check" in results:
        lines += ["**Hutchinson diagonal vs exact** (first seed)", "",
                  "| weight | entries | negative estimates (exact) | correlation | relative error "
                  "| 50% keep-set overlap with exact-diagonal OBD: Hutchinson OBD / magnitude |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, c in results["diagonal_check"].items():
            lines.append(f"| `{name}` | {c['num_entries']} | {100 * c['negative_fraction']:.0f}% "
                         f"({100 * c['exact_negative_fraction']:.0f}%) | {c['correlation']:.2f} | {c['relative_error']:.2f} "
                         f"| {c['keep_overlap_hutchinson_obd']:.2f} / {c['keep_overlap_magnitude']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, out: Path):
    from matplotlib.figure import Figure

    sp = [100 * s for s in results["config"]["sparsities"]]
    dense = _stats([r["dense_accuracy"] for r in results["models"]])[0]
    fig = Figure(figsize=(8, 3), dpi=80, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, methods, title in ((axes[0], UNSTRUCTURED, "unstructured (weights)"),
                               (axes[1], STRUCTURED, "structured (conv channels)")):
        for m, row in table(results, methods).items():
            ax.errorbar(sp, [100 * a for a, _ in row], yerr=[100 * s for _, s in row], marker="o", ms=3,
                        capsize=2, label=m)
        ax.axhline(100 * dense, color="grey", lw=0.8, ls="--", label="dense")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"digits CNN, one-shot {title}", fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(out / "prune_by_sensitivity.png")


if __name__ == "__main__":
    main()
