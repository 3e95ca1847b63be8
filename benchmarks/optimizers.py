"""The optimizers the optimizer suite times, and how each is driven.

Each optimizer is driven the way its own documentation says:

=================================  ========================================================================
``adamw``, ``sgd``                 ``zero_grad(); loss.backward(); step()`` (torch.optim; SGD with momentum 0.9)
``hessopt_adahessian``             ``step(closure)`` with the standard torch closure (``loss.backward()``
                                   inside); hessopt builds the graph itself, Hessian every step
``hessopt_adahessian_k10``         the same with ``update_each=10``: the closure builds the gradient's
                                   graph only on Hessian steps; timed over 10-step windows (one Hessian
                                   step per window)
``timm_adahessian``                ``timm.optim.Adahessian`` (``avg_conv_kernel=True``, the paper's recipe):
                                   ``loss.backward(create_graph=True); step()`` every step
``torch_optimizer_adahessian``     ``torch_optimizer.Adahessian``: ``loss.backward(create_graph=True); step()``
``pytorch_optimizer_adahessian``   ``pytorch_optimizer.AdaHessian``: ``loss.backward(create_graph=True); step()``
``pytorch_optimizer_sophiah``      ``pytorch_optimizer.SophiaH`` (``update_period=10``): ``create_graph=True``
                                   on the steps where it estimates the Hessian (its 1st, 11th, ...), a
                                   plain backward otherwise; timed over 10-step windows
``hessopt_sophia_g_k10``           ``hessopt.Sophia(curvature="gnb", update_each=10)``, ``step(closure)``:
                                   labels sampled inside the optimizer from the closure's logits; 10-step
                                   windows
``hessopt_sophia_h_k10``           ``hessopt.Sophia(curvature="hutchinson", update_each=10)``, ``step(closure)``
``hessopt_adahessian_gnb``         ``hessopt.AdaHessian(curvature="gnb")``, every step, ``step(closure)``
``hessopt_adahessian_fd``          ``hessopt.AdaHessian(curvature="finite_difference")`` (forward differences:
                                   one extra gradient), every step, ``step(closure)``
``sophia_opt_sophiag``             ``sophia_opt.SophiaG`` (the official code): ``loss.backward(); step(bs=B)``,
                                   and after every 10th step the official script's Hessian update: a second
                                   forward, labels sampled from its softmax, ``backward()``,
                                   ``update_hessian()``; 10-step windows
=================================  ========================================================================

Peers are optional imports: one that is not installed is reported as skipped (a record with
``error: "not installed: ..."``); one that crashes gets a record with its error message.

Learning rates are moderate so that a few dozen steps on a fixed random batch stay finite (a
diverged run would time NaN arithmetic and skip paths); they do not affect the cost of a step.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["OptimizerSpec", "OPTIMIZER_NAMES", "get_optimizers", "make_driver"]

OPTIMIZER_NAMES = (
    "adamw",
    "sgd",
    "hessopt_adahessian",
    "hessopt_adahessian_k10",
    "timm_adahessian",
    "torch_optimizer_adahessian",
    "pytorch_optimizer_adahessian",
    "pytorch_optimizer_sophiah",
    "hessopt_sophia_g_k10",
    "hessopt_sophia_h_k10",
    "hessopt_adahessian_gnb",
    "hessopt_adahessian_fd",
    "sophia_opt_sophiag",
)

# How a step is run: "first_order", "closure" (hessopt), "create_graph" (every step),
# "create_graph_every_10" (only on the peer's Hessian steps).
_DRIVE_TEXT = {
    "first_order": "zero_grad(); loss.backward(); step()",
    "closure": "step(closure) with a plain loss.backward() inside the closure",
    "create_graph": "zero_grad(); loss.backward(create_graph=True); step()",
    "create_graph_every_10": "zero_grad(); loss.backward(create_graph=(step % 10 == 0)); step()",
    "sophia_official": "zero_grad(); loss.backward(); step(bs=B); every 10th step also: forward, sample "
                       "y ~ softmax(logits), CE(logits, y).backward(), update_hessian(), zero_grad()",
}


@dataclasses.dataclass
class OptimizerSpec:
    name: str
    module: str  # the package to import (for the "not installed" message)
    factory: Callable[[List[torch.nn.Parameter]], torch.optim.Optimizer]
    drive: str
    window: int = 1
    hyper: Optional[Dict] = None

    @property
    def info(self) -> Dict:
        return {"driver": _DRIVE_TEXT[self.drive], "package": self.module, "hyperparameters": self.hyper or {},
                "window_steps": self.window}


def _import(name: str):
    return importlib.import_module(name)


def _specs() -> List[OptimizerSpec]:
    import hessopt

    ah = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0)
    return [
        OptimizerSpec("adamw", "torch", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01), "first_order",
                      hyper=dict(lr=1e-3, weight_decay=0.01, foreach="torch default")),
        OptimizerSpec("sgd", "torch", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), "first_order",
                      hyper=dict(lr=0.01, momentum=0.9)),
        OptimizerSpec("hessopt_adahessian", "hessopt", lambda p: hessopt.AdaHessian(p, **ah), "closure",
                      hyper=dict(ah, update_each=1)),
        OptimizerSpec("hessopt_adahessian_k10", "hessopt", lambda p: hessopt.AdaHessian(p, update_each=10, **ah),
                      "closure", window=10, hyper=dict(ah, update_each=10)),
        OptimizerSpec("timm_adahessian", "timm.optim",
                      lambda p: _import("timm.optim").Adahessian(p, avg_conv_kernel=True, **ah), "create_graph",
                      hyper=dict(ah, avg_conv_kernel=True)),
        OptimizerSpec("torch_optimizer_adahessian", "torch_optimizer",
                      lambda p: _import("torch_optimizer").Adahessian(p, hessian_power=1.0, **ah), "create_graph",
                      hyper=dict(ah, hessian_power=1.0)),
        OptimizerSpec("pytorch_optimizer_adahessian", "pytorch_optimizer",
                      lambda p: _import("pytorch_optimizer").AdaHessian(p, **ah), "create_graph",
                      hyper=dict(ah)),
        OptimizerSpec("pytorch_optimizer_sophiah", "pytorch_optimizer",
                      lambda p: _import("pytorch_optimizer").SophiaH(p, lr=0.01, update_period=10),
                      "create_graph_every_10", window=10, hyper=dict(lr=0.01, update_period=10)),
        OptimizerSpec("hessopt_sophia_g_k10", "hessopt",
                      lambda p: hessopt.Sophia(p, lr=1e-3, update_each=10, curvature="gnb"), "closure", window=10,
                      hyper=dict(lr=1e-3, update_each=10, curvature="gnb", rho=0.04)),
        OptimizerSpec("hessopt_sophia_h_k10", "hessopt",
                      lambda p: hessopt.Sophia(p, lr=1e-3, update_each=10, curvature="hutchinson"), "closure",
                      window=10, hyper=dict(lr=1e-3, update_each=10, curvature="hutchinson", rho=0.04)),
        OptimizerSpec("hessopt_adahessian_gnb", "hessopt", lambda p: hessopt.AdaHessian(p, curvature="gnb", **ah),
                      "closure", hyper=dict(ah, curvature="gnb")),
        OptimizerSpec("hessopt_adahessian_fd", "hessopt",
                      lambda p: hessopt.AdaHessian(p, curvature="finite_difference", **ah), "closure",
                      hyper=dict(ah, curvature="finite_difference")),
        OptimizerSpec("sophia_opt_sophiag", "sophia_opt",
                      lambda p: _import("sophia_opt").SophiaG(p, lr=1e-3, rho=0.04), "sophia_official", window=10,
                      hyper=dict(lr=1e-3, rho=0.04, hessian_every=10)),
    ]


def get_optimizers(names=None) -> List[OptimizerSpec]:
    specs = _specs()
    if names is None:
        return specs
    unknown = set(names) - set(OPTIMIZER_NAMES)
    if unknown:
        raise ValueError(f"unknown optimizer(s) {sorted(unknown)}; choose from {list(OPTIMIZER_NAMES)}")
    return [s for s in specs if s.name in set(names)]


def missing_package(spec: OptimizerSpec) -> Optional[str]:
    """``None`` if the spec's package imports, else the error message to record."""
    try:
        _import(spec.module)
    except ImportError as err:
        pip = {"torch_optimizer": "torch-optimizer", "pytorch_optimizer": "pytorch-optimizer", "timm.optim": "timm",
               "sophia_opt": "sophia-opt"}
        return f"not installed: {spec.module} ({type(err).__name__}: {err}); pip install {pip.get(spec.module, spec.module)}"
    return None


