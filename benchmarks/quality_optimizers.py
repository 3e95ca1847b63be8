"""The contenders of the time-to-quality suite: how each optimizer is built, scheduled and driven.

Every contender is driven the way its own documentation says:

===============================  ===========================================================================
``adamw``                        ``torch.optim.AdamW``: ``zero_grad(); loss.backward(); step()``
``sgd``                          ``torch.optim.SGD(momentum=0.9, nesterov=True)`` (vision only)
``muon``                         ``torch.optim.Muon`` on the hidden layers' matrices, ``torch.optim.AdamW`` on
                                 everything else (embeddings, output head / classifier, norms, biases), as
                                 torch's docs say; 4-D convolution weights are handed to Muon flattened to
                                 ``(out, in * kh * kw)`` (torch's Muon accepts 2-D parameters only)
``hessopt_adahessian``           ``hessopt.AdaHessian``, Hessian every step: ``opt.step(closure)`` with the
                                 standard closure (a plain ``loss.backward()`` inside)
``hessopt_adahessian_k10``       the same with ``update_each=10`` (lazy Hessian)
``hessopt_adahessian_gnb``,      ``hessopt.AdaHessian(curvature="gnb" / "finite_difference")`` (enabled when
``hessopt_adahessian_fd``        the library accepts these sources)
``hessopt_sophia_h``,            ``hessopt.Sophia(curvature="hutchinson" / "gnb")``, ``update_each=10``
``hessopt_sophia_g``             (enabled when ``hasattr(hessopt, "Sophia")``)
``timm_adahessian``              ``timm.optim.Adahessian(avg_conv_kernel=True)``:
                                 ``loss.backward(create_graph=True); step()``
``pytorch_optimizer_sophiah``    ``pytorch_optimizer.SophiaH(update_period=10)``: ``create_graph=True`` on its
                                 Hessian steps (its 1st, 11th, ... step), a plain backward otherwise
``sophia_opt_sophiag``           ``sophia_opt.SophiaG`` with the official loop: ``loss.backward();
                                 step(bs=predictions per batch)``; every 10th step a second forward pass,
                                 labels sampled from the model's softmax, ``backward()``,
                                 ``update_hessian()`` (the official code leaves the sampling to the loop)
===============================  ===========================================================================

Schedule (the same family for every contender): the learning rate of every parameter group is its
base value times ``warmup_cosine(step)``: linear warm-up over the first 10% of the steps, then a
cosine decay to 0 at the last step. No gradient clipping by default; ``--quality-grad-clip C``
clips the gradient norm to ``C`` for every contender (after ``backward()``, inside the closure for
hessopt; peers that need ``create_graph=True`` gradients are left unclipped).

Learning-rate grid: ``center * 2**k`` for ``k`` in ``-2..2`` (5 log-spaced points, a factor of 16,
around each method's usual learning rate); ``--quick`` uses ``k`` in ``{-1, 0}``. Decoupled weight
decay is matched at the grid centres: ``lr_center * wd`` equals AdamW's ``lr_center * wd`` on the
same workload (SGD uses the standard coupled 5e-4).

Compute in gradient-equivalents (``grad_equiv``): a forward+backward pass = 1; a Hessian step of a
Hutchinson method (gradient with its graph + one HVP) = the HVP/gradient time ratio measured at the
start of the workload in the same process (``hvp_cost``); hessopt's Gauss-Newton-Bartlett update
= 2/3 extra (one backward of the sampled loss through the kept forward graph; a backward counted as
2/3 of a forward+backward); the official SophiaG loop's update = 1 extra (its own forward and
backward); a finite-difference update (hessopt's default forward scheme) = 1 extra gradient; Muon's
Newton-Schulz iterations and all optimizer arithmetic count 0 (they show in the wall-clock).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

__all__ = ["QSpec", "quality_specs", "QUALITY_OPTIMIZERS", "warmup_cosine", "lr_grid", "Driver"]

QUALITY_OPTIMIZERS = (
    "adamw", "sgd", "muon",
    "hessopt_adahessian", "hessopt_adahessian_k10", "hessopt_adahessian_gnb", "hessopt_adahessian_fd",
    "hessopt_sophia_h", "hessopt_sophia_g",
    "timm_adahessian", "pytorch_optimizer_sophiah", "sophia_opt_sophiag",
)

WARMUP_FRACTION = 0.1
GRID_EXPONENTS = (-2, -1, 0, 1, 2)
QUICK_GRID_EXPONENTS = (-1, 0)
EXTRA_COST = {"hutchinson": None, "gnb": 2.0 / 3.0, "finite_difference": 1.0}  # None: the measured HVP cost


def warmup_cosine(step: int, total: int, warmup_fraction: float = WARMUP_FRACTION) -> float:
    """Learning-rate factor of 0-based ``step``: linear warm-up to 1, then cosine to 0 at ``total - 1``."""
    w = max(1, int(round(warmup_fraction * total)))
    if step < w:
        return (step + 1) / w
    span = max(1, total - 1 - w)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / span)))


def lr_grid(center: float, quick: bool) -> List[float]:
    exps = QUICK_GRID_EXPONENTS if quick else GRID_EXPONENTS
    return [float(f"{center * 2.0 ** k:.6g}") for k in exps]


def _import(name: str):
    return importlib.import_module(name)


def _accepts_curvature(source: str) -> Optional[str]:
    """``None`` if ``hessopt.AdaHessian`` accepts ``curvature=source``, else why not."""
    try:
        from hessopt.optim import curvature as cur

        names = getattr(cur, "CURVATURE_NAMES", ())
    except ImportError as err:
        return f"hessopt.optim.curvature not importable: {err}"
    if source not in names:
        return f"not available: hessopt.AdaHessian has no curvature={source!r} in this tree (CURVATURE_NAMES={names})"
    return None


@dataclasses.dataclass
class QSpec:
    """One contender. ``centers`` maps the workload kind (``lm``/``vision``) to the grid centre."""

    name: str
    package: str
    centers: Dict[str, float]
    drive: str  # first_order | closure | create_graph | create_graph_every_k | sophiag_official
    build: Callable[[nn.Module, float, Any], List[torch.optim.Optimizer]]
    curvature: Optional[str] = None  # hutchinson | gnb | finite_difference (cost accounting)
    update_each: int = 1
    kinds: tuple = ("lm", "vision")
    hyper: Callable[[Any], Dict[str, Any]] = lambda wl: {}
    unavailable: Callable[[], Optional[str]] = lambda: None

    def info(self, wl) -> Dict[str, Any]:
        return {"package": self.package, "drive": self.drive, "curvature": self.curvature,
                "update_each": self.update_each, "hyperparameters": self.hyper(wl)}


# --------------------------------------------------------------------------------------------------
# hyper-parameters per workload kind

ADAMW = {"lm": dict(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1),
         "vision": dict(lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05)}


def _decay(kind: str, center: float) -> float:
    """Decoupled weight decay matched to AdamW's ``lr * wd`` at the grid centres."""
    a = ADAMW[kind]
    return a["lr"] * a["weight_decay"] / center


