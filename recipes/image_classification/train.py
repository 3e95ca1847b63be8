"""Image classification with AdaHessian, SGD, AdamW or any timm optimizer, with optional curvature tracking.

Commands (from the repository root):

    # 8x8 digits on CPU (seconds); curvature every 10 steps; then continue to epoch 3
    python recipes/image_classification/train.py --dataset digits --model cifar_resnet20 --opt adahessian \
        --epochs 2 --batch-size 64 --output-dir runs/digits --curvature-every 10
    python recipes/image_classification/train.py --dataset digits --model cifar_resnet20 --opt adahessian \
        --epochs 3 --batch-size 64 --output-dir runs/digits --curvature-every 10 --resume

    # CIFAR-10, the AdaHessian paper's recipe (ResNet20, 160 epochs) and its SGD baseline
    python recipes/image_classification/train.py --preset paper_adahessian_cifar --output-dir runs/c10_adahessian
    python recipes/image_classification/train.py --preset paper_sgd_cifar --output-dir runs/c10_sgd

    # the same with 20 epochs (milestones scaled from 80/120 of 160 to 10/15 of 20)
    python recipes/image_classification/train.py --preset paper_adahessian_cifar --epochs 20 --output-dir runs/c10_ah20

    # several processes (DDP; gloo on CPU, nccl on GPU); --batch-size is the global batch
    torchrun --nproc_per_node=2 recipes/image_classification/train.py --dataset digits --epochs 2 --output-dir runs/ddp

    # ImageNet-size train/ + val/ JPEG trees: streamed by DataLoader workers (recipes.common.FolderLoader)
    torchrun --nproc_per_node=8 recipes/image_classification/train.py --dataset imagefolder --stream \
        --data-dir /data/imagenet --model resnet50 --image-size 224 --workers 8 --opt adahessian \
        --batch-size 256 --eval-batch-size 250 --epochs 90 --output-dir runs/imagenet_ah

Outputs in --output-dir: config.json (the options as given and as resolved), metrics.jsonl (one JSON
object per epoch), curvature.jsonl (with --curvature-every), checkpoint.pt (after every epoch,
written atomically, with a SHA-256 checksum), tensorboard/ (when installed), training.png /
curvature.png / density.png.

Precedence of options: built-in defaults < --preset < options given on the command line; with
--resume the checkpoint's configuration replaces the defaults and preset (config.json is only a
readable copy), and only the options given on the command line change it.

A run is never thrown away by accident: an --output-dir that already holds a run is refused
without --resume (continue it) or --overwrite (start it again). --resume continues with the
checkpoint's hyper-parameters: a larger --epochs extends the run with the lr milestones where they
were (absolute epochs; they do not move), and a changed --lr, --weight-decay, --milestones, ...
is refused unless --allow-config-change, which applies the new values from the next epoch on
(optimizer moments, step counters and probe generators come from the checkpoint) and says so.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # the repository root: `recipes.common` (and hessopt without `pip install -e .`)
    sys.path.insert(0, _ROOT)
import hessopt  # noqa: E402
from hessopt.monitor import CurvatureMonitor  # noqa: E402
from recipes.common import (IMAGENET_MEAN, IMAGENET_STD, DeviceLoader, FolderLoader, build_model,  # noqa: E402
                            fixed_batch, image_folders, load_dataset)
from recipes.common.plotting import plot_run  # noqa: E402
from recipes.image_classification.checkpoint import (RESUME_KEYS, CheckpointError, read_checkpoint,  # noqa: E402
                                                     save_checkpoint, write_text_atomic)


class UsageError(ValueError):
    """An option or run directory the recipe refuses; the script prints it without a traceback."""


def _opt(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A Config field whose comment is also its --help text."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Config:
    # data and model
    dataset: Optional[str] = _opt(None, "digits | cifar10 | imagefolder (default: the preset's, else digits)", type=str, choices=("digits", "cifar10", "imagefolder"))
    data_dir: Optional[str] = _opt(None, "data location (cifar10: pickles, JPEG folders or the .tar.xz; default ../shared/data)", type=str)
    cache_dir: Optional[str] = _opt(None, "where decoded CIFAR-10 arrays are cached (default ~/.cache/hessopt)", type=str)
    model: Optional[str] = _opt(None, "cifar_resnet20/32/38/56, digits_cnn, or a timm model (default cifar_resnet20)", type=str)
    batchnorm: bool = _opt(True, "keep BatchNorm layers (--no-batchnorm removes them; the recipes' own models only)", type=bool)
    residual: bool = _opt(True, "keep residual connections (--no-residual: plain network; CIFAR ResNets)", type=bool)
    augment: Optional[bool] = _opt(None, "random crop (padding 4) + flip; with --stream RandomResizedCrop + flip (default: on for cifar10/imagefolder, off for digits)", type=bool)
    stream: bool = _opt(False, "imagefolder only: stream JPEGs with DataLoader workers instead of decoding the set into memory; for ImageNet-size trees", type=bool)
    image_size: int = _opt(224, "--stream: side of the square images (training: RandomResizedCrop; evaluation: resize to image_size/0.875, center crop)", type=int)
    workers: int = _opt(4, "--stream: DataLoader worker processes per rank (0: decode in the training process; the batches do not depend on it)", type=int)
    # optimization
    preset: Optional[str] = _opt(None, "paper_adahessian_cifar | paper_sgd_cifar", type=str, choices=("paper_adahessian_cifar", "paper_sgd_cifar"))
    opt: Optional[str] = _opt(None, "adahessian | sgd | adamw | any timm optimizer name (default adahessian)", type=str)
    epochs: Optional[int] = _opt(None, "number of epochs (default: the preset's, else 10)", type=int)
    batch_size: Optional[int] = _opt(None, "global batch size (default: the preset's, else 128)", type=int)
    lr: Optional[float] = _opt(None, "learning rate (default: adahessian 0.15, sgd 0.1, adamw and timm 1e-3)", type=float)
    weight_decay: Optional[float] = _opt(None, "in the optimizer's own convention: decoupled for adahessian/adamw (adahessian 5e-4/0.15, adamw 0.05), L2 for sgd (5e-4)", type=float)
    momentum: Optional[float] = _opt(None, "SGD momentum (0.9)", type=float)
    nesterov: bool = _opt(True, "Nesterov momentum for SGD", type=bool)
    betas: Optional[Tuple[float, float]] = _opt(None, "Adam-style betas (0.9 0.999)", type=float, nargs=2)
    eps: Optional[float] = _opt(None, "denominator epsilon (adahessian 1e-4, adamw 1e-8)", type=float)
    milestones: Optional[Tuple[int, ...]] = _opt(None, "epochs at which lr is multiplied by --gamma (default: the preset's scaled to --epochs, else 50%% and 75%% of --epochs; none given: constant lr)", type=int, nargs="*")
    gamma: float = _opt(0.1, "lr factor at each milestone", type=float)
    update_each: int = _opt(1, "AdaHessian: Hessian estimate every K steps (lazy Hessian)", type=int)
    clip: str = _opt("1.0", "AdaHessian: bound on each coordinate of the preconditioned update (the default "
                            "1.0), or 'none' for the paper's unbounded rule", type=str)
    warmup_steps: int = _opt(0, "linear lr warm-up over the first N steps (lazy Hessian updates are unstable "
                                "without it early in training, when the curvature changes fastest)", type=int)
    amp: str = _opt("none", "none | bf16 (autocast)", type=str, choices=("none", "bf16"))
    seed: int = _opt(0, "seed of the model initialization, the data order and the Hessian probes", type=int)
    # run
    device: str = _opt("auto", "auto (cuda when available) | cpu | cuda | cuda:N", type=str)
    output_dir: Optional[str] = _opt(None, "where config.json, metrics.jsonl, checkpoint.pt and plots go", type=str)
    resume: bool = _opt(False, "continue from output_dir/checkpoint.pt (bit-exact on CPU)", type=bool)
    overwrite: bool = _opt(False, "start again in an output_dir that already holds a run (deletes its checkpoint and "
                                  "metrics); without it such a directory is refused", type=bool)
    allow_config_change: bool = _opt(False, "with --resume: apply changed hyper-parameters (--lr, --weight-decay, "
                                            "--milestones, ...) from the next epoch on instead of refusing them", type=bool)
    max_steps_per_epoch: Optional[int] = _opt(None, "stop each epoch after this many steps (tests, smoke runs)", type=int)
    eval_batch_size: int = _opt(1000, "batch size for evaluation", type=int)
    progress: bool = _opt(True, "tqdm progress bars", type=bool)
    plots: bool = _opt(True, "write the plots at the end (needs matplotlib)", type=bool)
    tensorboard: bool = _opt(True, "also log curvature to output_dir/tensorboard when tensorboard is installed", type=bool)
    # curvature (hessopt.CurvatureMonitor)
    curvature_every: int = _opt(0, "evaluate curvature every N steps (0: off)", type=int)
    curvature_k: int = _opt(5, "number of top Hessian eigenvalues", type=int)
    curvature_batch_size: int = _opt(128, "held-out images for the curvature (a fixed random subset of the test split)", type=int)
    curvature_trace_matvecs: int = _opt(30, "Hutch++ budget for the trace", type=int)
    curvature_density: bool = _opt(False, "also record the spectral density (60 Lanczos steps)", type=bool)


PRESETS: Dict[str, Dict[str, Any]] = {
    # Yao et al. 2021, CIFAR-10: weight decay 5e-4 applied as theta -= lr * (5e-4 / lr0) * theta,
    # i.e. decoupled weight decay 5e-4 / 0.15 (lr0 = 0.15)
    "paper_adahessian_cifar": dict(dataset="cifar10", model="cifar_resnet20", opt="adahessian", lr=0.15,
                                   betas=(0.9, 0.999), eps=1e-4, weight_decay=5e-4 / 0.15, batch_size=256,
                                   epochs=160, milestones=(80, 120)),
    "paper_sgd_cifar": dict(dataset="cifar10", model="cifar_resnet20", opt="sgd", lr=0.1, momentum=0.9,
                            nesterov=True, weight_decay=5e-4, batch_size=256, epochs=160, milestones=(80, 120)),
}
DEFAULTS = dict(dataset="digits", model="cifar_resnet20", opt="adahessian", epochs=10, batch_size=128)
OPT_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "adahessian": dict(lr=0.15, weight_decay=5e-4 / 0.15, betas=(0.9, 0.999), eps=1e-4),
    "sgd": dict(lr=0.1, weight_decay=5e-4, momentum=0.9),
    "adamw": dict(lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8),
    "timm": dict(lr=1e-3, weight_decay=0.05),
}
# changing these on --resume would make the checkpoint meaningless
RESUME_FIXED = ("dataset", "data_dir", "stream", "image_size", "model", "batchnorm", "residual", "opt", "seed", "batch_size")
# changing these on --resume changes the training: refused unless --allow-config-change
RESUME_HYPER = ("lr", "weight_decay", "momentum", "nesterov", "betas", "eps", "milestones", "gamma", "update_each", "clip",
                "warmup_steps", "amp", "augment", "max_steps_per_epoch")
# how to run, not what to train: never inherited from a saved configuration
RUN_CONTROL = ("resume", "overwrite", "allow_config_change")
# what an --output-dir holding a run has; --overwrite deletes them
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "curvature.jsonl")


def resolve(cfg: Config) -> Tuple[Config, List[str]]:
    """Fill every ``None`` from the preset and the defaults; returns the full config and notes."""
    notes: List[str] = []
    preset = PRESETS[cfg.preset] if cfg.preset else {}
    values = dataclasses.asdict(cfg)
    for key in ("dataset", "model", "opt", "epochs", "batch_size"):
        if values[key] is None:
            values[key] = preset.get(key, DEFAULTS[key])
    opt_defaults = OPT_DEFAULTS.get(values["opt"], OPT_DEFAULTS["timm"])
    for key in ("lr", "weight_decay", "momentum", "betas", "eps"):
        if values[key] is None:
            values[key] = preset.get(key, opt_defaults.get(key))
    if values["augment"] is None:
        values["augment"] = values["dataset"] != "digits"
    epochs = values["epochs"]
    if values["milestones"] is None:
        if "milestones" in preset:
            values["milestones"] = tuple(int(m * epochs / preset["epochs"] + 0.5) for m in preset["milestones"])
            if epochs != preset["epochs"]:
                notes.append(f"milestones scaled from {list(preset['milestones'])} of {preset['epochs']} epochs "
                             f"to {list(values['milestones'])} of {epochs}")
        else:
            values["milestones"] = tuple(sorted({int(f * epochs + 0.5) for f in (0.5, 0.75)} - {0, epochs}))
    values["milestones"] = tuple(values["milestones"])
    if values["betas"] is not None:
        values["betas"] = tuple(values["betas"])
    for key in ("epochs", "batch_size", "update_each", "eval_batch_size", "curvature_batch_size", "image_size"):
        if values[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {values[key]}")
    for key in ("curvature_every", "workers"):
        if values[key] < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 0, got {values[key]}")
    if values["stream"] and values["dataset"] != "imagefolder":
        raise UsageError(f"--stream reads train/ + val/ JPEG folders: it needs --dataset imagefolder, not "
                         f"{values['dataset']} (which is small enough to decode into memory: drop --stream)")
    if values["stream"] and not values["data_dir"]:
        raise UsageError("--stream needs --data-dir: the folder that holds train/<class>/* and val/<class>/*")
    return Config(**values), notes


# --------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """One option per Config field; only options actually given end up in the namespace."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        flag = "--" + f.name.replace("_", "-")
        if meta.pop("type") is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=meta["help"])
        else:
            parser.add_argument(flag, type=f.metadata["type"], **meta)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> Config:
    """The options given; with --resume on top of the checkpoint's options as given (the checkpoint,
    not config.json, is the source of truth: a missing or stale config.json changes nothing)."""
    explicit = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(build_parser().parse_args(argv)).items()}
    base = Config()
    if explicit.get("resume"):
        if not explicit.get("output_dir"):
            raise SystemExit("--resume needs --output-dir (the run to continue)")
        path = Path(explicit["output_dir"]) / "checkpoint.pt"
        if path.exists():  # (main() says so when it does not)
            saved = read_checkpoint(path, require=("config",))["config"]
            if not isinstance(saved, dict):
                raise CheckpointError(f"{path}: 'config' should be a dict of options, got {type(saved).__name__}")
            names = {f.name for f in dataclasses.fields(Config)} - set(RUN_CONTROL)
            base = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names})
    return dataclasses.replace(base, **explicit)