def _predictions(y: torch.Tensor) -> int:
    """The number of predictions in a batch of targets (the official SophiaG's ``bs``)."""
    return y.numel()


def _official_sophia_hessian_update(opt, model, x) -> None:
    """The official Sophia-G training script's Hessian step: a forward pass, labels sampled from the
    model's softmax, a backward of their mean cross-entropy, ``update_hessian()``."""
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    flat = logits.reshape(-1, logits.shape[-1])
    sampled = torch.multinomial(torch.softmax(flat.float(), dim=-1), 1).view(-1)
    torch.nn.functional.cross_entropy(flat, sampled).backward()
    opt.update_hessian()
    opt.zero_grad(set_to_none=True)


def make_driver(spec: OptimizerSpec, model: torch.nn.Module, opt: torch.optim.Optimizer, batch, loss_fn):
    """A function running ``spec.window`` training steps of ``model`` on ``batch`` with ``opt``.

    The window ends with ``opt.zero_grad(set_to_none=True)``. Keeps the last loss (detached) in
    ``driver.last_loss`` for a sanity check; no host sync inside.
    """
    x, y = batch
    state = {"i": 0}

    def loss_of():
        return loss_fn(model(x), y)

    def one_step():
        i = state["i"]
        if spec.drive == "closure":
            def closure():
                opt.zero_grad()
                loss = loss_of()
                loss.backward()
                return loss
            loss = opt.step(closure)
        else:
            opt.zero_grad()
            loss = loss_of()
            if spec.drive == "first_order":
                loss.backward()
            elif spec.drive == "create_graph":
                loss.backward(create_graph=True)
            elif spec.drive == "sophia_official":
                loss.backward()
            else:  # create_graph_every_10: SophiaH estimates the Hessian on its 1st, 11th, ... step
                loss.backward(create_graph=(i % 10 == 0))
            if spec.drive == "sophia_official":
                opt.step(bs=_predictions(y))
                if i % 10 == 9:
                    _official_sophia_hessian_update(opt, model, x)
            else:
                opt.step()
        state["i"] = i + 1
        return loss

    def run():
        loss = None
        for _ in range(spec.window):
            loss = one_step()
        # Timed too: frees what the window built (a peer's create_graph=True gradients keep the whole
        # double-backward graph alive until the next zero_grad), so no contender holds a graph while
        # the others are measured, and each pays for releasing its own.
        opt.zero_grad(set_to_none=True)
        run.last_loss = loss.detach() if isinstance(loss, torch.Tensor) else loss

    run.last_loss = None
    return run