AH_CENTER = {"lm": 0.05, "vision": 0.15}
SOPHIA_CENTER = {"lm": 2e-3, "vision": 2e-3}
MUON_CENTER = {"lm": 0.02, "vision": 0.02}
PYOPT_SOPHIAH_CENTER = {"lm": 6e-2, "vision": 6e-2}  # its documented default lr


def _ah_hyper(wl) -> Dict[str, Any]:
    return dict(betas=(0.9, 0.999), eps=1e-4, weight_decay=_decay(wl.kind, AH_CENTER[wl.kind]), hessian_power=1.0)


def _sophia_hyper(wl) -> Dict[str, Any]:
    return dict(betas=(0.965, 0.99), rho=0.04, weight_decay=_decay(wl.kind, SOPHIA_CENTER[wl.kind]))


def _muon_groups(model: nn.Module, wl):
    """Hidden-layer matrices for Muon; embeddings, head/classifier, norms and biases for AdamW."""
    muon, rest = [], []
    for name, p in model.named_parameters():
        head = name.startswith(("tok.", "pos.", "head.", "fc."))
        (muon if p.ndim >= 2 and not head else rest).append(p)
    return muon, rest


class FlatMuon(torch.optim.Optimizer):
    """``torch.optim.Muon`` over parameters of any ``ndim >= 2``, seen as ``(shape[0], -1)`` matrices.

    torch's Muon accepts 2-D parameters only; a convolution's ``(out, in, kh, kw)`` weight is
    reshaped to ``(out, in * kh * kw)`` (as Keller Jordan's CIFAR-10 code does) around each step:
    ``p.data`` and ``p.grad`` become 2-D views for the step and are restored after it.
    """

    def __init__(self, params, **kwargs):
        params = list(params)
        shapes = [p.shape for p in params]
        self._flatten(params)
        try:
            self.inner = torch.optim.Muon(params, **kwargs)
        finally:
            self._restore(params, shapes)
        self.shapes = shapes
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self.defaults = self.inner.defaults

    @staticmethod
    def _flatten(params):
        for p in params:
            if p.ndim != 2:
                p.data = p.data.view(p.shape[0], -1)
                if p.grad is not None:
                    p.grad = p.grad.view(p.shape)

    @staticmethod
    def _restore(params, shapes):
        for p, s in zip(params, shapes):
            if p.shape != s:
                p.data = p.data.view(s)
                if p.grad is not None:
                    p.grad = p.grad.view(s)

    @torch.no_grad()
    def step(self, closure=None):
        params = self.inner.param_groups[0]["params"]
        self._flatten(params)
        try:
            return self.inner.step(closure)
        finally:
            self._restore(params, self.shapes)

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none)


