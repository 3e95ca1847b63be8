"""Curvature report of an image-classification recipe checkpoint (the recipe-side ``hessopt analyze``).

    python recipes/image_classification/analyze.py runs/digits/checkpoint.pt --out runs/digits/analysis \\
        [--dataset digits] [--batch-size 128 --num-batches 4] [-k 5] [--layerwise] [--landscape]

Reads ``checkpoint.pt`` (its SHA-256 checksum verified first: see ``checkpoint.py``), rebuilds the
network from the checkpoint's ``model_args``, takes ``--num-batches`` batches of ``--batch-size``
held-out images (a fixed random subset chosen by ``--seed``, normalized with the training set's
mean and standard deviation as in training, without augmentation; checkpoints of ``--stream``
runs read their ImageFolder tree through the evaluation transform: resize, center crop), and
writes ``hessopt.report``'s ``report.json``, ``report.md`` and plots of the Hessian of the mean
cross-entropy, with the checkpoint, epoch, data set and the accuracy on the analyzed images under
``metadata``. BatchNorm uses its running statistics (``--bn-mode eval``) unless ``--bn-mode train``.

The same through the generic command (from the repository root):

    hessopt analyze --model-fn recipes.image_classification.checkpoint:build_model \\
        --model-arg checkpoint=runs/digits/checkpoint.pt \\
        --data-fn recipes.image_classification.checkpoint:batches \\
        --data-arg checkpoint=runs/digits/checkpoint.pt --data-arg num_batches=4 --loss cross_entropy --out report/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # the repository root: `recipes.*` (and hessopt without installation)
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hessopt  # noqa: E402
from hessopt.cli import nonneg_int, positive_float, positive_int  # noqa: E402
from recipes.image_classification import checkpoint as ckpt_format  # noqa: E402
from recipes.image_classification.checkpoint import CheckpointError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    a = argparse.ArgumentParser(
        prog="analyze.py", description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt written by train.py (or its run folder)")
    a.add_argument("--out", required=True, help="output directory (created)")
    a.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    a.add_argument("--dataset", default=None, help="digits, cifar10 or imagefolder (default: the checkpoint's)")
    a.add_argument("--data-dir", default=None, help="data location (default: the checkpoint's, else the dataset's default)")
    a.add_argument("--cache-dir", default=None, help="cache for decoded images")
    a.add_argument("--stream", action="store_true",
                   help="imagefolder: read the test images through recipes.common.FolderLoader's evaluation transform "
                        "(implied by checkpoints of --stream runs)")
    a.add_argument("--image-size", type=positive_int, default=None, help="with --stream: image side (default: the checkpoint's)")
    a.add_argument("--model", default=None, help="model name, if the checkpoint's config does not say")
    a.add_argument("--batch-size", type=positive_int, default=128, help="test images per batch")
    a.add_argument("--num-batches", type=positive_int, default=4, help="number of test batches the Hessian averages over")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    a.add_argument("-k", "--top-k", dest="k", type=positive_int, default=5, help="number of top eigenvalues")
    a.add_argument("--tol", type=positive_float, default=1e-3, help="relative tolerance of the eigenvalues")
    a.add_argument("--trace-matvecs", type=positive_int, default=60, help="Hutch++ budget of the trace (>= 4)")
    a.add_argument("--density-steps", type=positive_int, default=60, help="Lanczos steps of the density")
    a.add_argument("--density-runs", type=positive_int, default=1, help="independent SLQ runs of the density")
    a.add_argument("--seed", type=int, default=0, help="seed of the image subset, all random probes and directions")
    a.add_argument("--bn-mode", choices=("eval", "train"), default="eval",
                   help="BatchNorm with running statistics (eval) or batch statistics (train)")
    a.add_argument("--layerwise", action="store_true", help="also the spectrum of every layer (module)")
    a.add_argument("--layerwise-filter", default=None, help="regex: only blocks (module names) matching it")
    a.add_argument("--layerwise-k", type=positive_int, default=1, help="top eigenvalues per layer")
    a.add_argument("--layerwise-trace-matvecs", type=nonneg_int, default=12, help="trace budget per layer (0: none)")
    a.add_argument("--landscape", action="store_true",
                   help="also the loss along the top eigenvector and on a plane of two random filter-normalized directions")
    a.add_argument("--landscape-steps", type=positive_int, default=21, help="points of the 1-D landscape")
    a.add_argument("--landscape-grid", type=nonneg_int, default=11, help="points per axis of the 2-D landscape (0: none)")
    a.add_argument("--landscape-distance", type=positive_float, default=None,
                   help="half-width of the 1-D landscape (default: 2*sqrt(2/lambda_1))")
    a.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.add_argument("--trust-checkpoint", action="store_true",
                   help="load with full unpickling (only for checkpoints you trust) if the safe loader refuses")
    return a


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CheckpointError(f"--device {name!r} is not a device (use cpu, cuda, cuda:0, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def accuracy(model: nn.Module, batches) -> float:
    """Top-1 accuracy in inference mode (BatchNorm's running statistics); the model's mode restored."""
    flags = [m.training for m in model.modules()]
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            count += int(y.shape[0])
    for m, flag in zip(model.modules(), flags):
        m.training = flag
    return correct / count


def analyze(args: argparse.Namespace) -> hessopt.Report:
    device = _device(args.device)
    if args.trace_matvecs < 4:
        raise CheckpointError("--trace-matvecs must be at least 4 (Hutch++ needs a sketch and two residual samples)")
    ckpt = ckpt_format.read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    config = ckpt_format.checkpoint_config(ckpt)
    data_options = dict(dataset=args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, stream=args.stream,
                        image_size=args.image_size)
    model = ckpt_format.build_model(ckpt, model=args.model, **data_options).to(device)
    batches: List[Any] = ckpt_format.batches(ckpt, batch_size=args.batch_size, num_batches=args.num_batches,
                                             seed=args.seed, device=device, **data_options)
    layerwise: Any = False
    if args.layerwise:
        layerwise = {"k": args.layerwise_k, "trace_matvecs": args.layerwise_trace_matvecs}
        if args.layerwise_filter:
            import re

            from hessopt.analysis import resolve_blocks

            pattern = re.compile(args.layerwise_filter)
            blocks = {label: names for label, names in resolve_blocks(model) if pattern.search(label)}
            if not blocks:
                raise CheckpointError(f"--layerwise-filter {args.layerwise_filter!r} matches no module")
            layerwise["blocks"] = blocks
    landscape: Any = False
    if args.landscape:
        landscape = {"steps": args.landscape_steps, "grid": args.landscape_grid, "distance": args.landscape_distance}
    metadata: Dict[str, Any] = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "epoch": ckpt.get("epoch"),
        "model": args.model or config.get("model"),
        "dataset": args.dataset or config.get("dataset"),
        "num_samples": sum(int(y.shape[0]) for _, y in batches),
        "batch_size": args.batch_size,
        "num_batches": len(batches),
        "accuracy": accuracy(model, batches),
        "loss": "mean cross-entropy of the held-out images",
    }
    try:
        return hessopt.report(model, nn.CrossEntropyLoss(), batches if len(batches) > 1 else batches[0], out=args.out,
                              k=args.k, layerwise=layerwise, landscape=landscape, seed=args.seed,
                              bn_mode=args.bn_mode, progress=not args.no_progress, overwrite=args.overwrite,
                              plots=not args.no_plots, metadata=metadata, tol=args.tol,
                              trace_matvecs=args.trace_matvecs, density_steps=args.density_steps,
                              density_runs=args.density_runs)
    except (FileExistsError, ImportError) as err:
        raise CheckpointError(str(err)) from err


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = analyze(args)
    except CheckpointError as err:
        print(f"analyze.py: error: {err}", file=sys.stderr)
        return 2
    s = result.summary
    print(f"analyze.py: wrote {result.paths['json']} and {result.paths['markdown']}")
    print(f"  top eigenvalues {', '.join(f'{v:.4g}' for v in s.top_eigenvalues.tolist())}; trace {s.trace:.4g} "
          f"+- {s.trace_std_error:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
