r"""Curvature operators: symmetric linear maps ``v -> A v`` that the estimators apply.

Estimators (trace, diagonal, eigenvalues, spectral density) only ever compute ``op @ v``; the
operator owns everything else: which parameters, which data, how a model is put in the right mode
and restored. So every estimator can be tested on a 10x10 matrix, and every operator against a
dense Hessian.

``op @ v`` accepts a flat 1-D tensor of length ``op.num_params`` (returns a flat tensor), a list of
tensors shaped like the operator's parameters (returns such a list; :class:`HessianOperator` only),
or a 2-D tensor of shape ``(num_params, k)`` (applies the operator to each column).

Classes:
    CurvatureOperator:  the small base class (subclass it and implement ``_matvec``).
    HessianOperator:    the Hessian of a model's loss over one batch or a whole data set.
    MatrixOperator:     a dense symmetric matrix (tests, small problems).
    LambdaOperator:     any function ``v -> A v``.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .hvp import _hvp_forward_over_reverse, _hvp_from_grads, gradients_with_graph, second_order_safe

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "MatrixOperator",
    "LambdaOperator",
    "NonFiniteCurvatureError",
    "as_operator",
]


class NonFiniteCurvatureError(ValueError, FloatingPointError):
    """An operator produced NaN or Inf (a ``ValueError`` and a ``FloatingPointError``)."""


class DistributedOperatorError(RuntimeError):
    """Another rank failed while computing its share of a distributed operator's product."""


def _raise_rank_failures(failure: Optional[BaseException]) -> None:
    """Every rank raises after a failure anywhere: the failing ranks their own error, the others a
    :class:`DistributedOperatorError` quoting them (gathered once, on this rare path only)."""
    import torch.distributed as dist

    mine = None if failure is None else f"{type(failure).__name__}: {failure}"
    reports: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    if failure is not None:
        raise failure
    failed = {rank: text for rank, text in enumerate(reports) if text is not None}
    raise DistributedOperatorError(
        f"rank(s) {sorted(failed)} failed while computing their share of this distributed "
        "HessianOperator's product, so this rank stops too (no rank is left waiting): "
        + "; ".join(f"rank {r}: {text}" for r, text in failed.items())
    )


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (the inverse of :func:`unflatten`)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, shapes: Sequence[torch.Size]) -> List[torch.Tensor]:
    """Split a flat vector into views of the given shapes."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [chunk.view(s) for chunk, s in zip(vector.split(sizes), shapes)]


class CurvatureOperator:
    """A symmetric linear operator on ``R^n`` (the base of all operators).

    Subclasses set ``num_params``, ``dtype`` and ``device`` and implement ``_matvec(v)`` for a flat
    vector ``v``; the base class validates inputs, handles list-of-tensors and matrix arguments, and
    rejects non-finite results.
    """

    num_params: int
    dtype: torch.dtype
    device: torch.device
    #: shapes of the parameter blocks, for list-of-tensors vectors (``None``: flat vectors only)
    shapes: Optional[List[torch.Size]] = None

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.num_params, self.num_params)

    def broadcast_seed(self, seed: int) -> int:
        """Make a random seed identical on every process that applies this operator (identity here)."""
        return seed

    def __matmul__(self, v: Union[torch.Tensor, Sequence[torch.Tensor]]):
        if isinstance(v, (list, tuple)):
            return self._matvec_list(v)
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"an operator multiplies a tensor or a list of tensors, not {type(v).__name__}"
            )
        self._check_tensor(v)
        if v.dim() == 2:
            return torch.stack([self._checked_matvec(col) for col in v.unbind(dim=1)], dim=1)
        return self._checked_matvec(v)

    matvec = __matmul__

    def to_dense(self) -> torch.Tensor:
        """The full ``(n, n)`` matrix, by applying the operator to each unit vector (small n only)."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return self @ eye

    # -- validation ---------------------------------------------------------------------------

    def _check_tensor(self, v: torch.Tensor) -> None:
        if v.dim() not in (1, 2) or v.shape[0] != self.num_params:
            raise ValueError(
                f"expected a vector of length {self.num_params} (or a ({self.num_params}, k) matrix), "
                f"got shape {tuple(v.shape)}"
            )
        if v.dtype != self.dtype:
            raise TypeError(
                f"the vector has dtype {v.dtype} but the operator works in {self.dtype}; "
                f"convert with v.to({self.dtype})"
            )
        if v.device != self.device:
            raise ValueError(
                f"the vector is on {v.device} but the operator is on {self.device}; move it with "
                "v.to(op.device)"
            )

    def _matvec_list(self, vs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if self.shapes is None:
            raise TypeError(f"{type(self).__name__} multiplies flat vectors only, not lists of tensors")
        if len(vs) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} tensors (one per parameter), got {len(vs)}")
        for i, (t, s) in enumerate(zip(vs, self.shapes)):
            if not isinstance(t, torch.Tensor) or t.shape != s:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"tensor {i} should have shape {tuple(s)}, got {got}")
        flat = flatten(vs)
        self._check_tensor(flat)
        return unflatten(self._checked_matvec(flat), self.shapes)

    def _checked_matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self._matvec(v)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteCurvatureError(
                f"{type(self).__name__} produced NaN/Inf: the loss or its curvature is not finite at "
                "these parameters (check the loss value, the inputs, and use float32/float64 rather "
                "than float16)"
            )
        return out