def _build_muon(model, lr, wl):
    muon, rest = _muon_groups(model, wl)
    a = ADAMW[wl.kind]
    center = MUON_CENTER[wl.kind]
    rest_lr = lr * a["lr"] / center  # one swept knob: the AdamW part moves with Muon's lr
    opts = []
    if muon:
        opts.append(FlatMuon(muon, lr=lr, momentum=0.95, nesterov=True, weight_decay=_decay(wl.kind, center)))
    if rest:
        opts.append(torch.optim.AdamW(rest, lr=rest_lr, betas=a["betas"], weight_decay=a["weight_decay"]))
    return opts


def _hessopt_unavailable(name: str, curvature: Optional[str] = None) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        import hessopt

        if name == "Sophia" and not hasattr(hessopt, "Sophia"):
            return "not available: hessopt.Sophia is not in this tree yet"
        if name == "AdaHessian" and curvature not in (None, "hutchinson"):
            return _accepts_curvature(curvature)
        return None

    return check


def _peer_unavailable(module: str, pip: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        try:
            _import(module)
        except Exception as err:  # noqa: BLE001 - an import that crashes is a result too
            return f"not installed: {module} ({type(err).__name__}: {err}); pip install -r benchmarks/requirements-peers.txt ({pip})"
        return None

    return check


def _sophia_kwargs(curvature: str, wl) -> Dict[str, Any]:
    import hessopt

    kw = dict(_sophia_hyper(wl), eps=1e-12, update_each=10, curvature=curvature, seed=0)
    sig = inspect.signature(hessopt.Sophia)
    return {k: v for k, v in kw.items() if k in sig.parameters or any(
        p.kind == p.VAR_KEYWORD for p in sig.parameters.values())}


def quality_specs() -> List[QSpec]:
    def adamw(model, lr, wl):
        a = ADAMW[wl.kind]
        return [torch.optim.AdamW(model.parameters(), lr=lr, betas=a["betas"], weight_decay=a["weight_decay"])]

    def sgd(model, lr, wl):
        return [torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)]

    def ah(update_each=1, curvature=None):
        def build(model, lr, wl):
            import hessopt

            kw = dict(_ah_hyper(wl), update_each=update_each, seed=0)
            if curvature is not None:
                kw["curvature"] = curvature
            return [hessopt.AdaHessian(model.parameters(), lr=lr, **kw)]
        return build

    def sophia(curvature):
        def build(model, lr, wl):
            import hessopt

            return [hessopt.Sophia(model.parameters(), lr=lr, **_sophia_kwargs(curvature, wl))]
        return build

    def timm_ah(model, lr, wl):
        return [_import("timm.optim").Adahessian(model.parameters(), lr=lr, avg_conv_kernel=True, **_ah_hyper(wl))]

    def pyopt_sophiah(model, lr, wl):
        return [_import("pytorch_optimizer").SophiaH(model.parameters(), lr=lr, update_period=10,
                                                     weight_decay=_decay(wl.kind, PYOPT_SOPHIAH_CENTER[wl.kind]))]

    def sophia_opt(model, lr, wl):
        return [_import("sophia_opt").SophiaG(model.parameters(), lr=lr, **_sophia_hyper(wl))]

    a_hyper = lambda wl: dict(ADAMW[wl.kind], lr=None)  # noqa: E731
    return [
        QSpec("adamw", "torch", {k: v["lr"] for k, v in ADAMW.items()}, "first_order", adamw, hyper=a_hyper),
        QSpec("sgd", "torch", {"vision": 0.1}, "first_order", sgd, kinds=("vision",),
              hyper=lambda wl: dict(momentum=0.9, nesterov=True, weight_decay=5e-4)),
        QSpec("muon", "torch", MUON_CENTER, "first_order", _build_muon,
              hyper=lambda wl: dict(momentum=0.95, nesterov=True, weight_decay=_decay(wl.kind, MUON_CENTER[wl.kind]),
                                    adamw_rest=dict(ADAMW[wl.kind], lr=f"lr * {ADAMW[wl.kind]['lr'] / MUON_CENTER[wl.kind]:g}"),
                                    conv_weights="flattened to (out, in*kh*kw)")),
        QSpec("hessopt_adahessian", "hessopt", AH_CENTER, "closure", ah(), curvature="hutchinson", hyper=_ah_hyper,
              unavailable=_hessopt_unavailable("AdaHessian")),
        QSpec("hessopt_adahessian_k10", "hessopt", AH_CENTER, "closure", ah(10), curvature="hutchinson", update_each=10,
              hyper=_ah_hyper, unavailable=_hessopt_unavailable("AdaHessian")),
        QSpec("hessopt_adahessian_gnb", "hessopt", AH_CENTER, "closure", ah(1, "gnb"), curvature="gnb",
              hyper=_ah_hyper, unavailable=_hessopt_unavailable("AdaHessian", "gnb")),
        QSpec("hessopt_adahessian_fd", "hessopt", AH_CENTER, "closure", ah(1, "finite_difference"),
              curvature="finite_difference", hyper=_ah_hyper,
              unavailable=_hessopt_unavailable("AdaHessian", "finite_difference")),
        QSpec("hessopt_sophia_h", "hessopt", SOPHIA_CENTER, "closure", sophia("hutchinson"), curvature="hutchinson",
              update_each=10, hyper=_sophia_hyper, unavailable=_hessopt_unavailable("Sophia")),
        QSpec("hessopt_sophia_g", "hessopt", SOPHIA_CENTER, "closure", sophia("gnb"), curvature="gnb", update_each=10,
              hyper=_sophia_hyper, unavailable=_hessopt_unavailable("Sophia")),
        QSpec("timm_adahessian", "timm", AH_CENTER, "create_graph", timm_ah, curvature="hutchinson",
              hyper=lambda wl: dict(_ah_hyper(wl), avg_conv_kernel=True), unavailable=_peer_unavailable("timm.optim", "timm")),
        QSpec("pytorch_optimizer_sophiah", "pytorch-optimizer", PYOPT_SOPHIAH_CENTER, "create_graph_every_k",
              pyopt_sophiah, curvature="hutchinson", update_each=10,
              hyper=lambda wl: dict(update_period=10, weight_decay=_decay(wl.kind, PYOPT_SOPHIAH_CENTER[wl.kind]),
                                    others="package defaults (betas (0.96, 0.99), p 0.01, gaussian probes)"),
              unavailable=_peer_unavailable("pytorch_optimizer", "pytorch-optimizer")),
        QSpec("sophia_opt_sophiag", "sophia-opt", SOPHIA_CENTER, "sophiag_official", sophia_opt, curvature="gnb",
              update_each=10, hyper=_sophia_hyper, unavailable=_peer_unavailable("sophia_opt", "sophia-opt")),
    ]


