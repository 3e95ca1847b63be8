"""Helpers shared by the reproduction scripts in recipes/analysis (training loops, data, JSON, timing).

Not part of the hessopt package: small, explicit code the scripts import with
``sys.path.insert(0, <this folder>)``.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # the repository root: `recipes.common`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from recipes.common import DeviceLoader, load_dataset  # noqa: E402


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here")
    return device


def eval_batches(data, split: str, num: int, batch_size: int, device, offset: int = 0,
                 seed: int = 1234) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``num`` batches of normalized, non-augmented images from ``split`` ("train" or "test"),
    a fixed random subset (the same for every model of a study)."""
    x = data.train_x if split == "train" else data.test_x
    y = data.train_y if split == "train" else data.test_y
    # a fixed random subset: CIFAR-10's JPEG folders are stored class by class
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[offset:offset + num * batch_size]
    loader = DeviceLoader(x[idx], y[idx], batch_size, data.mean, data.std,
                          shuffle=False, augment=False, drop_last=False, device=device)
    return list(loader)


def accuracy(model: nn.Module, batches) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.shape[0])
    model.train(was)
    return correct / total


def train(
    model: nn.Module,
    data,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    device,
    seed: int,
    augment: bool,
    flip: bool = True,
    weight_decay: float = 5e-4,
    warmup_epochs: float = 0.0,
    max_steps_per_epoch: Optional[int] = None,
    callback=None,
    callback_every: int = 0,
    log=print,
) -> Dict[str, Any]:
    """SGD (momentum 0.9, nesterov) with a linear warmup then cosine decay; returns a small history.

    ``callback(step, epoch)`` runs every ``callback_every`` optimizer steps (and at step 0),
    e.g. to measure the Hessian during training.
    """
    torch.manual_seed(seed)
    loader = DeviceLoader(data.train_x, data.train_y, batch_size, data.mean, data.std, shuffle=True,
                          augment=augment, flip=flip, seed=seed, device=device, max_batches=max_steps_per_epoch)
    steps_per_epoch = len(loader)
    total = epochs * steps_per_epoch
    warm = int(warmup_epochs * steps_per_epoch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)

    def lr_at(step):
        if step < warm:
            return lr * (step + 1) / warm
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    loss_fn = nn.CrossEntropyLoss()
    step, history = 0, {"loss": []}
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        running, count = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for x, y in loader:
            if callback is not None and callback_every and step % callback_every == 0:
                callback(step, epoch)
                model.train()
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            running += loss.detach() * y.shape[0]
            count += y.shape[0]
            step += 1
        mean = float(running) / max(count, 1)
        history["loss"].append(mean)
        if not math.isfinite(mean):
            log(f"  non-finite training loss in epoch {epoch + 1}: stopping this run")
            history["diverged"] = True
            return history
    if callback is not None and callback_every:
        callback(step, epochs)
    history["seconds"] = time.perf_counter() - t0
    history["steps"] = step
    return history


def save_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


# -- the shape every study script shares: CIFAR-style arguments, data, and the closing write-up ---


def add_study_args(p, out: str, bn_mode: str) -> None:
    """The arguments of the CIFAR studies (data, SGD schedule, Hessian batch, run control)."""
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate with BatchNorm")
    p.add_argument("--lr-no-bn", type=float, default=0.05, help="peak SGD learning rate without BatchNorm")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--hessian-samples", type=int, default=512, help="training images the Hessian is taken on")
    p.add_argument("--hessian-batch", type=int, default=256)
    p.add_argument("--bn-mode", choices=["eval", "train"], default=bn_mode)
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut epochs short (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=out)
    p.add_argument("--no-plots", action="store_true")


def load_study_data(args):
    """``(device, out, data, hessian batches, test batches)`` for a CIFAR study's arguments."""
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    hess_data = eval_batches(data, "train", max(1, args.hessian_samples // args.hessian_batch),
                             min(args.hessian_batch, args.hessian_samples), device)
    test = eval_batches(data, "test", 8, 500, device)
    return device, out, data, hess_data, test


def finish(results: Dict[str, Any], out: Path, started: float, summarize, plot, no_plots: bool) -> Dict[str, Any]:
    """Write results.json and summary.md, print the summary, draw the plots; returns ``results``."""
    results["seconds"] = time.perf_counter() - started
    save_json(results, out / "results.json")
    summary = summarize(results)
    (out / "summary.md").write_text(summary)
    print(summary)
    if not no_plots:
        plot(results, out)
    print(f"done in {results['seconds']:.0f} s; wrote {out}")
    return results