# --------------------------------------------------------------------------------------------------
# setup


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: Config) -> Tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process per GPU (nccl) or per CPU slot (gloo)."""
    dist = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    wanted = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(wanted)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    if dist.world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


def _clip(text: str) -> Optional[float]:
    """``--clip``: a positive number, or ``none`` (the paper's unbounded AdaHessian step)."""
    if str(text).lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--clip must be a positive number or 'none', got {text!r}") from None


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.opt == "adahessian":
        return hessopt.AdaHessian(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, update_each=cfg.update_each, seed=cfg.seed,
                                  clip=_clip(cfg.clip))
    if cfg.opt == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.opt == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    try:
        import timm.optim
    except ImportError as err:
        raise ImportError(f"--opt {cfg.opt} would come from timm: pip install hessopt[timm]") from err
    if "hessopt" in cfg.opt.lower():  # hessopt-adahessian, hessopt_adahessian, lookahead_hessopt-adahessian
        from hessopt.integrations.timm import register

        register()
    return timm.optim.create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: Config):
    """lr multiplier of epoch ``e`` (0-based): gamma ** (number of milestones <= e)."""
    return lambda e: cfg.gamma ** sum(1 for m in cfg.milestones if m <= e)


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class RunData:
    """What main() needs from the data, held in memory (DeviceLoader) or streamed (FolderLoader)."""
    train_loader: Any
    test_loader: Any  # this rank's share of the test split
    num_classes: int
    in_chans: int
    train_size: int
    test_size: int
    probe: Callable[[int], Tuple[torch.Tensor, torch.Tensor]]  # n fixed held-out images -> this rank's share
    args: Dict[str, Any]  # the checkpoint's dataset_args: what `hessopt analyze` rebuilds the data from