# --------------------------------------------------------------------------------------------------
# driving one training step


class Driver:
    """Runs training steps of one contender: schedule, the documented drive, cost accounting."""

    def __init__(self, spec: QSpec, model: nn.Module, lr: float, wl, hvp_cost: float, grad_clip: Optional[float] = None):
        self.spec, self.model, self.wl, self.grad_clip = spec, model, wl, grad_clip
        self.opts = spec.build(model, lr, wl)
        for o in self.opts:
            for g in o.param_groups:
                g["_base_lr"] = g["lr"]
        extra = EXTRA_COST.get(spec.curvature or "", 0.0)
        self.curv_cost = hvp_cost - 1.0 if extra is None else extra  # a Hutchinson step: HVP incl. its gradient
        if spec.drive == "sophiag_official":
            self.curv_cost = 1.0  # its own forward + backward with sampled labels
        self.step_index = 0
        self.grad_equiv = 0.0

    def _clip(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)

    def _is_curvature_step(self, i: int) -> bool:
        if self.spec.curvature is None:
            return False
        for attr in ("needs_curvature", "needs_hessian"):  # hessopt's optimizers say it themselves
            flag = getattr(self.opts[0], attr, None)
            if isinstance(flag, bool) and (attr == "needs_curvature" or self.spec.curvature == "hutchinson"):
                return flag
        k = self.spec.update_each
        return i % k == (k - 1 if self.spec.drive == "sophiag_official" else 0)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        factor = warmup_cosine(i, self.wl.steps)
        for o in self.opts:
            for g in o.param_groups:
                g["lr"] = g["_base_lr"] * factor
        curv = self._is_curvature_step(i)
        model, loss_fn, drive = self.model, self.wl.loss, self.spec.drive
        if drive == "closure":
            opt = self.opts[0]

            def closure():
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                self._clip()
                return loss

            loss = opt.step(closure)
        else:
            for o in self.opts:
                o.zero_grad()
            loss = loss_fn(model(x), y)
            if drive == "first_order" or drive == "sophiag_official":
                loss.backward()
            elif drive == "create_graph":
                loss.backward(create_graph=True)
            elif drive == "create_graph_every_k":
                loss.backward(create_graph=(i % self.spec.update_each == 0))
            else:
                raise ValueError(f"unknown drive {drive!r}")
            if drive in ("first_order", "sophiag_official"):  # a create_graph gradient is left alone
                self._clip()
            if drive == "sophiag_official":
                self.opts[0].step(bs=self.wl.predictions_per_batch)
            else:
                for o in self.opts:
                    o.step()
            for o in self.opts:
                o.zero_grad(set_to_none=True)  # frees a create_graph=True gradient's graph
            if drive == "sophiag_official" and curv:
                # the official loop: labels sampled from the model's own softmax, backward, update_hessian
                logits = model(x)
                sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
                loss_fn(logits, sampled).backward()
                self.opts[0].update_hessian()
                self.opts[0].zero_grad(set_to_none=True)
        self.grad_equiv += 1.0 + (self.curv_cost if curv else 0.0)
        self.step_index = i + 1
        return loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