class MatrixOperator(CurvatureOperator):
    """A dense symmetric matrix as an operator: ``MatrixOperator(A) @ v == A @ v``."""

    def __init__(self, matrix: torch.Tensor, check_symmetric: bool = True):
        if not isinstance(matrix, torch.Tensor):
            raise TypeError(f"MatrixOperator needs a tensor, got {type(matrix).__name__}")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        if not matrix.is_floating_point():
            raise TypeError(f"expected a floating-point matrix, got {matrix.dtype}")
        if check_symmetric:
            scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
            asym = (matrix - matrix.T).abs().max() / scale
            if asym > 100 * torch.finfo(matrix.dtype).eps:
                raise ValueError(
                    f"the matrix is not symmetric (max |A - A^T| / max |A| = {float(asym):.2e}); the "
                    "estimators assume a symmetric operator: pass (A + A.T) / 2"
                )
        self.matrix = matrix
        self.num_params = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v


class LambdaOperator(CurvatureOperator):
    """An operator defined by a function ``matvec_fn(v) -> A v`` on flat vectors of length ``num_params``."""

    def __init__(
        self,
        matvec_fn: Callable[[torch.Tensor], torch.Tensor],
        num_params: int,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
    ):
        if not callable(matvec_fn):
            raise TypeError("matvec_fn must be callable: v -> A v")
        if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 1:
            raise ValueError(f"num_params must be a positive int, got {num_params!r}")
        self._fn = matvec_fn
        self.num_params = num_params
        self.dtype = dtype
        self.device = torch.device(device)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self._fn(v)
        if not isinstance(out, torch.Tensor) or out.shape != v.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"matvec_fn returned {got}; it must return a tensor shaped like its input {tuple(v.shape)}")
        return out


def as_operator(obj: Union[CurvatureOperator, torch.Tensor]) -> CurvatureOperator:
    """Accept an operator or a dense symmetric tensor (wrapped in :class:`MatrixOperator`)."""
    if isinstance(obj, CurvatureOperator):
        return obj
    if isinstance(obj, torch.Tensor):
        return MatrixOperator(obj)
    raise TypeError(
        f"expected a CurvatureOperator (e.g. hessopt.HessianOperator) or a dense symmetric tensor, "
        f"got {type(obj).__name__}"
    )


# --------------------------------------------------------------------------------------------------
# The Hessian of a model's loss
# --------------------------------------------------------------------------------------------------

Batch = Tuple[Any, Any]
ParamSpec = Union[None, Sequence[torch.Tensor], str, Callable[[str], bool]]