def load_data(cfg: Config, dist: Dist, device: torch.device) -> RunData:
    return _streamed_data(cfg, dist, device) if cfg.stream else _in_memory_data(cfg, dist, device)


def _in_memory_data(cfg: Config, dist: Dist, device: torch.device) -> RunData:
    # rank 0 decodes (and caches) first, the others read the cache
    if dist.world_size > 1 and not dist.main:
        torch.distributed.barrier()
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.cache_dir)
    if dist.world_size > 1 and dist.main:
        torch.distributed.barrier()
    pad = 4 if data.image_size[0] >= 16 else 1
    train_loader = DeviceLoader(data.train_x, data.train_y, cfg.batch_size, data.mean, data.std, shuffle=True,
                                augment=cfg.augment, pad=pad, flip=cfg.dataset != "digits", seed=cfg.seed,
                                device=device, rank=dist.rank, world_size=dist.world_size,
                                max_batches=cfg.max_steps_per_epoch)
    test_shard = slice(dist.rank, None, dist.world_size)
    test_loader = DeviceLoader(data.test_x[test_shard], data.test_y[test_shard], cfg.eval_batch_size, data.mean,
                               data.std, device=device)

    def probe(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        # a fixed random subset of the test split (CIFAR-10's test images are stored class by class)
        pick = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(cfg.seed))
        mine = pick[:n][dist.rank :: dist.world_size]
        return next(iter(DeviceLoader(data.test_x[mine], data.test_y[mine], len(mine), data.mean, data.std,
                                      device=device)))

    return RunData(train_loader, test_loader, data.num_classes, data.in_chans, len(data.train_y),
                   len(data.test_y), probe, dict(name=cfg.dataset, data_dir=cfg.data_dir))


