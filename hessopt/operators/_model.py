r"""What every model-based operator shares: one constructor convention and one data protocol.

:class:`ModelOperator` is the common base of :class:`HessianOperator`, :class:`GGNOperator` and
:class:`EmpiricalFisherOperator`. It owns

* which parameters (``params=``: all trainable ones, a list, a name regex or a predicate),
* which data (one batch or an iterable of batches, pairs or dicts; :mod:`hessopt._batches`), with
  the data-set average weighted by batch size,
* the model's mode (:func:`operator_mode`: dropout off, BatchNorm in eval or train mode without
  touching its running statistics, ``train()`` overrides honoured) and its restoration
  (:func:`preserved_module_tensors`: every parameter and buffer object is the one found),
* the global RNG (forked around every product), and
* ``torch.distributed`` averaging (:class:`hessopt.distributed.OperatorSync`), or, on FSDP2-sharded
  parameters, sharded vectors and FSDP's own averaging (:mod:`hessopt.operators._sharded_model`;
  only operators whose products need no second derivative through the network accept those).

A subclass implements ``_products(vectors)``: ``(product of one batch's mean-loss curvature with
the vectors, batch size)`` for every batch.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import _batches, _sharded
from ..hvp import second_order_safe
from ._sharded_model import NEEDS_FINITE_DIFFERENCES, sharded_model_of
from .base import CurvatureOperator, NonFiniteCurvatureError, flatten, unflatten

__all__ = ["ModelOperator", "operator_mode", "preserved_module_tensors", "select_params"]

ParamSpec = Union[None, Sequence[torch.Tensor], str, Callable[[str], bool]]


def select_params(model: nn.Module, params: ParamSpec) -> Tuple[List[str], List[torch.Tensor]]:
    """``(names, tensors)`` of the parameters chosen by ``params`` (see :class:`ModelOperator`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    elif isinstance(params, str):
        pattern = re.compile(params)
        chosen = [(n, p) for n, p in named if pattern.search(n)]
    elif callable(params) and not isinstance(params, torch.Tensor):
        chosen = [(n, p) for n, p in named if params(n)]
    else:
        if isinstance(params, torch.Tensor):
            params = [params]
        names = {id(p): n for n, p in model.named_parameters()}
        chosen = []
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor")
            if not p.requires_grad:
                raise ValueError(
                    f"params[{i}] ({names.get(id(p), 'not a model parameter')}) does not require "
                    "grad (it is frozen): leave it out of params"
                )
            chosen.append((names.get(id(p), f"tensor_{i}"), p))
    if not chosen:
        raise ValueError(
            "no parameters selected: the model has no trainable parameters (requires_grad=True) "
            "matching `params`; unfreeze some or change the filter"
        )
    return [n for n, _ in chosen], [p for _, p in chosen]


def _has_running_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats


def _overrides_train(module: nn.Module) -> bool:
    return getattr(type(module).train, "__code__", None) is not nn.Module.train.__code__


def _restore_flags(model: nn.Module, flags: Sequence[Tuple[nn.Module, bool]]) -> None:
    """Give every module its saved ``training`` flag *through* ``train()``, so that overrides run.

    ``model.train(flag)`` first (it recurses), then, top-down (``modules()`` is pre-order), every
    module whose flag still differs gets ``train(its flag)``, which also resets its children before
    they are visited in turn. Flags end exactly as saved, whatever an override does to its children.
    """
    model.train(flags[0][1])
    for m, flag in flags:
        if m.training != flag:
            m.train(flag)


@contextlib.contextmanager
def operator_mode(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Put ``model`` in the operator's mode, and restore it exactly on exit.

    All modules go to eval mode (dropout, stochastic depth and similar are off) through
    ``model.eval()``. With ``bn_mode="train"``, normalization layers go back to train mode (batch
    statistics) with their running-statistics buffers detached for the duration, so the forward pass
    neither reads nor updates them: running means, variances and ``num_batches_tracked`` stay
    bit-identical and are never written (no in-place update, no version-counter bump).

    Modes change only through the modules' own ``train()``, never by setting ``module.training``,
    so overrides run. A module whose class overrides ``train()`` is passed through train mode on
    entry and on exit: models such as timm's LeViT and EfficientFormerV2 keep an eval-mode cache
    (of attention biases) that only their ``train()`` clears; without this, the operator's forward
    would fill it with graph-carrying tensors (``copy.deepcopy`` then fails, and a later eval
    forward uses biases computed from old weights), or reuse a stale cache that carries no
    derivative to the parameters.
    """
    flags = [(m, m.training) for m in model.modules()]
    overriding = [m for m, _ in flags if _overrides_train(m)]
    detached = []
    try:
        for m in overriding:
            m.train(True)
        model.eval()
        if bn_mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.train(True)
                    if _has_running_stats(m):
                        saved = {k: m._buffers[k] for k in ("running_mean", "running_var", "num_batches_tracked")}
                        detached.append((m, saved))
                        for k in saved:
                            m._buffers[k] = None
        yield
    finally:
        for m, saved in detached:
            m._buffers.update(saved)
        for m in overriding:
            m.train(True)  # drop what the operator's forward left in an eval-mode cache
        _restore_flags(model, flags)


@contextlib.contextmanager
def preserved_module_tensors(model: nn.Module) -> Iterator[None]:
    """On exit, every module holds the very parameter and buffer objects it held on entry.

    ``torch.func.functional_call`` swaps tensors into the modules and back; for a module reachable
    by two paths (registered twice: one PReLU under two names, shared position encodings) torch
    2.14 puts the swapped-in plain tensor back instead of the ``Parameter``, and every later
    product and training step would silently drop that weight. Restoring by identity is exact.
    """
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for m, params, buffers in saved:
            for store, original in ((m._parameters, params), (m._buffers, buffers)):
                for key in [k for k in store if k not in original]:
                    del store[key]
                for key, value in original.items():
                    if store.get(key, _MISSING) is not value:
                        store[key] = value
                    m.__dict__.pop(key, None)  # a plain attribute would shadow the registered one


_MISSING = object()


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module whose child is the model (for ``functional_call``)."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch):
        return self._loss_fn(self.model, batch)


class ModelOperator(CurvatureOperator):
    r"""The common base of the operators built from a model, a loss and data (see the module docstring).

    Args (every subclass takes these, in this order, plus its own keywords):
        model: the network. Its train/eval flags (set through its own ``train()``), parameter and
            buffer objects, normalization statistics and the global RNG state are the same after
            every product as before. A ``torch.compile``'d model is unwrapped (``_orig_mod``), a
            ``DistributedDataParallel`` one too (same parameters).
        loss_fn: ``loss_fn(outputs, targets) -> scalar mean loss`` (``targets``: the second element of
            a pair batch, the whole batch for a dict batch); ``None`` for a model that returns its
            own loss (``outputs.loss`` or ``outputs["loss"]``); or, with ``loss_form="model"``,
            ``loss_fn(model, batch) -> scalar mean loss`` (it runs the model itself).
        data: one batch or an iterable of batches (a list, a ``DataLoader``; a one-shot iterator is
            materialized into a list). A batch is an ``(inputs, targets)`` pair (inputs a tensor, a
            tuple for ``model(*inputs)`` or a dict for ``model(**inputs)``) or a dict
            (``model(**batch)``, the HuggingFace convention). Batches are moved to the parameters'
            device. Use data without random augmentation.
        params: ``None`` (all parameters that require grad), a list of tensors, a regular
            expression searched in parameter names (e.g. ``r"^layer1\."``), or a predicate on names.
        bn_mode: ``"eval"`` (default: running statistics) or ``"train"`` (batch statistics, running
            statistics untouched). Dropout is off in both.
        distributed: average over the ranks of ``torch.distributed``, each weighted by its number of
            samples (``None``: when a group of more than one process is initialized). Every rank
            must multiply the same vectors (checked at every product). See
            :class:`hessopt.distributed.OperatorSync`.
        progress: a progress bar over batches.
        loss_form: ``"outputs"`` (default) or ``"model"``, the two calling conventions of ``loss_fn``
            above; never guessed from the function.
        batch_size: a callable ``batch -> int``, the weight of a batch in the data-set average
            (default: the leading dimension of the targets, else of the batch's first tensor).
    """

    #: what the operator's matrix is called in messages
    _matrix_name = "curvature"
    #: whether the class accepts FSDP2-sharded parameters (it then checks its own options)
    _may_shard = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Optional[Callable],
        data: Any,
        params: ParamSpec = None,
        bn_mode: str = "eval",
        distributed: Optional[bool] = None,
        progress: bool = False,
        loss_form: str = "outputs",
        batch_size: Optional[Callable[[Any], int]] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        from ..distributed import OperatorSync, unwrap_data_parallel

        # products through DDP's forward would leave its reducer waiting for a gradient reduction
        model = unwrap_data_parallel(self._uncompiled(model))
        self.loss_form = _batches.loss_form_of(loss_fn, loss_form)
        if bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
        if batch_size is not None and not callable(batch_size):
            raise TypeError("batch_size must be a callable batch -> int (or None for the leading dimension)")
        self.model = model
        self.loss_fn = loss_fn
        self.bn_mode = bn_mode
        self.progress = progress
        self._size_fn = batch_size
        _sharded.reshard(_sharded.fsdp_modules(model))  # FSDP2: the DTensor parameters, not a forward's leftovers
        self.param_names, self.params = select_params(model, params)
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise TypeError(
                f"the selected parameters mix dtypes {sorted(map(str, dtypes))} or devices "
                f"{sorted(map(str, devices))}; select parameters of one dtype and device"
            )
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self.shapes = [p.shape for p in self.params]
        self.num_params = sum(p.numel() for p in self.params)
        self._data, self._single = _batches.materialize(data)
        self._shards = sharded_model_of(self, type(self).__name__)
        if self._shards is not None:
            if not self._may_shard:
                raise TypeError(NEEDS_FINITE_DIFFERENCES.format(name=type(self).__name__,
                                                                what=f"the {self._matrix_name}'s products"))
            if distributed is False:
                raise ValueError(f"{type(self).__name__}: distributed=False cannot apply to sharded (FSDP2) "
                                 "parameters, whose every forward and backward involves all processes")
            self.shapes = list(self._shards.local_shapes)  # list-of-tensors vectors are local chunks
            self.is_sharded = True
            distributed = False  # FSDP averages over the processes itself
        self._sync = OperatorSync(distributed, name=type(self).__name__)
        # a rank's shard may be empty under torch.distributed (the other ranks' samples count);
        # the check that some rank has data is then made together, in the first product
        if hasattr(self._data, "__len__") and len(self._data) == 0 and not self.is_distributed:
            raise ValueError("data is empty: pass at least one (inputs, targets) batch")

    @staticmethod
    def _uncompiled(model: nn.Module) -> nn.Module:
        original = getattr(model, "_orig_mod", None)
        if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule":
            warnings.warn(
                "the operator got a torch.compile'd model; double backward is not supported "
                "under torch.compile, so the uncompiled module (model._orig_mod, same parameters) "
                "is used",
                stacklevel=4,
            )
            return original
        return model

    # -- distributed ---------------------------------------------------------------------------

    @property
    def is_distributed(self) -> bool:
        return self._shards is not None or self._sync.active

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's seed on every rank, so that all ranks draw the same random probes."""
        if self._shards is not None:
            return self._shards.broadcast_seed(seed)
        return self._sync.broadcast_seed(seed)

    # -- the vector space: sharded on FSDP2 parameters (see hessopt.operators.base) ----------------

    @property
    def local_size(self) -> int:
        return self.num_params if self._shards is None else self._shards.local_size

    def reduce_sum(self, partial: torch.Tensor) -> torch.Tensor:
        return partial if self._shards is None else self._shards.reduce_sum(partial)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return super().dot(a, b) if self._shards is None else self._shards.dot(a, b)

    def norm(self, a: torch.Tensor) -> float:
        return super().norm(a) if self._shards is None else self._shards.norm(a)

    def probe(self, generator: torch.Generator, dtype: Optional[torch.dtype] = None,
              distribution: str = "rademacher") -> torch.Tensor:
        if self._shards is None:
            return super().probe(generator, dtype, distribution)
        return self._shards.probe(self.params, generator, self.dtype if dtype is None else dtype, distribution)

    def _all_finite(self, out: torch.Tensor) -> bool:
        finite = super()._all_finite(out)
        return finite if self._shards is None else self._shards.all_true(finite)

    # -- data ------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[Any]:
        batches = self._data
        if self.progress and not self._single:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"{type(self).__name__} batches", leave=False)
        empty = True
        for batch in batches:
            empty = False
            if self.loss_form == "outputs":
                _batches._check_pair(batch)
            yield batch
        if empty and not self.is_distributed:
            raise ValueError("data is empty: pass at least one (inputs, targets) batch")

    def _prepare(self, batch: Any) -> Tuple[Any, int]:
        """The batch on the operator's device, and its size."""
        batch = _batches.to_device(batch, self.device)
        return batch, self._batch_size(batch)

    def _batch_size(self, batch: Any) -> int:
        return _batches.batch_size(batch, self.loss_form, self._size_fn)

    def _check_loss(self, loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar mean loss, got {shape}; use reduction='mean'")
        return loss

    def _forward_loss(self, batch: Any, second_order: bool = True) -> Tuple[torch.Tensor, int]:
        """One batch's mean loss (with its graph) in the operator's mode, and the batch size;
        ``second_order=False`` for products that need first-order gradients only (PyTorch's own
        kernels then, not :func:`hessopt.second_order_safe`'s routes)."""
        batch, n = self._prepare(batch)
        safe = second_order_safe() if second_order else contextlib.nullcontext()
        with operator_mode(self.model, self.bn_mode), safe:
            loss = self._check_loss(_batches.evaluate_loss(self.model, self.loss_fn, batch, self.loss_form))
        # sharded: a non-finite loss is caught by the agreed check of the product (every process
        # raises together) instead of by this process alone, which would leave the others waiting
        if self._shards is None and not bool(torch.isfinite(loss.detach())):
            raise NonFiniteCurvatureError(
                f"the loss is {float(loss.detach())}: the {self._matrix_name} is undefined here")
        return loss, n

    def _functional(self) -> Tuple[nn.Module, List[str]]:
        """``(module, names)`` for ``torch.func.functional_call``: the model and the selected
        parameters' names, or (``loss_form="model"``) a wrapper module whose forward is the loss."""
        own = {id(p) for p in self.model.parameters()}
        foreign = [n for n, p in zip(self.param_names, self.params) if id(p) not in own]
        if foreign:
            raise ValueError(
                f"{type(self).__name__} swaps the model's own parameters through "
                f"torch.func.functional_call; {foreign} are not parameters of the model: pass model "
                "parameters (or use HessianOperator with method='reverse')"
            )
        if self.loss_form == "model":
            return _LossModule(self.model, self.loss_fn), ["model." + n for n in self.param_names]
        return self.model, list(self.param_names)

    def _functional_loss(self, batch: Any) -> Callable[..., torch.Tensor]:
        """``loss(*tensors)``: the batch's mean loss as a pure function of the selected parameters
        (run inside :func:`operator_mode` and :func:`preserved_module_tensors`)."""
        from torch.func import functional_call

        module, names = self._functional()

        def loss(*tensors: torch.Tensor) -> torch.Tensor:
            swapped = dict(zip(names, tensors))
            if self.loss_form == "model":
                out = functional_call(module, swapped, (batch,))
            else:
                _batches._check_pair(batch)
                if _batches.is_mapping_batch(batch):
                    outputs = functional_call(module, swapped, (), dict(batch))
                    targets = batch
                else:
                    inputs, targets = batch
                    args, kwargs = _call_args(inputs)
                    outputs = functional_call(module, swapped, args, kwargs)
                out = _batches.loss_of_outputs(self.loss_fn, outputs, targets)
            return self._check_loss(out).reshape(())

        return loss

    def _rng_guard(self):
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    # -- products ----------------------------------------------------------------------------------

    def _products(self, vectors: List[torch.Tensor]) -> Iterator[Tuple[List[torch.Tensor], float]]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self._shards is not None:
            return self._sharded_matvec(v)

        def accumulate(total: torch.Tensor) -> float:
            vectors, count = unflatten(v, self.shapes), 0.0
            with self._rng_guard(), preserved_module_tensors(self.model):
                for product, n in self._products(vectors):
                    total.add_(flatten(product), alpha=n)
                    count += n
            return count

        total, count = self._sync.local_then_reduce(accumulate, torch.zeros_like(v), v)
        return total / count

    def _sharded_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Sharded: the products come already averaged over the processes (FSDP) and weighted
        (:meth:`ShardedModel.weights`): their sum over the batches is the data-set product."""
        total = torch.zeros_like(v)
        with self._rng_guard(), self._shards.grads_stashed(self.model):
            for product, weight in self._products(unflatten(v, self.shapes)):
                total.add_(flatten(product), alpha=weight)
        return total

    def _forward_without_backward(self):
        """``torch.no_grad()`` for forward passes no backward follows; on FSDP2 also the reshard after
        them (:meth:`ShardedModel.forward_without_backward`)."""
        if self._shards is None:
            return torch.no_grad()
        stack = contextlib.ExitStack()
        stack.enter_context(self._shards.forward_without_backward())
        stack.enter_context(torch.no_grad())
        return stack

    def _sharded_weighted_losses(self) -> Iterator[torch.Tensor]:
        """Each batch's mean loss times its weight ``W n_rb / N`` (sharded operators)."""
        for batch, weight in zip(self._batches(), self._shards.weights(self)):
            yield self._forward_loss(batch)[0] * weight

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the (data-set) mean loss at the current parameters (this process's
        shard of it, on sharded parameters)."""
        if self._shards is not None:
            total = torch.zeros(self.local_size, dtype=self.dtype, device=self.device)
            with self._rng_guard(), self._shards.grads_stashed(self.model):
                for loss in self._sharded_weighted_losses():
                    total.add_(flatten(self._shards.gradient(loss, self.params)))
            self._shards.check_finite(total, "the gradient")
            return total

        def accumulate(total: torch.Tensor) -> float:
            count = 0.0
            with self._rng_guard():
                for batch in self._batches():
                    loss, n = self._forward_loss(batch)
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                    total.add_(flatten([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]),
                               alpha=n)
                    count += n
            return count

        total, count = self._sync.local_then_reduce(
            accumulate, torch.zeros(self.num_params, dtype=self.dtype, device=self.device))
        return total / count

    def loss(self) -> float:
        """The (data-set) mean loss at the current parameters, in the operator's mode."""
        if self._shards is not None:
            total = torch.zeros(1, dtype=torch.float64, device=self.device)
            with self._forward_without_backward(), self._rng_guard():
                for loss in self._sharded_weighted_losses():
                    total += loss.double() / self._shards.world
            return float(self._shards.reduce_sum(total).item())

        def accumulate(total: torch.Tensor) -> float:
            count = 0.0
            with torch.no_grad(), self._rng_guard():
                for batch in self._batches():
                    loss, n = self._forward_loss(batch)
                    total += loss.double() * n
                    count += n
            return count

        total, count = self._sync.local_then_reduce(accumulate, torch.zeros(1, dtype=torch.float64, device=self.device))
        return float(total.item()) / count


def _call_args(inputs: Any) -> Tuple[tuple, dict]:
    """``(args, kwargs)`` of :func:`hessopt._batches.call_model` for ``functional_call``."""
    if _batches.is_mapping_batch(inputs):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}