def _is_single_batch(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``; a tuple/list is unpacked as positional and a dict as keyword arguments."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _batch_size(inputs: Any, targets: Any) -> int:
    for obj in (targets, inputs):
        if isinstance(obj, torch.Tensor) and obj.dim() > 0:
            return int(obj.shape[0])
        if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
            return int(obj[0].shape[0])
        if isinstance(obj, dict):
            for v in obj.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    return int(v.shape[0])
    raise ValueError("cannot tell the batch size: give targets (or inputs) with a batch dimension")


def _select_params(model: nn.Module, params: ParamSpec) -> Tuple[List[str], List[torch.Tensor]]:
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


#: how :class:`HessianOperator` computes a product (its ``method=``)
HVP_METHODS = ("reverse", "forward_over_reverse")


def _check_forward_over_reverse(model: nn.Module, names: List[str], params: List[torch.Tensor]) -> None:
    """Forward-over-reverse swaps the model's parameters through ``functional_call``, so it can only
    differentiate parameters the model owns."""
    own = {id(p) for p in model.parameters()}
    foreign = [n for n, p in zip(names, params) if id(p) not in own]
    if foreign:
        raise ValueError(
            f"method='forward_over_reverse' differentiates the model's own parameters only; {foreign} "
            "are not parameters of the model: pass model parameters or use method='reverse'"
        )


@contextlib.contextmanager
def _operator_mode(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Put ``model`` in the operator's mode, and restore it exactly on exit.

    All modules go to eval mode (dropout, stochastic depth and similar are off). With
    ``bn_mode="train"``, normalization layers go back to train mode (batch statistics) with their
    running-statistics buffers detached for the duration, so the forward pass neither reads nor
    updates them: running means, variances and ``num_batches_tracked`` stay bit-identical and are
    never written (no in-place update, no version-counter bump).
    """
    flags = [(m, m.training) for m in model.modules()]
    detached = []
    try:
        model.eval()
        if bn_mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.training = True
                    if _has_running_stats(m):
                        saved = {k: m._buffers[k] for k in ("running_mean", "running_var", "num_batches_tracked")}
                        detached.append((m, saved))
                        for k in saved:
                            m._buffers[k] = None
        yield
    finally:
        for m, saved in detached:
            m._buffers.update(saved)
        for m, flag in flags:
            m.training = flag


class HessianOperator(CurvatureOperator):
    r"""The Hessian of a model's mean loss, over one batch or a whole data set, as an operator.

    For batches :math:`B_1..B_m` of sizes :math:`n_b` and a ``loss_fn`` that returns the mean loss
    of a batch, the operator is the Hessian of the data-set mean loss,

    .. math::  H = \frac{\sum_b n_b H_b}{\sum_b n_b},

    so batches of 10 and 6 samples give exactly the Hessian of the 16 together.

    Args:
        model: the network. Its train/eval flags, normalization statistics and the global RNG state
            are the same after every ``op @ v`` as before.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` mean loss (e.g. ``nn.CrossEntropyLoss()``).
        data: one ``(inputs, targets)`` batch, or an iterable of batches (a list, a ``DataLoader``;
            a one-shot iterator is materialized into a list). Inputs may be a tensor, a tuple (passed
            as ``model(*inputs)``) or a dict (``model(**inputs)``); batches are moved to the
            parameters' device. Use data without random augmentation.
        params: ``None`` (all parameters that require grad), a list of tensors, a regular
            expression searched in parameter names (e.g. ``r"^layer1\."``), or a predicate on names.
        bn_mode: ``"eval"`` (default: normalization layers use their running statistics, the
            Hessian of the network as it is used for inference) or ``"train"`` (batch statistics, the
            Hessian of the training loss as the optimizer sees it). Dropout is off in both.
        cache_graph: keep the gradient graph between products, so each ``op @ v`` costs one extra
            backward instead of forward + backward + extra backward. Default: on for a single batch,
            off for an iterable (with it on, every batch's graph is kept in memory). The cache
            assumes the parameters do not change; call :meth:`clear_cache` after modifying them.
        distributed: average over all processes of an initialized ``torch.distributed`` group, each
            weighted by its number of samples (``None``: when a group with more than one process is
            initialized; ``False``: this process's data only). Every rank must then apply the
            operator to the same vectors, in the same order (estimators do, with ``generator=None``
            or an int seed, which is broadcast from rank 0; an explicit ``torch.Generator`` must be
            seeded alike on every rank); a product whose vector differs between ranks is detected
            (two checksums) and raises. A ``DistributedDataParallel`` model is unwrapped (same
            parameters). See ``docs/distributed.md``.
        progress: show a progress bar over batches (only useful for large data sets).
        method: how each product is computed: ``"reverse"`` (default; reverse-over-reverse, a
            double backward through the gradient's graph, which ``cache_graph`` can keep) or
            ``"forward_over_reverse"`` (``torch.func.jvp`` of ``torch.func.grad``: no backward graph
            is stored, so it needs less memory and no cache; attention runs the composite kernel).
            Both give the same products (tested in float64, BatchNorm in both modes, LayerNorm,
            attention); which is faster depends on the model and device.

    Attributes:
        params, param_names, shapes, num_params, dtype, device.

    Example:
        >>> op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
        >>> hessopt.top_eigenvalues(op, k=5).eigenvalues
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        data: Union[Batch, Iterable[Batch]],
        params: ParamSpec = None,
        bn_mode: str = "eval",
        cache_graph: Optional[bool] = None,
        distributed: Optional[bool] = None,
        progress: bool = False,
        method: str = "reverse",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        from .distributed import unwrap_data_parallel

        # HVPs through DDP's forward would leave its reducer waiting for a gradient reduction
        model = unwrap_data_parallel(self._uncompiled(model))
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(outputs, targets) -> scalar mean loss")
        if bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.bn_mode = bn_mode
        self.progress = progress
        self.param_names, self.params = _select_params(model, params)
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
        self._single = _is_single_batch(data)
        if self._single:
            self._data: Any = [data]
        elif isinstance(data, Iterator) or not isinstance(data, Iterable):
            if not isinstance(data, Iterable):
                raise TypeError(
                    "data must be an (inputs, targets) batch or an iterable of such batches, got "
                    f"{type(data).__name__}"
                )
            self._data = list(data)  # a one-shot iterator must survive many products
        else:
            self._data = data
        self._distributed = distributed
        # a rank's shard may be empty under torch.distributed (the other ranks' samples count);
        # the check that some rank has data is then made together, in the first product
        if hasattr(self._data, "__len__") and len(self._data) == 0 and not self.is_distributed:
            raise ValueError("data is empty: pass at least one (inputs, targets) batch")
        self.cache_graph = self._single if cache_graph is None else bool(cache_graph)
        if method not in HVP_METHODS:
            raise ValueError(f"method must be one of {HVP_METHODS}, got {method!r}")
        if method == "forward_over_reverse":
            _check_forward_over_reverse(model, self.param_names, self.params)
            self.cache_graph = False  # there is no graph to keep
        self.method = method
        self._cache: Optional[List[Tuple[List[Optional[torch.Tensor]], float]]] = None

    @staticmethod
    def _uncompiled(model: nn.Module) -> nn.Module:
        original = getattr(model, "_orig_mod", None)
        if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule":
            warnings.warn(
                "HessianOperator got a torch.compile'd model; double backward is not supported "
                "under torch.compile, so the uncompiled module (model._orig_mod, same parameters) "
                "is used",
                stacklevel=3,
            )
            return original
        return model

    # -- distributed ---------------------------------------------------------------------------

    @property
    def is_distributed(self) -> bool:
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        if self._distributed is None:
            return initialized and dist.get_world_size() > 1
        if self._distributed and not initialized:
            raise ValueError(
                "distributed=True but no torch.distributed process group is initialized: call "
                "torch.distributed.init_process_group first (or launch with torchrun)"
            )
        return bool(self._distributed)

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's seed on every rank, so that all ranks draw the same random probes."""
        if not self.is_distributed:
            return seed
        from .distributed import broadcast_object

        return broadcast_object(seed, src=0)

    def _local_then_reduce(
        self, accumulate: Callable[[torch.Tensor], float], total: torch.Tensor, v: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, float]:
        """``accumulate(total)`` (adds this rank's sample-weighted sum into the zeroed ``total`` and
        returns its sample count), then :meth:`_reduce`.

        Distributed, an error in this rank's share is not raised at once: the other ranks would
        wait forever in the collective. The rank joins the reduction with a zeroed ``total`` and a
        failure flag instead, and then every rank raises: the failing ranks their own error, the
        others a :class:`DistributedOperatorError` that names the failing ranks and quotes them."""
        if not self.is_distributed:
            return total, accumulate(total)
        failure: Optional[BaseException] = None
        try:
            count = accumulate(total)
        except Exception as err:  # noqa: BLE001 - re-raised below, after the collective
            total.zero_()  # a partial sum must not reach the other ranks
            count, failure = 0.0, err
        return self._reduce(total, count, v, failure)

    def _reduce(
        self, total: torch.Tensor, count: float, v: Optional[torch.Tensor] = None,
        failure: Optional[BaseException] = None,
    ) -> Tuple[torch.Tensor, float]:
        """Sum ``total`` and ``count`` over ranks (one collective per dtype).

        The same float64 buffer as ``count`` carries a failure flag (see :meth:`_local_then_reduce`)
        and, with ``v``, the check that every rank multiplied the same vector: two float64
        checksums of ``v`` and their squares, so every rank sees the same spread across ranks and
        all of them raise together (no rank is left waiting in a collective). Vectors that differ
        by less than about 1e-6 of a checksum pass (rounding across unlike machines). A sample count
        of zero over all ranks (every shard empty) raises on every rank."""
        if not self.is_distributed:
            return total, count
        import torch.distributed as dist

        from .distributed import all_reduce_sum

        stats = [torch.tensor([float(count), float(failure is not None)], dtype=torch.float64, device=total.device)]
        if v is not None:
            ramp = torch.linspace(1.0, 2.0, v.numel(), dtype=v.dtype, device=v.device)
            sums = torch.stack([v.sum(dtype=torch.float64), (v * ramp).sum(dtype=torch.float64)])
            scale = torch.linalg.vector_norm(v, 1, dtype=torch.float64).reshape(1)
            stats += [sums, sums * sums, scale]
        total, reduced = all_reduce_sum([total, torch.cat([s.reshape(-1) for s in stats])])
        values = reduced.tolist()
        if values[1] > 0:
            _raise_rank_failures(failure)
        if values[0] == 0:
            raise ValueError(
                "data is empty on every rank: pass at least one (inputs, targets) batch on some rank"
            )
        if v is not None:
            world = dist.get_world_size()
            scale = values[6] / world
            for total_sum, total_sq in zip(values[2:4], values[4:6]):
                mean = total_sum / world
                spread = max(total_sq / world - mean * mean, 0.0) ** 0.5
                # identical vectors leave a spread of rounding size, about 1e-8 |mean| (cancellation)
                if spread > 1e-6 * abs(mean) + 1e-9 * scale:
                    raise ValueError(
                        "the ranks multiplied this distributed HessianOperator by different vectors; "
                        "its product sums the ranks' HVPs, so every rank must pass the same vector. "
                        "Use generator=None or an int seed in the estimators (rank 0's seed is "
                        "broadcast), seed an explicit torch.Generator alike on every rank, pass "
                        "identical probes=, or use distributed=False for a per-rank operator"
                    )
        return total, values[0]

    # -- the Hessian -----------------------------------------------------------------------------

    def clear_cache(self) -> None:
        """Drop the cached gradient graph (call after changing the parameters)."""
        self._cache = None

    def _batches(self) -> Iterator[Batch]:
        batches = self._data
        if self.progress and not self._single:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="HVP batches", leave=False)
        empty = True
        for batch in batches:
            empty = False
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(
                    "each batch must be an (inputs, targets) pair; got "
                    f"{type(batch).__name__}{'' if not hasattr(batch, '__len__') else ' of length ' + str(len(batch))}"
                )
            yield batch
        if empty and not self.is_distributed:
            raise ValueError("data is empty: pass at least one (inputs, targets) batch")

    def _forward_loss(self, batch: Batch) -> Tuple[torch.Tensor, int]:
        inputs, targets = _to_device(batch[0], self.device), _to_device(batch[1], self.device)
        n = _batch_size(inputs, targets)
        with _operator_mode(self.model, self.bn_mode), second_order_safe():
            loss = self.loss_fn(call_model(self.model, inputs), targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar mean loss, got {shape}; use reduction='mean'"
            )
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteCurvatureError(f"the loss is {float(loss.detach())}: the Hessian is undefined here")
        return loss, n

    def _rng_guard(self):
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _batch_grads(self, batch: Batch) -> Tuple[List[Optional[torch.Tensor]], float, torch.Tensor]:
        loss, n = self._forward_loss(batch)
        return gradients_with_graph(loss, self.params), float(n), loss.detach()

    def _graphs(self) -> Iterator[Tuple[List[Optional[torch.Tensor]], float]]:
        """``(gradients with graph, batch size)`` per batch; built once and kept if ``cache_graph``."""
        if not self.cache_graph:
            for batch in self._batches():
                yield self._batch_grads(batch)[:2]
            return
        if self._cache is None:
            self._cache = [self._batch_grads(batch)[:2] for batch in self._batches()]
        yield from self._cache

    def _products(self, vectors: List[torch.Tensor]) -> Iterator[Tuple[List[torch.Tensor], float]]:
        """``(Hv of one batch's mean loss, batch size)`` for every batch, by the operator's method."""
        if self.method == "forward_over_reverse":
            for batch in self._batches():
                yield self._forward_over_reverse(batch, vectors)
            return
        for grads, n in self._graphs():
            yield _hvp_from_grads(grads, self.params, vectors, self.cache_graph, graph_was_built=True), n

    def _forward_over_reverse(self, batch: Batch, vectors: List[torch.Tensor]) -> Tuple[List[torch.Tensor], float]:
        from torch.func import functional_call

        inputs, targets = _to_device(batch[0], self.device), _to_device(batch[1], self.device)
        n = _batch_size(inputs, targets)
        args, kwargs = (((), inputs) if isinstance(inputs, dict)
                        else (tuple(inputs), {}) if isinstance(inputs, (tuple, list)) else ((inputs,), {}))

        def loss_of(tensors: List[torch.Tensor]) -> torch.Tensor:
            outputs = functional_call(self.model, dict(zip(self.param_names, tensors)), args, kwargs)
            loss = self.loss_fn(outputs, targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"loss_fn must return a scalar mean loss, got {shape}; use reduction='mean'")
            return loss

        with _operator_mode(self.model, self.bn_mode):
            return _hvp_forward_over_reverse(loss_of, self.params, vectors), float(n)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        def accumulate(total: torch.Tensor) -> float:
            vectors, count = unflatten(v, self.shapes), 0.0
            with self._rng_guard():
                for hv, n in self._products(vectors):
                    total.add_(flatten(hv), alpha=n)
                    count += n
            return count

        total, count = self._local_then_reduce(accumulate, torch.zeros_like(v), v)
        return total / count

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the (data-set) mean loss at the current parameters."""
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

        total, count = self._local_then_reduce(
            accumulate, torch.zeros(self.num_params, dtype=self.dtype, device=self.device))
        return total / count

    def loss(self) -> float:
        """The (data-set) mean loss at the current parameters, in the operator's mode."""
        def accumulate(total: torch.Tensor) -> float:
            count = 0.0
            with torch.no_grad(), self._rng_guard():
                for batch in self._batches():
                    loss, n = self._forward_loss(batch)
                    total += loss.double() * n
                    count += n
            return count

        total, count = self._local_then_reduce(accumulate, torch.zeros(1, dtype=torch.float64, device=self.device))
        return float(total.item()) / count
