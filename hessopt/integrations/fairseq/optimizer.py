r"""``--optimizer adahessian`` for fairseq: :class:`hessopt.AdaHessian` behind fairseq's optimizer API.

fairseq's trainer drives an optimizer like this on every update (fairseq 0.12, ``Trainer.train_step``)::

    optimizer.zero_grad()
    for sample in samples:                      # --update-freq k: k sub-batches, under DDP no_sync()
        loss = criterion(model, sample)         # a SUM over tokens, not a mean
        optimizer.backward(loss)
    optimizer.all_reduce_grads(model)           # legacy_ddp only (c10d reduces during backward)
    optimizer.multiply_grads(world_size / sample_size)
    grad_norm = optimizer.clip_grad_norm(clip_norm)
    optimizer.step()

and the plugin fits AdaHessian into it as follows.

* **The graph.** :meth:`FairseqAdaHessian.backward` calls ``loss.backward(create_graph=True)`` on the
  updates whose step estimates the Hessian (``AdaHessian.needs_hessian``; every update with
  ``--update-each 1``), a plain ``backward()`` on the others. With ``--update-freq k`` the k
  graph-carrying gradients add up (autograd accumulates them out of place), so the Hessian is that
  of the whole update's loss, exactly as for the gradient; the price is that the k graphs are kept
  until the step (activation memory grows with k on Hessian steps).
* **Attention.** The forward pass runs before ``backward``, so ``backward`` cannot make attention
  twice differentiable by itself. :meth:`zero_grad`, which the trainer calls before the forward
  pass of every update, enters :func:`hessopt.second_order_safe` when the coming step needs the
  Hessian, and :meth:`step` leaves it. Inside, fused scaled-dot-product attention (used by
  fairseq's ``MultiheadAttention`` through ``F.multi_head_attention_forward``) records a node whose
  graph-building backward is twice differentiable.
* **Scaling.** fairseq sums the loss over tokens and divides the gradient afterwards
  (``multiply_grads``), by writing into ``p.grad.data``; the gradient's graph still describes the
  unscaled sum. The plugin records every factor passed to ``multiply_grads`` and applies it to the
  Hutchinson estimate ``z * Hz`` (exact: the Hessian is linear in the loss), so the step equals
  ``hessopt.AdaHessian`` on the mean loss. Gradient clipping (``--clip-norm``) scales the gradient
  only, as it does for Adam: the curvature is that of the loss, not of the clipped gradient.
* **Checkpoints.** ``state_dict`` is ``AdaHessian.state_dict()``: moments, step counters, Hessian
  update counters and the probe generators' states, so ``checkpoint_last.pt`` resumes the probe
  stream where it stopped.
* **Seed.** The probe generator is seeded with fairseq's ``--seed`` (identical on all ranks, as
  the distributed mode requires).

What works with which fairseq option (checked against fairseq 0.12 / fairseq-fixed 0.12.3.1):

================================  =====================================================================
option                            status
================================  =====================================================================
fp32 (default), CPU and CUDA      supported
``--lr-scheduler`` (any)          supported: schedulers call ``set_lr``; tested with ``inverse_sqrt``
``--update-freq k``               supported (see above; memory of k graphs on Hessian steps)
``--clip-norm``                   supported (clips the gradient, not the curvature)
checkpoints / ``--restore-file``  supported, optimizer state incl. probe generators
``--ddp-backend c10d|pytorch_ddp`` works through :class:`hessopt.distributed.OptimizerSync` (its
                                  gradient hooks detach the gradient DDP sees and keep the graph for
                                  the HVP; ``z*Hz`` is averaged over ranks). Tested on CPU with 2
                                  gloo processes (equal to 1 process with ``--update-freq 2``).
``--ddp-backend legacy_ddp``      same mechanism (fairseq all-reduces ``p.grad.data`` after
                                  backward); tested as above
``--fp16``, ``--bf16``            rejected at start-up: fairseq's ``FP16Optimizer`` steps fp32 master
                                  copies and copies only the gradients' values into them
                                  (``_sync_fp16_grads_to_fp32``), so no graph reaches the optimizer;
                                  its ``backward`` also bypasses the optimizer's. In fairseq 0.12,
                                  ``--bf16`` moreover implies ``--tpu``.
``--memory-efficient-fp16/bf16``  rejected: ``MemoryEfficientFP16Optimizer.backward`` calls
                                  ``loss.backward()`` itself (no graph) and would keep the optimizer
                                  state in half precision
``--amp``                         rejected: ``AMPOptimizer.backward`` calls
                                  ``scaler.scale(loss).backward()`` (no graph) and unscales
                                  ``p.grad`` before the step, leaving the Hessian estimate scaled
``--tpu``                         rejected (XLA has no double backward through fairseq's model here)
``fully_sharded``, ``slowmo``,    rejected: they flatten, shard or average parameters behind the
``--zero-sharding os``,           optimizer's back (OSS also rebuilds the optimizer from its
``--use-bmuf``                    defaults, losing ``update_each`` and the seed)
================================  =====================================================================

Rejections raise :class:`UnsupportedFairseqOption` (a ``ValueError``) when fairseq builds the
optimizer, which ``fairseq-train`` does at start-up (``trainer.get_lr()``), before the first update.
They are not over-cautious: with the check disabled, ``--fp16`` and ``--amp`` runs reach the first
Hessian step with graph-less gradients and stop with :class:`hessopt.SecondOrderGraphError`, and
``--memory-efficient-fp16`` stops in fairseq itself ("Unsupported optimizer", since
:attr:`FairseqAdaHessian.supports_memory_efficient_fp16` is False); see tests/test_fairseq_train.py.
"""

