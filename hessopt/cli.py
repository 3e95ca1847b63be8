"""The ``hessopt`` command line.

``hessopt analyze CHECKPOINT --dataset NAME --out DIR`` loads a checkpoint written by the image
classification recipe (``recipes/image_classification/train.py``: a dict with ``model`` (state
dict), ``config`` (``model``, ``dataset``, ``data_dir``, ``batchnorm``, ``residual``, ...) and
``epoch``), rebuilds the network with :func:`hessopt.zoo.build_model`, takes ``--num-batches``
batches of ``--batch-size`` test images (a fixed random subset chosen by ``--seed``, normalized with the training set's mean and standard
deviation, as in training, without augmentation), and writes

* ``DIR/report.json``: ``top_eigenvalues``, ``trace`` (with ``std_error``), ``density``
  (``grid``, ``density``, ``nodes``, ``weights``), loss and accuracy on the analyzed images, and
  optionally ``layerwise`` and ``landscape``;
* PNG plots (density on a log scale, layer-wise bars, landscape curve and contours);
* ``DIR/report.md``, a summary that embeds the plots.

Checkpoints of ``--stream`` runs (an ImageFolder tree streamed by :class:`hessopt.zoo.FolderLoader`;
their ``dataset_args`` say ``stream=True`` and record ``image_size``, ``mean`` and ``std``) are
analyzed on held-out images read the same way: the loader's evaluation transform (resize, center
crop, normalization). ``--stream`` asks for that with any imagefolder checkpoint (ImageNet's mean
and std, and ``--image-size`` or 224, where the checkpoint records none).

BatchNorm uses its running statistics (``--bn-mode eval``, the network as used for inference);
``--bn-mode train`` takes the Hessian of the training-mode loss (batch statistics), without
touching the running statistics.

Run ``hessopt analyze --help`` for all options; ``python -m hessopt.cli`` and ``python -m hessopt``
do the same as the ``hessopt`` console script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "analyze", "CLIError"]


class CLIError(Exception):
    """A user-facing error: printed as ``hessopt: error: ...`` with exit status 2."""


# --------------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessopt",
        description="hessopt: AdaHessian optimizer and Hessian diagnostics for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    a = sub.add_parser(
        "analyze",
        help="Hessian diagnostics of a recipe checkpoint (eigenvalues, trace, density, ...)",
        description="Hessian diagnostics of an image-classification checkpoint: top eigenvalues, trace "
        "(with standard error), spectral density, and optionally layer-wise spectra and loss landscapes. "
        "Writes OUT/report.json, OUT/report.md and PNG plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt written by recipes/image_classification/train.py")
    a.add_argument("--dataset", default=None, help="digits, cifar10 or imagefolder (default: the checkpoint's)")
    a.add_argument("--data-dir", default=None, help="data location (default: the checkpoint's, else the dataset's default)")
    a.add_argument("--cache-dir", default=None, help="cache for decoded images")
    a.add_argument("--stream", action="store_true",
                   help="imagefolder: read the test images through hessopt.zoo.FolderLoader's evaluation transform "
                        "(resize, center crop; implied by checkpoints of --stream runs) instead of into memory")
    a.add_argument("--image-size", type=_positive_int, default=None,
                   help="with --stream: image side (default: the checkpoint's, else 224)")
    a.add_argument("--out", required=True, help="output directory (created)")
    a.add_argument("--model", default=None, help="model name, if the checkpoint's config does not say")
    a.add_argument("--batch-size", type=_positive_int, default=128, help="test images per batch")
    a.add_argument("--num-batches", type=_positive_int, default=4, help="number of test batches the Hessian averages over")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    a.add_argument("--top-k", type=_positive_int, default=5, help="number of top eigenvalues")
    a.add_argument("--tol", type=_positive_float, default=1e-3, help="relative tolerance of the eigenvalues")
    a.add_argument("--trace-matvecs", type=_positive_int, default=60, help="Hutch++ budget of the trace (>= 4)")
    a.add_argument("--density-steps", type=_positive_int, default=60, help="Lanczos steps of the density")
    a.add_argument("--density-runs", type=_positive_int, default=1, help="independent SLQ runs of the density")
    a.add_argument("--seed", type=int, default=0, help="seed of all random probes and directions")
    a.add_argument("--bn-mode", choices=("eval", "train"), default="eval",
                   help="BatchNorm with running statistics (eval) or batch statistics (train)")
    a.add_argument("--layerwise", action="store_true", help="also the spectrum of every layer (module)")
    a.add_argument("--layerwise-filter", default=None, help="regex: only blocks (module names) matching it")
    a.add_argument("--layerwise-k", type=_positive_int, default=1, help="top eigenvalues per layer")
    a.add_argument("--layerwise-trace-matvecs", type=_nonneg_int, default=12, help="trace budget per layer (0: none)")
    a.add_argument("--landscape", action="store_true",
                   help="also the loss along the top eigenvector and on a plane of two random filter-normalized directions")
    a.add_argument("--landscape-steps", type=_positive_int, default=21, help="points of the 1-D landscape")
    a.add_argument("--landscape-grid", type=_nonneg_int, default=11, help="points per axis of the 2-D landscape (0: none)")
    a.add_argument("--landscape-distance", type=_positive_float, default=None,
                   help="half-width of the 1-D landscape along the unit top eigenvector (default: 2*sqrt(2/lambda_1), "
                        "where the quadratic model rises by 4)")
    a.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.add_argument("--trust-checkpoint", action="store_true",
                   help="load with full unpickling (only for checkpoints you trust) if the safe loader refuses")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hessopt`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "analyze":
            report = analyze(args)
            print(f"hessopt analyze: wrote {Path(args.out) / 'report.json'} and {Path(args.out) / 'report.md'}")
            top = report["top_eigenvalues"]["eigenvalues"]
            print(f"  top eigenvalues {', '.join(f'{v:.4g}' for v in top)}; trace {report['trace']['estimate']:.4g} "
                  f"+- {report['trace']['std_error']:.2g}")
            return 0
    except CLIError as err:
        print(f"hessopt {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse rejects unknown commands


# --------------------------------------------------------------------------------------------------
# hessopt analyze
# --------------------------------------------------------------------------------------------------

def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device {name!r} is not a device (use cpu, cuda, cuda:0, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def load_checkpoint(path: str, device, trust: bool = False) -> Dict[str, Any]:
    """Read a recipe checkpoint and check its format; every failure is a :class:`CLIError`."""
    import torch

    p = Path(path)
    if not p.exists():
        raise CLIError(f"checkpoint not found: {path}")
    if p.is_dir():
        candidate = p / "checkpoint.pt"
        if not candidate.is_file():
            raise CLIError(f"{path} is a directory without checkpoint.pt; pass the checkpoint file")
        p = candidate
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            ckpt = torch.load(p, map_location=device, weights_only=not trust)
    except pickle.UnpicklingError as err:
        refused = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if not trust and refused:
            raise CLIError(
                f"{p} holds objects the safe loader refuses ({refused[0][:200]}); if you trust the file, "
                "rerun with --trust-checkpoint"
            ) from err
        raise CLIError(f"cannot read {p}: it is corrupt or not a PyTorch checkpoint ({err})") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError) as err:
        raise CLIError(f"cannot read {p}: it is corrupt or not a PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CLIError(
            f"{p} is not a hessopt recipe checkpoint: expected a dict with 'model' (state dict) and "
            f"'config', got {keys}"
        )
    if not isinstance(ckpt["model"], dict):
        raise CLIError(f"{p}: 'model' should be a state dict, got {type(ckpt['model']).__name__}")
    ckpt["config"] = _config(ckpt)
    return ckpt


def _numpy_globals() -> list:
    # The recipe stores NumPy's RNG state (an array) for bit-exact resumption; these are NumPy's
    # array/dtype reconstructors, which rebuild plain data and run no user code.
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in (np.uint8, np.uint32, np.int64, np.float32, np.float64)]
    return allowed


def _config(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """The run's settings: ``resolved`` (all defaults filled in) over ``config`` (as given), with
    ``model_args`` / ``dataset_args`` (what the model and data were built from) taking precedence."""
    config: Dict[str, Any] = {}
    for key in ("config", "resolved"):
        part = ckpt.get(key)
        if part is not None and not isinstance(part, dict):
            part = dict(vars(part)) if hasattr(part, "__dict__") else None
        if part:
            config.update({k: v for k, v in part.items() if v is not None})
    model_args = ckpt.get("model_args")
    if isinstance(model_args, dict):
        for src, dst in (("name", "model"), ("batchnorm", "batchnorm"), ("residual", "residual"),
                         ("num_classes", "num_classes"), ("in_chans", "in_chans")):
            if model_args.get(src) is not None:
                config[dst] = model_args[src]
    dataset_args = ckpt.get("dataset_args")
    if isinstance(dataset_args, dict):
        if dataset_args.get("name"):
            config["dataset"] = dataset_args["name"]
        if dataset_args.get("data_dir"):
            config["data_dir"] = dataset_args["data_dir"]
        for key in ("stream", "image_size", "mean", "std"):  # streamed runs: how the images were read
            if dataset_args.get(key) is not None:
                config[key] = dataset_args[key]
    return config


def _state_dict(state: Dict[str, Any]) -> Dict[str, Any]:
    # checkpoints of torch.compile'd or DDP-wrapped models prefix every key
    for prefix in ("_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_data(name: str, data_dir: Optional[str], cache_dir: Optional[str]):
    from . import zoo

    if name not in zoo.DATASETS:
        raise CLIError(f"unknown dataset {name!r}; choose one of {', '.join(zoo.DATASETS)}")
    try:
        return zoo.load_dataset(name, data_dir=data_dir, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise CLIError(f"cannot load dataset {name!r}" + (f" from {data_dir}" if data_dir else "") + f": {err}") from err


class _StreamedData:
    """The held-out split of an ImageFolder tree, read image by image (checkpoints of ``--stream`` runs)."""

    name, in_chans = "imagefolder", 3

    def __init__(self, data_dir: Optional[str], config: Dict[str, Any], image_size: Optional[int]):
        from . import zoo

        if not data_dir:
            raise CLIError("--stream needs --data-dir: the folder that holds train/<class>/* and val/<class>/*")
        try:
            _, self.val = zoo.image_folders(data_dir)
        except (ValueError, OSError, ImportError) as err:
            raise CLIError(f"cannot read the image folders in {data_dir}: {err}") from err
        self.num_classes = len(self.val.classes)
        self.image_size = int(image_size or config.get("image_size") or 224)
        self.mean = tuple(config.get("mean") or zoo.IMAGENET_MEAN)
        self.std = tuple(config.get("std") or zoo.IMAGENET_STD)


def _build(config: Dict[str, Any], model_name: Optional[str], data, state: Dict[str, Any], device):
    from . import zoo

    name = model_name or config.get("model")
    if not name:
        raise CLIError("the checkpoint's config does not name the model: pass --model NAME")
    for key, have in (("num_classes", data.num_classes), ("in_chans", data.in_chans)):
        if config.get(key) is not None and int(config[key]) != have and not model_name:
            raise CLIError(
                f"the checkpoint's model has {key}={config[key]} but dataset {data.name!r} has {have}: "
                f"pass the --dataset it was trained on (the checkpoint says {config.get('dataset')!r})"
            )
    kwargs = dict(batchnorm=bool(config.get("batchnorm", True)), residual=bool(config.get("residual", True)))
    try:
        model = zoo.build_model(name, data.num_classes, in_chans=data.in_chans, **kwargs)
    except (ValueError, ImportError, TypeError) as err:
        raise CLIError(f"cannot build model {name!r}: {err}") from err
    try:
        model.load_state_dict(_state_dict(state))
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CLIError(
            f"the checkpoint's weights do not fit {name!r} ({kwargs}) with {data.num_classes} classes and "
            f"{data.in_chans} input channels (is --dataset the one it was trained on?): {first}"
        ) from err
    return model.to(device)


def analysis_subset(num_images: int, count: int, seed: int):
    """Indices of the analyzed test images: a fixed random subset (data sets stored class by class,
    like CIFAR-10's JPEG folders, would give one class if the first images were taken)."""
    import torch

    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[: min(count, num_images)]


def _test_batches(data, batch_size: int, num_batches: int, device, seed: int) -> List[Tuple[Any, Any]]:
    from .zoo import DeviceLoader, FolderLoader

    if isinstance(data, _StreamedData):  # the same subset rule, decoded with the evaluation transform
        idx = analysis_subset(len(data.val), batch_size * num_batches, seed)
        return list(FolderLoader(data.val, batch_size, indices=idx, image_size=data.image_size, mean=data.mean,
                                 std=data.std, num_workers=0, device=device))
    idx = analysis_subset(data.test_x.shape[0], batch_size * num_batches, seed)
    loader = DeviceLoader(data.test_x[idx], data.test_y[idx], batch_size, data.mean, data.std,
                          shuffle=False, augment=False, drop_last=False, device=device)
    return list(loader)


def _loss_and_accuracy(model, loss_fn, batches, bn_mode: str) -> Tuple[float, float]:
    import torch

    from .operators import _operator_mode

    total, correct, count = 0.0, 0, 0
    with torch.no_grad(), _operator_mode(model, bn_mode):
        for x, y in batches:
            out = model(x)
            total += float(loss_fn(out, y)) * y.shape[0]
            correct += int((out.argmax(1) == y).sum())
            count += y.shape[0]
    return total / count, correct / count


def analyze(args: argparse.Namespace) -> Dict[str, Any]:
    """Run ``hessopt analyze`` for parsed ``args``; returns the report (also written to ``args.out``)."""
    from torch import nn

    from . import spectral_density, top_eigenvalues, trace
    from .analysis import layerwise, loss_landscape
    from .operators import HessianOperator

    started = time.perf_counter()
    timings: Dict[str, float] = {}
    progress = not args.no_progress
    device = _device(args.device)
    if args.trace_matvecs < 4:
        raise CLIError("--trace-matvecs must be at least 4 (Hutch++ needs a sketch and two residual samples)")
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise CLIError("plots need matplotlib: pip install hessopt[plot] (or pass --no-plots)") from err
    ckpt = load_checkpoint(args.checkpoint, device, trust=args.trust_checkpoint)
    config = ckpt["config"]
    dataset = args.dataset or config.get("dataset")
    if not dataset:
        raise CLIError("the checkpoint's config does not name the dataset: pass --dataset NAME")
    if args.dataset and config.get("dataset") and args.dataset != config.get("dataset"):
        print(f"hessopt analyze: note: --dataset {args.dataset} differs from the checkpoint's dataset "
              f"{config.get('dataset')!r}", file=sys.stderr)
    data_dir = args.data_dir
    if data_dir is None and dataset == config.get("dataset"):
        data_dir = config.get("data_dir")
        if data_dir and not os.path.exists(str(data_dir)):
            data_dir = None  # trained elsewhere (e.g. on a GPU machine): fall back to the dataset's default
    same_data = dataset == config.get("dataset")
    if args.stream and dataset != "imagefolder":
        raise CLIError(f"--stream reads ImageFolder trees: it needs --dataset imagefolder, not {dataset!r}")
    if dataset == "imagefolder" and (args.stream or (same_data and config.get("stream"))):
        data = _StreamedData(data_dir, config if same_data else {}, args.image_size)
    else:
        data = _load_data(dataset, data_dir, args.cache_dir)
    model = _build(config, args.model, data, ckpt["model"], device)
    batches = _test_batches(data, args.batch_size, args.num_batches, device, args.seed)
    num_samples = sum(int(y.shape[0]) for _, y in batches)
    loss_fn = nn.CrossEntropyLoss()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    loss, acc = _loss_and_accuracy(model, loss_fn, batches, args.bn_mode)
    op = HessianOperator(model, loss_fn, batches if len(batches) > 1 else batches[0], bn_mode=args.bn_mode)
    n = op.num_params
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # convergence is reported in the JSON instead
        top = top_eigenvalues(op, k=min(args.top_k, n), tol=args.tol, generator=args.seed, progress=progress)
    timings["top_eigenvalues"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr = trace(op, num_matvecs=args.trace_matvecs, generator=args.seed + 1, progress=progress)
    timings["trace"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dens = spectral_density(op, num_runs=args.density_runs, num_steps=args.density_steps,
                            generator=args.seed + 2, progress=progress)
    timings["density"] = time.perf_counter() - t0
    op.clear_cache()

    report: Dict[str, Any] = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "model": args.model or config.get("model"),
        "dataset": dataset,
        "epoch": ckpt.get("epoch"),
        "config": {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "num_params": n,
        "num_samples": num_samples,
        "batch_size": args.batch_size,
        "num_batches": len(batches),
        "bn_mode": args.bn_mode,
        "device": str(device),
        "seed": args.seed,
        "loss": loss,
        "accuracy": acc,
        "top_eigenvalues": top.to_dict(),
        "trace": tr.to_dict(),
        "density": dens.to_dict(),
    }
    table = None
    if args.layerwise:
        t0 = time.perf_counter()
        blocks = None
        if args.layerwise_filter:
            import re

            from .analysis import resolve_blocks

            pattern = re.compile(args.layerwise_filter)
            blocks = {label: names for label, names in resolve_blocks(model) if pattern.search(label)}
            if not blocks:
                raise CLIError(f"--layerwise-filter {args.layerwise_filter!r} matches no module")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            table = layerwise(model, loss_fn, batches, blocks=blocks, k=args.layerwise_k,
                              trace_matvecs=args.layerwise_trace_matvecs, tol=args.tol, bn_mode=args.bn_mode,
                              keep_eigenvectors=False, generator=args.seed, progress=progress)
        report["layerwise"] = table.to_dict()["layers"]
        timings["layerwise"] = time.perf_counter() - t0
    landscapes = {}
    if args.landscape:
        t0 = time.perf_counter()
        lam = float(top.eigenvalues[0])
        dist = args.landscape_distance or (2 * math.sqrt(2 / lam) if lam > 0 else 1.0)
        landscapes["top_eigenvector"] = loss_landscape(
            model, loss_fn, batches, top.eigenvectors[:, :1], steps=args.landscape_steps, distance=dist,
            bn_mode=args.bn_mode, progress=progress)
        if args.landscape_grid:
            landscapes["random_plane"] = loss_landscape(
                model, loss_fn, batches, "random", num_directions=2, steps=args.landscape_grid, distance=1.0,
                bn_mode=args.bn_mode, generator=args.seed, progress=progress)
        report["landscape"] = {k: v.to_dict() for k, v in landscapes.items()}
        report["landscape"]["top_eigenvector"]["eigenvalue"] = lam
        timings["landscape"] = time.perf_counter() - t0

    plots: Dict[str, str] = {}
    if not args.no_plots:
        from .analysis import plot_density, plot_landscape, plot_layerwise

        plot_density(dens, path=out / "density.png", title=f"Hessian eigenvalue density ({report['model']})")
        plots["density"] = "density.png"
        if table is not None:
            plot_layerwise(table, path=out / "layerwise.png", title="layer-wise top eigenvalue and trace")
            plots["layerwise"] = "layerwise.png"
        if "top_eigenvector" in landscapes:
            plot_landscape(landscapes["top_eigenvector"], path=out / "landscape_top.png",
                           title="loss along the top eigenvector")
            plots["landscape_top"] = "landscape_top.png"
        if "random_plane" in landscapes:
            plot_landscape(landscapes["random_plane"], path=out / "landscape_random.png",
                           title="loss on two random filter-normalized directions")
            plots["landscape_random"] = "landscape_random.png"
    timings["total"] = time.perf_counter() - started
    report["plots"] = plots
    report["timings_s"] = timings
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=True))
    (out / "report.md").write_text(_markdown(report, table))
    return report


def _markdown(report: Dict[str, Any], table) -> str:
    top = report["top_eigenvalues"]
    tr = report["trace"]
    lines = [
        f"# Hessian analysis: {report['model']} on {report['dataset']}",
        "",
        f"Checkpoint `{report['checkpoint']}` (epoch {report['epoch']}), {report['num_params']:,} parameters. "
        f"Hessian of the mean cross-entropy over {report['num_samples']} test images (a fixed random subset, seed "
        f"{report['seed']}) "
        f"({report['num_batches']} batches of {report['batch_size']}), BatchNorm in {report['bn_mode']} mode, "
        f"device {report['device']}, seed {report['seed']}. Loss {report['loss']:.4f}, accuracy "
        f"{100 * report['accuracy']:.2f}% on these images.",
        "",
        "| quantity | value |",
        "|---|---|",
        "| top eigenvalues | " + ", ".join(f"{v:.5g}" for v in top["eigenvalues"]) + " |",
        "| error bounds | " + ", ".join(f"{v:.2g}" for v in top["error_bounds"]) + f" (converged: {top['converged']}) |",
        f"| trace (Hutch++, {tr['num_matvecs']} products) | {tr['estimate']:.5g} ± {tr['std_error']:.2g} |",
        f"| density (SLQ) | {report['density']['num_matvecs']} products, σ = {report['density']['sigma']:.3g} |",
        "",
    ]
    plots = report.get("plots", {})
    if "density" in plots:
        lines += ["## Eigenvalue density", "", f"![density]({plots['density']})", ""]
    if table is not None:
        lines += ["## Layer-wise spectra", "", table.to_markdown(), ""]
        if "layerwise" in plots:
            lines += [f"![layer-wise]({plots['layerwise']})", ""]
    if "landscape" in report:
        ls = report["landscape"]
        lines += ["## Loss landscape", ""]
        t = ls["top_eigenvector"]
        lines += [
            f"Along the top eigenvector (λ₁ = {t['eigenvalue']:.4g}), α in [{t['alphas'][0]:.3g}, {t['alphas'][-1]:.3g}]: "
            f"loss from {min(t['losses']):.4f} to {max(t['losses']):.4f} (center {t['center_loss']:.4f}).",
            "",
        ]
        if "landscape_top" in plots:
            lines += [f"![landscape along the top eigenvector]({plots['landscape_top']})", ""]
        if "random_plane" in ls:
            lines += ["Plane of two random filter-normalized directions (Li et al. 2018), coordinates in [-1, 1]:", ""]
            if "landscape_random" in plots:
                lines += [f"![landscape on a random plane]({plots['landscape_random']})", ""]
    timings = report.get("timings_s", {})
    lines += ["## Timings", "", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m hessopt.cli
    sys.exit(main())
