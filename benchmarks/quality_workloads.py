"""The time-to-quality workloads: real data, a model, a seeded training stream, a validation metric.

==========================  ======================================================================
``gpt_multi30k_char``       :class:`benchmarks.gpt.GPT` (pre-LN, ``F.scaled_dot_product_attention``
                            with PyTorch's default kernels) trained as a character-level language
                            model on the English side of Multi30k (``train.en.gz``, sentences joined
                            by newlines); metric: mean next-character cross-entropy (nats) on a
                            fixed subset of the Multi30k validation split (``val.en.gz``): the first
                            ``val_windows`` non-overlapping windows of ``seq_len`` characters.
``cifar10_resnet``          a CIFAR ResNet (:class:`CifarResNet`, option-A shortcuts, BatchNorm) on
                            a fixed, seeded subset of the CIFAR-10 JPEGs (``cifar10-jpeg.tar.xz``
                            through the recipes' reader and its ``.npy`` cache); standard
                            augmentation (random crop with 4 pixels of zero padding + horizontal
                            flip, seeded per run); metric: accuracy on a fixed, seeded subset of
                            the CIFAR-10 test split (BatchNorm in eval mode).
==========================  ======================================================================

``quick=True`` shrinks both to CI size (a few dozen steps): the GPT on a short prefix of the same
text; the vision workload on scikit-learn's 8x8 digits (shipped with scikit-learn, no archive to
decode), crop padding 1 and no flips (mirrored digits differ).

Every run of a contender gets its own model (built under ``torch.manual_seed(seed)``, so all
contenders of one seed start from the same weights) and its own data stream (seeded by ``seed``:
all contenders of one seed see the same batches in the same order).
"""
from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QualityWorkload", "QUALITY_WORKLOADS", "get_quality_workloads", "default_data_root"]

QUALITY_WORKLOADS = ("gpt_multi30k_char", "cifar10_resnet")

_ROOT = Path(__file__).resolve().parents[1]


def default_data_root() -> Path:
    """``../shared/data`` beside the repository (the offline copies of Multi30k and CIFAR-10)."""
    return _ROOT.parent / "shared" / "data"


def _zoo():
    """The recipes' models and data readers (``recipes.common``; ``hessopt.zoo`` in older trees)."""
    try:
        import recipes.common as zoo  # noqa: F401

        return zoo
    except ImportError:
        import hessopt.zoo as zoo

        return zoo


@dataclasses.dataclass
class QualityWorkload:
    """One time-to-quality workload; ``config`` is recorded with every result.

    ``build(seed)`` returns a fresh model; ``stream(seed)`` an endless iterator of ``(x, y)``
    training batches on the device; ``evaluate(model)`` the validation metric (model left in train
    mode); ``loss(logits, y)`` the training loss (a plain ``F.cross_entropy`` call, which is what
    curvature sources such as Gauss-Newton-Bartlett look for); ``batch_size`` the number of
    predictions per batch (Sophia's ``bs``).
    """

    name: str
    metric: str
    higher_is_better: bool
    steps: int
    eval_every: int
    build: Callable[[int], nn.Module]
    stream: Callable[[int], Iterator[Tuple[torch.Tensor, torch.Tensor]]]
    evaluate: Callable[[nn.Module], float]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    predictions_per_batch: int
    kind: str
    config: Dict[str, Any]

    def better(self, a: Optional[float], b: Optional[float]) -> bool:
        """Whether metric ``a`` reaches ``b`` (``<=`` for a loss, ``>=`` for an accuracy)."""
        if a is None or b is None:
            return False
        return a >= b if self.higher_is_better else a <= b


# --------------------------------------------------------------------------------------------------
# character-level GPT on Multi30k (English)