import contextlib
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

_MISSING_FAIRSEQ = (
    "hessopt.integrations.fairseq needs fairseq: install it with `pip install 'hessopt[fairseq]'` "
    "(fairseq-fixed==0.12.3.1 on Python >= 3.11, where fairseq 0.12.2 cannot be imported; "
    "fairseq==0.12.2 on older Pythons)"
)

try:
    from fairseq.dataclass import FairseqDataclass
    from fairseq.optim import FairseqOptimizer, register_optimizer
    from omegaconf import II, OmegaConf
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(_MISSING_FAIRSEQ) from err

from ...hvp import second_order_safe
from ...optim import AdaHessian, CurvatureSource, Hutchinson

__all__ = ["FairseqAdaHessian", "FairseqAdaHessianConfig", "UnsupportedFairseqOption"]


class UnsupportedFairseqOption(ValueError):
    """A fairseq option that cannot be honoured with a second-order optimizer (raised at start-up)."""


@dataclass
class FairseqAdaHessianConfig(FairseqDataclass):
    """``--optimizer adahessian`` options; defaults are :class:`hessopt.AdaHessian`'s own."""

    adahessian_betas: Any = field(
        default=(0.9, 0.999),
        metadata={"help": "decay rates (b1, b2) of the gradient and Hessian-diagonal moments, e.g. '(0.9, 0.98)'"},
    )
    adahessian_eps: float = field(default=1e-4, metadata={"help": "added to the denominator"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "decoupled weight decay: theta *= 1 - lr * weight_decay"}
    )
    hessian_power: float = field(
        default=1.0, metadata={"help": "power k in [0, 1] of the Hessian-diagonal denominator"}
    )
    block_length: Optional[int] = field(
        default=None,
        metadata={"help": "average the Hessian diagonal of 2-D weights over blocks of this many "
                  "entries along the last dimension (the AdaHessian fairseq recipe uses 32)"},
    )
    update_each: int = field(
        default=1, metadata={"help": "estimate the Hessian every this many updates (the others reuse it)"}
    )
    n_samples: int = field(default=1, metadata={"help": "Hutchinson probes per Hessian estimate"})
    # fairseq's own options the optimizer reads (interpolations, not command-line flags)
    lr: List[float] = II("optimization.lr")
    seed: int = II("common.seed")
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")
    memory_efficient_fp16: bool = II("common.memory_efficient_fp16")
    memory_efficient_bf16: bool = II("common.memory_efficient_bf16")
    amp: bool = II("common.amp")
    tpu: bool = II("common.tpu")
    ddp_backend: str = II("distributed_training.ddp_backend")
    zero_sharding: str = II("distributed_training.zero_sharding")
    use_bmuf: bool = II("optimization.use_bmuf")


