"""User code for the `hessopt analyze` tests (tests/test_cli.py): models, data and losses by MODULE:FUNCTION.

Imported by the CLI as ``analyze_fixtures:...`` with tests/ as the current directory, as a user's
own module would be. Everything is float64 and tiny (26 parameters), so the tests can compare with
the dense Hessian.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

IN, HIDDEN, CLASSES = 3, 4, 2


def build(seed: int = 0, hidden: int = HIDDEN) -> nn.Module:
    """A 3-4-2 tanh MLP in float64, initialized from ``seed`` (the global RNG is left alone)."""
    model = nn.Sequential(nn.Linear(IN, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES)).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def batches(num: int = 2, size: int = 8, seed: int = 0):
    """``num`` (inputs, targets) batches."""
    gen = torch.Generator().manual_seed(100 + seed)
    return [(torch.randn(size, IN, generator=gen, dtype=torch.float64),
             torch.randint(0, CLASSES, (size,), generator=gen)) for _ in range(num)]


def one_batch():
    return batches(num=1)[0]


def batch_generator():
    """The same batches as :func:`batches`, from a one-shot generator."""
    yield from batches()


class DictNet(nn.Module):
    """HuggingFace-style: ``model(**batch)`` with ``batch = {"x": ..., "labels": ...}``, returns ``.loss`` and ``.logits``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.net = build(seed)

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def build_dict_model(seed: int = 0) -> nn.Module:
    return DictNet(seed)


def dict_batches():
    return [{"x": x, "labels": y} for x, y in batches()]


def model_form_loss(model, batch):
    """``loss(model, batch)``: the training-loop convention (``--loss-form model``)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def sum_then_mean_ce(outputs, targets):
    """A user loss ``loss(outputs, targets)``: cross-entropy written out."""
    return -(outputs.log_softmax(-1).gather(1, targets[:, None])).mean()


# wrong things a user may write


def not_a_model():
    return 3


def not_batches():
    return "held-out data"


def wrong_batches():
    return [torch.zeros(2, 3), torch.zeros(2)]  * 2  # a list of tensors, not of (inputs, targets) pairs


def empty():
    return []


def raises():
    raise ValueError("boom")


NOT_CALLABLE = 5