def _read_lines(path: Path, max_chars: Optional[int] = None) -> str:
    if not path.exists():
        raise ValueError(f"Multi30k file {path} does not exist; pass --quality-data-dir (a folder holding "
                         "multi30k/train.en.gz and multi30k/val.en.gz)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    text = "\n".join(line.strip() for line in text.splitlines() if line.strip()) + "\n"
    return text[:max_chars] if max_chars else text


def _gpt_workload(data_root: Path, device: torch.device, quick: bool, steps: int, eval_every: int, *, n_layers: int,
                  d_model: int, n_heads: int, seq_len: int, batch: int, val_windows: int) -> QualityWorkload:
    from .gpt import GPT

    folder = data_root / "multi30k"
    train_text = _read_lines(folder / "train.en.gz", max_chars=200_000 if quick else None)
    val_text = _read_lines(folder / "val.en.gz")
    chars = sorted(set(train_text))
    # index 0 is reserved for characters of the validation text never seen in training
    stoi = {c: i + 1 for i, c in enumerate(chars)}
    vocab = len(chars) + 1
    train = torch.tensor([stoi[c] for c in train_text], dtype=torch.int64)
    val = torch.tensor([stoi.get(c, 0) for c in val_text], dtype=torch.int64)
    n_windows = min(val_windows, (val.numel() - 1) // seq_len)
    starts = torch.arange(n_windows) * seq_len
    offs = torch.arange(seq_len + 1)
    val_tokens = val[starts[:, None] + offs].to(device)  # (n_windows, seq_len + 1): a fixed subset
    val_x, val_y = val_tokens[:, :-1].contiguous(), val_tokens[:, 1:].contiguous()
    train_dev = train.to(device)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return GPT(vocab, d_model, n_layers, n_heads, seq_len).to(device)

    def stream(seed: int):
        gen = torch.Generator().manual_seed(10_000 + seed)
        ar = torch.arange(seq_len + 1, device=device)
        while True:
            start = torch.randint(0, train.numel() - seq_len - 1, (batch,), generator=gen).to(device)
            tok = train_dev[start[:, None] + ar]
            yield tok[:, :-1], tok[:, 1:]

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        total = 0.0
        for i in range(0, val_x.shape[0], 64):
            logits = model(val_x[i:i + 64])
            total += float(F.cross_entropy(logits.reshape(-1, vocab), val_y[i:i + 64].reshape(-1), reduction="sum"))
        model.train()
        return total / val_y.numel()

    config = dict(model="gpt (benchmarks/gpt.py)", n_layers=n_layers, d_model=d_model, n_heads=n_heads, seq_len=seq_len,
                  batch=batch, vocab_size=vocab, tokenizer="characters of train.en (index 0: unseen characters)",
                  train_chars=int(train.numel()), data="Multi30k English (train.en.gz / val.en.gz)",
                  val_subset=f"first {n_windows} non-overlapping windows of {seq_len} characters of val.en "
                             f"({n_windows * seq_len} predicted characters of {val.numel()})",
                  attention="F.scaled_dot_product_attention(is_causal=True), PyTorch's default kernels",
                  metric="validation cross-entropy (nats per character), lower is better")
    return QualityWorkload("gpt_multi30k_char" + ("_quick" if quick else ""), "val_loss", False, steps, eval_every,
                           build, stream, evaluate, loss, batch * seq_len, "lm", config)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 ResNet


def _vision_workload(data_root: Path, device: torch.device, quick: bool, steps: int, eval_every: int, *, depth: int,
                     n_train: int, n_test: int, batch: int, cache_dir: Optional[str]) -> QualityWorkload:
    zoo = _zoo()
    if quick:
        data = zoo.load_dataset("digits")
        pad, flip, source = 1, False, "scikit-learn 8x8 digits (quick mode)"
    else:
        archive = data_root / "cifar10-jpeg.tar.xz"
        if not archive.exists():
            raise ValueError(f"{archive} does not exist; pass --quality-data-dir (the folder holding cifar10-jpeg.tar.xz)")
        data = zoo.load_dataset("cifar10", str(archive), cache_dir=cache_dir)
        pad, flip, source = 4, True, f"CIFAR-10 JPEGs ({archive.name}, decoded once into the reader's .npy cache)"
    g = torch.Generator().manual_seed(1234)  # the subsets are fixed: the same for every run and contender
    train_idx = torch.randperm(data.train_x.shape[0], generator=g)[:n_train].sort().values
    test_idx = torch.randperm(data.test_x.shape[0], generator=g)[:n_test].sort().values
    train_x, train_y = data.train_x[train_idx], data.train_y[train_idx]
    test_loader = zoo.DeviceLoader(data.test_x[test_idx], data.test_y[test_idx], 500, data.mean, data.std,
                                   shuffle=False, augment=False, device=device)
    test_batches = list(test_loader)  # normalized once

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return zoo.CifarResNet(depth, data.num_classes, in_chans=data.in_chans).to(device)

    def stream(seed: int):
        loader = zoo.DeviceLoader(train_x, train_y, batch, data.mean, data.std, shuffle=True, augment=True, pad=pad,
                                  flip=flip, seed=20_000 + seed, device=device)
        while True:
            yield from loader

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        correct = total = 0
        for x, y in test_batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += y.numel()
        model.train()
        return correct / total

    epochs = steps * batch / len(train_idx)
    config = dict(model=f"cifar_resnet{depth} (option-A shortcuts, BatchNorm)", depth=depth, batch=batch,
                  n_train=len(train_idx), n_test=len(test_idx), epochs=round(epochs, 3), data=source,
                  subsets="fixed seeded random subsets (torch.Generator seed 1234) of the train and test splits",
                  augmentation=f"random crop, {pad} px zero padding" + (" + horizontal flip" if flip else "")
                               + ", seeded per run (DeviceLoader seed 20000 + seed)",
                  metric="test accuracy on the fixed test subset, higher is better")
    return QualityWorkload("cifar10_resnet" + ("_quick" if quick else ""), "test_acc", True, steps, eval_every,
                           build, stream, evaluate, loss, batch, "vision", config)


# --------------------------------------------------------------------------------------------------

#: full and quick sizes (chosen from a timing probe on 2 shared CPU cores; benchmarks/README.md)
SIZES = {
    "gpt_multi30k_char": dict(
        full=dict(steps=100, eval_every=10, n_layers=2, d_model=64, n_heads=4, seq_len=64, batch=8, val_windows=64),
        quick=dict(steps=8, eval_every=4, n_layers=1, d_model=32, n_heads=2, seq_len=16, batch=4, val_windows=8),
    ),
    "cifar10_resnet": dict(
        full=dict(steps=64, eval_every=16, depth=8, n_train=1024, n_test=500, batch=16),
        quick=dict(steps=8, eval_every=4, depth=8, n_train=128, n_test=64, batch=16),
    ),
}


def get_quality_workloads(quick: bool, names=None, device: Optional[torch.device] = None,
                          data_root: Optional[str] = None, cache_dir: Optional[str] = None,
                          overrides: Optional[Dict[str, Dict[str, Any]]] = None) -> List[QualityWorkload]:
    """Build the workloads (in the fixed order), filtered by ``names`` (with or without ``_quick``).

    ``overrides`` maps a workload name to size fields replacing :data:`SIZES` (e.g. ``steps``).
    """
    device = torch.device("cpu") if device is None else device
    root = Path(data_root).expanduser() if data_root else default_data_root()
    wanted = None if names is None else {n.replace("_quick", "") for n in names}
    if wanted is not None:
        unknown = wanted - set(QUALITY_WORKLOADS)
        if unknown:
            raise ValueError(f"unknown quality workload(s) {sorted(unknown)}; choose from {list(QUALITY_WORKLOADS)}")
    out = []
    for name in QUALITY_WORKLOADS:
        if wanted is not None and name not in wanted:
            continue
        size = dict(SIZES[name]["quick" if quick else "full"])
        size.update((overrides or {}).get(name, {}))
        steps, every = size.pop("steps"), size.pop("eval_every")
        if name == "gpt_multi30k_char":
            out.append(_gpt_workload(root, device, quick, steps, every, **size))
        else:
            out.append(_vision_workload(root, device, quick, steps, every, cache_dir=cache_dir, **size))
    return out