def _option(cfg, name, default=None):
    """``cfg.name``; an unresolved interpolation (a config built outside fairseq-train) counts as unset."""
    value = getattr(cfg, name, default)
    if isinstance(value, str) and value.startswith("${"):
        return default
    return value


_PRECISION = (
    "AdaHessian needs the gradient's autograd graph at the optimizer step, and fairseq's {flag} "
    "wrapper ({wrapper}) {why}. Train AdaHessian in fp32 (drop {flag}); on Ampere/Hopper GPUs "
    "TF32 matmuls (torch.backends.cuda.matmul.allow_tf32 = True) recover much of the speed."
)


def check_fairseq_options(cfg) -> None:
    """Raise :class:`UnsupportedFairseqOption` for fairseq options AdaHessian cannot honour (see module docstring)."""
    if _option(cfg, "amp", False):
        raise UnsupportedFairseqOption(_PRECISION.format(
            flag="--amp", wrapper="AMPOptimizer",
            why="runs scaler.scale(loss).backward() itself, without create_graph, and unscales only "
                "p.grad, which would leave the Hessian estimate multiplied by the loss scale"))
    if _option(cfg, "memory_efficient_fp16", False) or _option(cfg, "memory_efficient_bf16", False):
        raise UnsupportedFairseqOption(_PRECISION.format(
            flag="--memory-efficient-fp16/--memory-efficient-bf16", wrapper="MemoryEfficientFP16Optimizer",
            why="runs loss.backward() itself, without create_graph, and would keep the optimizer "
                "state in half precision"))
    if _option(cfg, "fp16", False) or _option(cfg, "bf16", False):
        raise UnsupportedFairseqOption(_PRECISION.format(
            flag="--fp16/--bf16", wrapper="FP16Optimizer",
            why="steps fp32 master copies of the parameters and copies only the values of the "
                "half-precision gradients into them, so the graph never reaches the optimizer"))
    if _option(cfg, "tpu", False):
        raise UnsupportedFairseqOption(
            "AdaHessian is not supported with --tpu: it needs double backward (the Hessian-vector "
            "product) through the model, which this integration does not support on XLA")
    backend = str(_option(cfg, "ddp_backend", "pytorch_ddp") or "pytorch_ddp")
    if backend in ("fully_sharded", "slowmo"):
        raise UnsupportedFairseqOption(
            f"AdaHessian does not support --ddp-backend {backend}: it shards, flattens or averages "
            "parameters behind the optimizer. Use --ddp-backend c10d (or legacy_ddp)")
    if str(_option(cfg, "zero_sharding", "none") or "none") != "none":
        raise UnsupportedFairseqOption(
            "AdaHessian does not support --zero-sharding os: fairscale's OSS rebuilds the optimizer "
            "from its group defaults and loses update_each, n_samples and the probe seed. Drop "
            "--zero-sharding")
    if _option(cfg, "use_bmuf", False):
        raise UnsupportedFairseqOption(
            "AdaHessian does not support --use-bmuf: BMUF averages parameters across ranks behind "
            "the optimizer's back while AdaHessian synchronises its Hessian estimate every step. "
            "Use --ddp-backend c10d")


class _ScaledCurvature(CurvatureSource):
    """A curvature source times a factor: fairseq's ``multiply_grads`` factors, applied to ``z * Hz``.

    fairseq divides the summed-loss gradient by the sample size in ``p.grad.data``, which leaves
    the gradient's graph, hence the HVP, describing the unscaled loss. ``H(c L) = c H(L)``, so
    multiplying the estimate by the same factor gives the Hessian of the loss fairseq steps on.
    """

    needs_graph = True
    scaled_by_loss_scale = True

    def __init__(self, source):
        self.source = source
        self.scale: Any = 1.0

    def __repr__(self) -> str:
        return f"_ScaledCurvature({self.source!r})"

    def estimate(self, inputs):
        raw = self.source.estimate(inputs)
        scale = self.scale
        if not torch.is_tensor(scale):
            return raw if scale == 1.0 else [r * scale for r in raw]
        return [r * scale.to(device=r.device, dtype=r.dtype) for r in raw]


