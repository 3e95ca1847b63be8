"""Model, data and training loops shared by the distributed worker and the single-process references.

Loaded by file path (no package import), so both ``tests/test_distributed.py`` and
``tests/dist_workers/worker.py`` use exactly the same code.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import hessopt

STEPS = 5
BATCH = 16
OPT_ARGS = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-4, weight_decay=1e-3, seed=3)


def build_model(seed: int = 0) -> nn.Module:
    """A tiny float64 conv net (a 4-D kernel exercises spatial averaging): 119 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()


def make_batches(steps: int = STEPS, n: int = BATCH, seed: int = 1) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
        for _ in range(steps)
    ]


def shard(batch, start: int, stop: int):
    return batch[0][start:stop], batch[1][start:stop]


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs, targets)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Sequence,
    mode: str,
    micro_batches: int = 1,
    no_sync: Optional[Callable] = None,
    after_step: Optional[Callable[[int], None]] = None,
) -> None:
    """The user's loop, unchanged between one process and DDP (``model`` may be the DDP wrapper).

    ``mode`` ``"closure"``: ``opt.step(closure)`` with a plain ``backward()``; ``"explicit"``:
    ``loss.backward(create_graph=True); opt.step()``. With ``micro_batches=m`` each batch is split
    into ``m`` micro-batches whose losses are divided by ``m`` (gradient accumulation), all but the
    last one under ``no_sync()`` when given (DDP's way to skip the intermediate all-reduces).
    """

    def backward(x, y, create_graph):
        total = 0.0
        for i, (xs, ys) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches))):
            last = i == micro_batches - 1
            ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with ctx:
                loss = loss_fn(model(xs), ys) / micro_batches
                loss.backward(create_graph=create_graph) if create_graph else loss.backward()
            total = total + loss.detach()
        return total

    for step, (x, y) in enumerate(batches):
        if mode == "closure":
            def closure():
                opt.zero_grad()
                return backward(x, y, create_graph=False)

            opt.step(closure)
        elif mode == "explicit":
            opt.zero_grad()
            backward(x, y, create_graph=True)
            opt.step()
        else:
            raise ValueError(mode)
        if after_step is not None:
            after_step(step)


def params_of(model: nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def reference_run(mode: str, update_each: int, batches, after_step=None) -> List[torch.Tensor]:
    """One process, whole batches, no process group."""
    model = build_model()
    opt = hessopt.AdaHessian(model.parameters(), update_each=update_each, **OPT_ARGS)
    train(model, opt, batches, mode, after_step=None if after_step is None else (lambda s: after_step(s, model)))
    return params_of(model)


#: the non-Hessian operators checked under torch.distributed (dense matrix on uneven shards)
OTHER_OPERATORS = {
    "ggn": lambda model, data: hessopt.GGNOperator(model, loss_fn, data),
    "fisher": lambda model, data: hessopt.EmpiricalFisherOperator(model, loss_fn, data),
    "finite_difference": lambda model, data: hessopt.HessianOperator(model, loss_fn, data, method="finite_difference"),
}


def diagnostics(op, seed: int = 7) -> dict:
    """What the sharded and the full-batch operators are compared on."""
    top = hessopt.top_eigenvalues(op, k=2, generator=seed)
    tr = hessopt.trace(op, num_matvecs=30, generator=seed)
    hutch = hessopt.trace(op, num_matvecs=6, method="hutchinson", generator=seed)
    dens = hessopt.spectral_density(op, num_runs=1, num_steps=20, generator=seed)
    return {
        "top": top.eigenvalues.clone(),
        "trace": tr.estimate,
        "hutchinson": hutch.estimate,
        "density_nodes": dens.nodes[0].clone(),
        "density_weights": dens.weights[0].clone(),
        "gradient": op.gradient().clone(),
        "loss": op.loss(),
    }


# Errors the workers provoke on purpose: (exception type, pattern its message must match).
BAD_INPUT = {
    "seeds": (ValueError, r"different seeds on different ranks \(\[0, 1\]\)"),
    "update_each": (ValueError, r"different update_each on different ranks \(\[1, 2\]\)"),
    "param_lists": (ValueError, r"different parameter lists on different ranks"),
    "optimizer_state": (ValueError, r"AdaHessian's state differs between ranks \(step counts \[1, 0\]"),
    "param_values": (ValueError, r"parameters differ between ranks at the first step \(parameter 0"),
    "operator_probes": (ValueError, r"multiplied this distributed HessianOperator by different vectors"),
    "fsdp2": (TypeError, r"sharded DTensor parameter \(FSDP2's fully_shard"),
    # rank 1: its own NonFiniteCurvatureError; rank 0: a DistributedOperatorError quoting rank 1's
    "operator_rank_failure": ((ValueError, RuntimeError), r"^(rank\(s\) \[1\] failed.*rank 1: NonFiniteCurvatureError: )?"
                                                          r"the loss is nan"),
    "all_shards_empty": (ValueError, r"data is empty on every rank"),
}