def _streamed_data(cfg: Config, dist: Dist, device: torch.device) -> RunData:
    # JPEGs decoded and transformed by DataLoader workers; ImageNet's normalization (FolderLoader's default)
    train_set, val_set = image_folders(cfg.data_dir)
    common = dict(image_size=cfg.image_size, num_workers=cfg.workers, device=device)
    train_loader = FolderLoader(train_set, cfg.batch_size, shuffle=True, augment=cfg.augment, seed=cfg.seed,
                                rank=dist.rank, world_size=dist.world_size, max_batches=cfg.max_steps_per_epoch,
                                **common)
    test_loader = FolderLoader(val_set, cfg.eval_batch_size, indices=range(dist.rank, len(val_set), dist.world_size),
                               **common)

    def probe(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return fixed_batch(val_set, n, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, **common)

    args = dict(name=cfg.dataset, data_dir=cfg.data_dir, stream=True, image_size=cfg.image_size,
                mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return RunData(train_loader, test_loader, len(train_set.classes), 3, len(train_set), len(val_set), probe, args)


# --------------------------------------------------------------------------------------------------
# one epoch


def train_epoch(cfg, model, opt, loader, criterion, autocast, monitor, counters, epoch, dist, device):
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, curvature_time = 0, 0.0
    closure_driven = isinstance(opt, hessopt.AdaHessian)
    bar = _progress(loader, cfg.progress and dist.main, f"epoch {epoch + 1}/{cfg.epochs}")
    for x, y in bar:
        if counters["step"] < cfg.warmup_steps:
            warm = (counters["step"] + 1) / cfg.warmup_steps * lr_factor(cfg)(epoch)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * warm
        if closure_driven:
            # AdaHessian runs the closure with a graph-building backward only on Hessian steps
            # (opt.needs_hessian), so lazy updates (--update-each K) skip the double backward.
            outputs = {}

            def closure():
                opt.zero_grad(set_to_none=True)
                with autocast():
                    out = model(x)
                    loss = criterion(out, y)
                loss.backward()
                outputs["logits"] = out.detach()
                return loss

            loss = opt.step(closure)
            logits = outputs["logits"]
        else:
            opt.zero_grad(set_to_none=True)
            with autocast():
                logits = model(x)
                loss = criterion(logits, y)
            # timm's convention for second-order optimizers; False for SGD/AdamW
            second_order = bool(getattr(opt, "needs_hessian", getattr(opt, "is_second_order", False)))
            loss.backward(create_graph=second_order)
            opt.step()
            if second_order:
                opt.zero_grad(set_to_none=True)  # frees the double-backward graph
            logits = logits.detach()
        counters["step"] += 1
        loss_sum += loss.detach().double() * y.numel()
        correct += (logits.argmax(1) == y).sum()
        seen += y.numel()
        if monitor is not None and monitor.due(counters["step"]):
            start = time.perf_counter()
            sync_buffers(model, dist)
            monitor.step(counters["step"], epoch=epoch + 1)
            curvature_time += time.perf_counter() - start
        if hasattr(bar, "set_postfix") and counters["step"] % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    totals = _all_reduce([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)], dist)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2]), curvature_time