@register_optimizer("adahessian", dataclass=FairseqAdaHessianConfig)
class FairseqAdaHessian(FairseqOptimizer):
    """fairseq wrapper of :class:`hessopt.AdaHessian` (see the module docstring for the mechanics).

    Options map one to one onto ``hessopt.AdaHessian``'s arguments: ``--lr`` (first value) -> lr,
    ``--adahessian-betas`` -> betas, ``--adahessian-eps`` -> eps, ``--weight-decay`` ->
    weight_decay, ``--hessian-power`` -> hessian_power, ``--block-length`` -> block_length,
    ``--update-each`` -> update_each, ``--n-samples`` -> n_samples, ``--seed`` -> seed
    (:attr:`hessopt_kwargs`).
    """

    def __init__(self, cfg: FairseqAdaHessianConfig, params):
        super().__init__(cfg)
        check_fairseq_options(cfg)
        kwargs = self.hessopt_kwargs
        n_samples = kwargs.pop("n_samples")
        self._curvature = _ScaledCurvature(Hutchinson(n_samples))
        self._optimizer = AdaHessian(params, curvature=self._curvature, **kwargs)
        self._safe: Optional[contextlib.ExitStack] = None

    # -- configuration ---------------------------------------------------------------------------

    @property
    def optimizer_config(self) -> Dict[str, Any]:
        """Per-group options; fairseq writes them over a checkpoint's groups on restore."""
        lr = self.cfg.lr
        betas = self.cfg.adahessian_betas
        if isinstance(betas, str):
            betas = eval(betas)  # fairseq's convention for tuple options, e.g. '(0.9, 0.98)'
        elif OmegaConf.is_config(betas):
            betas = OmegaConf.to_container(betas)
        block_length = self.cfg.block_length
        return {
            "lr": float(lr[0] if isinstance(lr, Collection) and not isinstance(lr, str) else lr),
            "betas": tuple(float(b) for b in betas),
            "eps": float(self.cfg.adahessian_eps),
            "weight_decay": float(self.cfg.weight_decay),
            "hessian_power": float(self.cfg.hessian_power),
            "block_length": None if block_length is None else int(block_length),
        }

    @property
    def hessopt_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of the equivalent ``hessopt.AdaHessian(params, **kwargs)``."""
        seed = _option(self.cfg, "seed", 1)
        return dict(
            self.optimizer_config,
            update_each=int(self.cfg.update_each),
            n_samples=int(self.cfg.n_samples),
            seed=1 if seed is None else int(seed),
        )

    @property
    def supports_flat_params(self) -> bool:
        return False  # spatial averaging needs each parameter's shape

    @property
    def supports_memory_efficient_fp16(self) -> bool:
        return False

    # -- the fairseq training loop ---------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, building the gradient's graph when the coming step estimates the Hessian."""
        if not self._optimizer.needs_hessian:
            loss.backward()
            return
        with second_order_safe(), warnings.catch_warnings():
            # AdaHessian detaches the gradients after its step, which breaks this reference cycle.
            warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle.*")
            loss.backward(create_graph=True)

    def multiply_grads(self, c) -> None:
        super().multiply_grads(c)
        self._curvature.scale = self._curvature.scale * c

    def zero_grad(self) -> None:
        super().zero_grad()
        self._curvature.scale = 1.0
        self._leave_second_order_safe()
        if self._optimizer.needs_hessian:
            # the trainer runs the forward pass next: record attention twice-differentiably
            self._safe = contextlib.ExitStack()
            self._safe.enter_context(second_order_safe())

    def step(self, closure=None, scale=1.0, groups=None) -> None:
        try:
            super().step(closure, scale=scale, groups=groups)
        finally:
            self._curvature.scale = 1.0
            self._leave_second_order_safe()

    def _leave_second_order_safe(self) -> None:
        if self._safe is not None:
            safe, self._safe = self._safe, None
            safe.close()
