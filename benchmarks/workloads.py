"""The timing workloads shared by the optimizer and HVP suites: a model, a synthetic batch, a loss.

Names are fixed (results are compared across runs and with the peer figures of report.py by name):

==========================  ==============================================================
``cifar_resnet20_b128``     CIFAR ResNet20 (recipes.common), 3x32x32 images, batch 128, 10 classes
``resnet50_224_b64``        timm ``resnet50``, 3x224x224 images, batch 64, 1000 classes
``gpt_6l512_t256_b16``      :class:`benchmarks.gpt.GPT`: 6 layers, d_model 512, 8 heads,
                            sequence length 256, batch 16, vocabulary 8192
==========================  ==============================================================

``--quick`` shrinks each one so that the whole suite runs on 2 CPU cores in a minute or two
(ResNet20 batch 8; resnet50 at 32x32, batch 2; GPT 2 layers, d_model 64, 4 heads, T 32, batch 2,
vocabulary 512) and appends
``_quick`` to the name. The data is random (inputs from a seeded generator, random labels/tokens):
step time does not depend on the values, and random data needs no download.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Workload", "WORKLOAD_NAMES", "get_workloads"]

WORKLOAD_NAMES = ("cifar_resnet20_b128", "resnet50_224_b64", "gpt_6l512_t256_b16")


@dataclasses.dataclass
class Workload:
    """One timing workload. ``config`` is recorded with every result."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device, torch.Generator], Tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    config: Dict[str, Any]


def _image_workload(name: str, model_name: str, num_classes: int, size: int, batch: int) -> Workload:
    def build() -> nn.Module:
        from recipes.common import build_model

        return build_model(model_name, num_classes)

    def make_batch(device: torch.device, gen: torch.Generator):
        x = torch.randn(batch, 3, size, size, generator=gen).to(device)
        y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
        return x, y

    config = dict(model=model_name, image_size=size, batch=batch, num_classes=num_classes, data="synthetic")
    return Workload(name, build, make_batch, F.cross_entropy, config)


def _gpt_workload(name: str, layers: int, d_model: int, heads: int, seq: int, batch: int, vocab: int) -> Workload:
    from .gpt import GPT, lm_loss

    def build() -> nn.Module:
        return GPT(vocab, d_model, layers, heads, seq)

    def make_batch(device: torch.device, gen: torch.Generator):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    config = dict(model="gpt", n_layers=layers, d_model=d_model, n_heads=heads, seq_len=seq, batch=batch,
                  vocab_size=vocab, attention="F.scaled_dot_product_attention(is_causal=True), default kernels",
                  data="synthetic")
    return Workload(name, build, make_batch, lm_loss, config)


def get_workloads(quick: bool, names=None) -> List[Workload]:
    """The workloads, in the fixed order, filtered by ``names`` (full or ``_quick`` names)."""
    if quick:
        all_ = [
            _image_workload("cifar_resnet20_b128_quick", "cifar_resnet20", 10, 32, 8),
            _image_workload("resnet50_224_b64_quick", "resnet50", 1000, 32, 2),
            _gpt_workload("gpt_6l512_t256_b16_quick", 2, 64, 4, 32, 2, 512),
        ]
    else:
        all_ = [
            _image_workload("cifar_resnet20_b128", "cifar_resnet20", 10, 32, 128),
            _image_workload("resnet50_224_b64", "resnet50", 1000, 224, 64),
            _gpt_workload("gpt_6l512_t256_b16", 6, 512, 8, 256, 16, 8192),
        ]
    if names is None:
        return all_
    wanted = set(names)
    known = {w.name for w in all_} | {w.name[: -len("_quick")] for w in all_ if w.name.endswith("_quick")}
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown workload(s) {sorted(unknown)}; choose from {list(WORKLOAD_NAMES)}")
    return [w for w in all_ if w.name in wanted or w.name.replace("_quick", "") in wanted]