@torch.no_grad()
def evaluate(model, loader, criterion, autocast, dist, device) -> Tuple[float, float]:
    model.eval()  # the unwrapped module: no DDP collectives, ranks may see different batch counts
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in loader:
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum().double()
        seen += y.numel()
    loss_sum, correct, seen = _all_reduce([loss_sum, correct, seen], dist)
    return float(loss_sum / seen), float(correct / seen)


def sync_buffers(model: nn.Module, dist: Dist) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts rank 0's buffers at the start of every training forward, after which each rank
    updates them with its own shard's batch statistics, so after a step they differ between ranks.
    Evaluation and the curvature monitor (BatchNorm in eval mode) must use one set: rank 0's, the one
    the checkpoint saves. Training is unchanged (DDP would broadcast the same values next forward).
    """
    if dist.world_size > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def _all_reduce(tensors: List[torch.Tensor], dist: Dist) -> List[torch.Tensor]:
    if dist.world_size == 1:
        return tensors
    from hessopt.distributed import all_reduce_sum

    return all_reduce_sum(tensors)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# checkpoints


def rng_states(device: torch.device) -> Dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def read_records(path: Path) -> List[Dict[str, Any]]:
    """The JSON records of a ``.jsonl`` log; a truncated last line (a kill mid-write) is dropped with
    a warning, any other line that is not a JSON object is an error that names the line."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records: List[Dict[str, Any]] = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if i == last:
                warnings.warn(f"{path}: the last line is incomplete (the run was killed while writing it); "
                              f"dropped: {line[:80]!r}", RuntimeWarning, stacklevel=2)
                continue
            raise UsageError(f"{path}, line {i + 1}, is not a JSON record ({err}): {line[:80]!r}; repair or "
                             "delete that line, then resume again") from None
        records.append(record)
    return records


