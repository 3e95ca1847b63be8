"""`make demo`: hessopt's main job on embedded data, end to end, in about a minute on 2 CPU cores.

1. Train a CIFAR ResNet20 (270k parameters, BatchNorm and residual connections) on scikit-learn's
   8x8 digits (1,797 real images, shipped inside scikit-learn: no download) with AdaHessian (Hessian
   every step, and every 5th step), and with AdamW: same epochs, same data order, through the
   image-classification recipe (recipes/image_classification/train.py).
2. Analyze the AdaHessian model's Hessian on held-out images with the recipe's checkpoint adapter
   (recipes/image_classification/analyze.py, which calls `hessopt.report`): top-5 eigenvalues
   (Lanczos), trace with its standard error (Hutch++), spectral density (SLQ).
3. Print a table (final accuracy, time per epoch) and the curvature summary; everything is under
   --out (default runs/demo): results.json, the analysis report (report.json, report.md, PNG plots)
   and each run's metrics, checkpoint and training plots.

    python recipes/demo.py [--out runs/demo] [--epochs 8] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "image_classification"))
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (the recipe, imported as a module)
from recipes.image_classification import analyze  # noqa: E402

OPTIMIZERS = {
    # the AdaHessian paper's defaults (lr 0.15, eps 1e-4) and AdamW's usual ones, decoupled weight decay both
    "adahessian": ["--opt", "adahessian", "--lr", "0.15", "--weight-decay", "1e-3"],
    "adahessian_k5": ["--opt", "adahessian", "--lr", "0.15", "--weight-decay", "1e-3", "--update-each", "5"],
    "adamw": ["--opt", "adamw", "--lr", "3e-3", "--weight-decay", "1e-2"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--epochs", type=int, default=10, help="training epochs for each optimizer")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_one(name: str, args: argparse.Namespace, out: Path) -> dict:
    # one epoch (22 steps) of linear lr warm-up for all: lazy Hessian updates need it (stale curvature
    # early in training, when it changes fastest, can blow up a step)
    argv = ["--dataset", "digits", "--model", "cifar_resnet20", "--epochs", str(args.epochs), "--warmup-steps", "22",
            "--batch-size", str(args.batch_size), "--device", args.device, "--seed", str(args.seed),
            "--output-dir", str(out / name), "--overwrite", *OPTIMIZERS[name]]
    print(f"\n=== {name}: python recipes/image_classification/train.py {' '.join(argv)}")
    last = train.main(train.parse_args(argv))
    epochs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {"optimizer": name, "val_acc": last["val_acc"], "val_loss": last["val_loss"],
            "time_per_epoch_s": sum(e["time_s"] for e in epochs) / len(epochs), "epochs": len(epochs)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    runs = [train_one(name, args, out) for name in OPTIMIZERS]

    analysis = out / "analysis"
    cmd = [str(out / "adahessian" / "checkpoint.pt"), "--out", str(analysis), "--device", args.device,
           "--batch-size", "256", "--num-batches", "1", "--top-k", "5", "--trace-matvecs", "99",
           "--density-steps", "60", "--density-runs", "2", "--seed", str(args.seed), "--overwrite"]
    print(f"\n=== curvature of the AdaHessian model: python recipes/image_classification/analyze.py {' '.join(cmd)}")
    if analyze.main(cmd) != 0:
        raise SystemExit("the analysis failed")
    report = json.loads((analysis / "report.json").read_text())["summary"]

    print("\noptimizer       val acc   val loss   s/epoch")
    for r in runs:
        print(f"{r['optimizer']:<14} {100 * r['val_acc']:6.2f}%   {r['val_loss']:.4f}   {r['time_per_epoch_s']:7.2f}")
    print("\nHessian of the AdaHessian model (256 held-out digits, BatchNorm in eval mode):")
    print("  top-5 eigenvalues  " + "  ".join(f"{v:.4g}" for v in report["top_eigenvalues"]))
    print("  error bounds       " + "  ".join(f"{v:.1e}" for v in report["eigenvalue_error_bounds"]))
    print(f"  trace              {report['trace']:.4g} +- {report['trace_std_error']:.2g} (Hutch++, 99 matvecs)")
    summary = {"runs": runs, "top_eigenvalues": report["top_eigenvalues"], "trace": report["trace"],
               "trace_std_error": report["trace_std_error"], "analysis_dir": str(analysis)}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    pngs = sorted(p.name for p in analysis.glob("*.png"))
    print(f"\nwrote {out / 'results.json'}, {analysis / 'report.md'} and plots {', '.join(pngs)}")
    return summary


if __name__ == "__main__":
    main()