def _truncate_jsonl(path: Path, keep) -> None:
    """Drop records written after the checkpoint (a run interrupted between log and checkpoint) and
    a truncated last line; rewritten atomically."""
    if path.exists():
        kept = [r for r in read_records(path) if keep(r)]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def refuse_existing_run(out: Path, cfg: Config) -> None:
    """Without --resume, an output directory that holds a run is refused unless --overwrite."""
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the run in --output-dir and --overwrite starts it again: pass one")
    if cfg.resume or cfg.overwrite:
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        raise UsageError(
            f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it, --overwrite to start "
            "it again (deletes its checkpoint and metrics), or choose another --output-dir")


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def check_resume(checkpoint: Dict[str, Any], cfg: Config) -> Tuple[List[str], List[str]]:
    """Compare the resumed run's configuration with the checkpoint's.

    Raises for a changed data set, model, optimizer, seed, ... (the checkpoint would be meaningless),
    and for a changed hyper-parameter (``RESUME_HYPER``) without ``--allow-config-change``. Returns
    ``(notes, changed)``: what the log and config.json say, and the hyper-parameters that change.
    """
    saved = checkpoint["resolved"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"the checkpoint's 'resolved' should be a dict of options, got {type(saved).__name__}")
    defaults = dataclasses.asdict(Config())  # options newer than the checkpoint had their defaults
    now = dataclasses.asdict(cfg)
    before = {k: _norm(saved.get(k, defaults[k])) for k in RESUME_FIXED + RESUME_HYPER + ("epochs",)}
    fixed = [k for k in RESUME_FIXED if before[k] != _norm(now[k])]
    if fixed:
        raise UsageError(f"--resume with a different {', '.join(fixed)} than the checkpoint "
                         f"({', '.join(f'{k}={before[k]!r}' for k in fixed)}): start a new --output-dir")
    changed = [k for k in RESUME_HYPER if before[k] != _norm(now[k])]
    epoch = checkpoint["epoch"]
    diff = ", ".join(f"--{k.replace('_', '-')} {before[k]!r} -> {_norm(now[k])!r}" for k in changed)
    notes: List[str] = []
    if changed and not cfg.allow_config_change:
        raise UsageError(
            f"--resume with other hyper-parameters than the checkpoint's ({diff}): the run would not train with "
            f"them as you expect. Drop these options to continue as trained, or pass --allow-config-change to "
            f"train with the new values from epoch {epoch + 1} on (moments and step counters are kept)")
    if changed:
        notes.append(f"--allow-config-change: from epoch {epoch + 1} on, {diff}")
    if before["epochs"] != cfg.epochs:
        notes.append(f"--epochs {cfg.epochs} (the checkpoint's run had {before['epochs']}): the lr milestones stay at "
                     f"epochs {list(cfg.milestones)}" + ("" if "milestones" in changed else
                                                         " (to move them: --milestones ... --allow-config-change)"))
    return notes, changed


# --------------------------------------------------------------------------------------------------
# main


def main(cfg: Config) -> Dict[str, Any]:
    """Train as ``cfg`` says; returns the last epoch record (plus ``output_dir``)."""
    given = cfg
    out = Path(cfg.output_dir) if cfg.output_dir else None
    ckpt_path = out / "checkpoint.pt" if out else None
    if out is not None:
        refuse_existing_run(out, cfg)
    checkpoint = None
    if cfg.resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise UsageError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        checkpoint = read_checkpoint(ckpt_path, require=RESUME_KEYS)  # on the CPU: RNG states must stay there
        resolved = checkpoint["resolved"]
        if given.milestones is None and isinstance(resolved, dict) and resolved.get("milestones") is not None:
            # the schedule is in absolute epochs: another --epochs must not move it
            given = dataclasses.replace(given, milestones=tuple(resolved["milestones"]))
    cfg, notes = resolve(given)
    changed: List[str] = []
    if checkpoint is not None:
        resume_notes, changed = check_resume(checkpoint, cfg)
        notes += resume_notes
    dist, device = setup_distributed(cfg)
    log = print if dist.main else (lambda *a, **k: None)
    for note in notes:
        log(f"note: {note}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fastest kernels; GPU runs are then not bit-reproducible

    data = load_data(cfg, dist, device)
    train_loader, test_loader = data.train_loader, data.test_loader

    # model and optimizer (same seed on every rank: identical initial weights)
    torch.manual_seed(cfg.seed)
    model_args = dict(name=cfg.model, num_classes=data.num_classes, in_chans=data.in_chans,
                      batchnorm=cfg.batchnorm, residual=cfg.residual)
    net = build_model(**model_args).to(device)
    model = net
    if dist.world_size > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    opt = build_optimizer(cfg, net)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    criterion = nn.CrossEntropyLoss()
    amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    counters = {"step": 0}
    start_epoch = 0
    if checkpoint is not None:
        # the new configuration's hyper-parameters, for --allow-config-change (state_dict loading
        # would replace them with the checkpoint's)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        net.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        sched.load_state_dict(checkpoint["scheduler"])
        if changed:
            for group, new in zip(opt.param_groups, fresh):
                for key in opt.defaults:
                    if key != "lr" and key in new:
                        group[key] = new[key]
                group["initial_lr"] = new["initial_lr"]
            sched.base_lrs = [group["initial_lr"] for group in opt.param_groups]
        train_loader.load_state_dict(checkpoint["loader"])
        set_rng_states(checkpoint["rng"], device)
        start_epoch, counters["step"] = checkpoint["epoch"], checkpoint["step"]
        for group in opt.param_groups:  # the (possibly extended) schedule decides the lr from here on
            group["lr"] = group["initial_lr"] * lr_factor(cfg)(start_epoch)
        log(f"resumed from {ckpt_path} after epoch {start_epoch} (step {counters['step']})")

    record = {}
    if out is not None and dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint.pt.tmp").unlink(missing_ok=True)  # left by a crash inside save_checkpoint
        write_text_atomic(out / "config.json", json.dumps({"config": dataclasses.asdict(given),
                                                           "resolved": dataclasses.asdict(cfg),
                                                           "model_args": model_args, "notes": notes}, indent=2))
        if checkpoint is not None:
            _truncate_jsonl(out / "metrics.jsonl", lambda r: r.get("epoch", 0) <= start_epoch)
            _truncate_jsonl(out / "curvature.jsonl", lambda r: r.get("step", 0) <= counters["step"])
        else:  # a new run (refuse_existing_run let it through: nothing there, or --overwrite)
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)

    monitor = None
    if cfg.curvature_every > 0:
        # a fixed random subset of the test split; each rank takes its share, and the Hessian
        # operator averages over the ranks
        monitor = CurvatureMonitor(net, criterion, data.probe(cfg.curvature_batch_size), every=cfg.curvature_every,
                                   k=cfg.curvature_k, trace_matvecs=cfg.curvature_trace_matvecs,
                                   density=cfg.curvature_density, seed=cfg.seed,
                                   log_path=out / "curvature.jsonl" if out and dist.main else None,
                                   tensorboard=None if dist.main and cfg.tensorboard else False)
        if start_epoch == 0:
            monitor.step(0, epoch=0)  # the spectrum at initialization

    log(f"{cfg.model} on {cfg.dataset}{' (streamed)' if cfg.stream else ''} ({data.train_size} train / "
        f"{data.test_size} test), {cfg.opt} "
        f"lr {cfg.lr:g} wd {cfg.weight_decay:g}, batch {cfg.batch_size}, {cfg.epochs} epochs, "
        f"milestones {list(cfg.milestones)}, device {device}, {dist.world_size} process(es)")
    for epoch in range(start_epoch, cfg.epochs):
        start = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        train_loss, train_acc, curvature_time = train_epoch(cfg, model, opt, train_loader, criterion, autocast,
                                                            monitor, counters, epoch, dist, device)
        # train_epoch's float() results have waited for the device: the clock is honest here
        train_time = time.perf_counter() - start - curvature_time
        sched.step()
        sync_buffers(net, dist)
        val_loss, val_acc = evaluate(net, test_loader, criterion, autocast, dist, device)
        elapsed = time.perf_counter() - start - curvature_time
        record = {"epoch": epoch + 1, "step": counters["step"], "train_loss": train_loss, "train_acc": train_acc,
                  "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "time_s": elapsed,
                  "train_time_s": train_time, "curvature_time_s": curvature_time}
        log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f} acc {100 * train_acc:.2f}%  "
            f"val loss {val_loss:.4f} acc {100 * val_acc:.2f}%  lr {lr:.4g}  {elapsed:.1f}s"
            + (f" (+{curvature_time:.1f}s curvature)" if curvature_time else ""))
        if out is not None and dist.main:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(ckpt_path, {
                "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "loader": train_loader.state_dict(), "rng": rng_states(device), "epoch": epoch + 1,
                "step": counters["step"], "config": dataclasses.asdict(given), "resolved": dataclasses.asdict(cfg),
                "model_args": model_args, "dataset_args": data.args,
                "metrics": record, "notes": notes, "hessopt_version": hessopt.__version__,
            })
    if monitor is not None:
        monitor.close()
    if out is not None and dist.main and cfg.plots:
        try:
            written = plot_run(out)
            log("plots: " + ", ".join(p.name for p in written))
        except ImportError as err:
            log(f"no plots: {err}")
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return {**record, "output_dir": str(out) if out else None}


if __name__ == "__main__":
    try:
        main(parse_args())
    except (UsageError, CheckpointError) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)
