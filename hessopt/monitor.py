r"""Curvature diagnostics during training, every N steps, without disturbing the training run.

:class:`CurvatureMonitor` evaluates, on a fixed held-out batch (or a few), the Hessian of the loss at
the current parameters through :class:`hessopt.HessianOperator`, and records

* the top-``k`` eigenvalues (Lanczos with full reorthogonalization, :func:`hessopt.top_eigenvalues`)
  with their a-posteriori error bounds;
* the trace with its standard error (Hutch++, :func:`hessopt.trace`);
* optionally the spectral density (stochastic Lanczos quadrature, :func:`hessopt.spectral_density`;
  the nodes and weights are stored, smoothing happens when plotting);
* optionally the fraction of the gradient in the top-``k`` eigenspace (Ghorbani, Krishnan & Xiao,
  ICML 2019):

  .. math::  c_k = \frac{\|V_k^\top g\|^2}{\|g\|^2},

  with :math:`V_k` the (orthonormal) top-``k`` Ritz vectors and :math:`g` the gradient of the same
  loss on the same batch. Ghorbani et al. report that without BatchNorm :math:`c_k` is close to 1
  early in training (the gradient lives in the outlier eigenspace) and with BatchNorm it is not.

Each evaluation is one :func:`hessopt.curvature_summary` of the operator; a record is
``{"step": step, **summary.to_dict()}`` (``num_params``, ``top_eigenvalues``,
``eigenvalue_error_bounds``, ``eigenvalues_converged``, ``trace``, ``trace_std_error``, ``loss``,
optionally ``density`` (nodes, weights, sigma, num_matvecs), ``gradient_norm``,
``gradient_concentration``, then ``num_matvecs``, ``seed``), plus any extra fields passed to
:meth:`CurvatureMonitor.step` and ``time_s``: the names of :mod:`hessopt.results`, shared with the
report. Records are appended to a JSONL file (one JSON object per line) and, when TensorBoard is
installed, written as scalars.

**Training is not perturbed**: the operator puts the model in eval mode (or BatchNorm-train mode
with detached running statistics) and restores every module's mode; BatchNorm running statistics
are never written; all random numbers come from seeds derived from ``(seed, step)`` (the seeding
rule of :func:`hessopt.curvature_summary`, base ``1000003 seed + 7 step``) and the global
CPU and CUDA RNG states are restored; ``p.grad`` is never written (``torch.autograd.grad`` only). A
training run with the monitor is bit-identical to one without (tested).

Cost per evaluation, in Hessian-vector products (each about 4-5 gradient computations for a
ResNet: 4.9 for CIFAR ResNet20, and for resnet50 with BatchNorm in eval mode, on one H100): ``max_matvecs`` (Lanczos, default ``max(30, 8k)``) + ``trace_matvecs``
(default 30) + ``density_steps`` if enabled; plus one gradient and one loss evaluation.

Plots of the records (matplotlib, ``pip install hessopt[plot]``) live with the other plots:
:func:`hessopt.analysis.plots.plot_curvature` (eigenvalues and trace against the step) and
:func:`hessopt.analysis.plots.plot_densities` (densities of a few records); read a JSONL log
back with :func:`read_jsonl`.

Example:
    >>> import torch, hessopt
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    >>> held_out = (torch.randn(8, 3), torch.randint(0, 2, (8,)))   # fixed, no augmentation
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> monitor = hessopt.CurvatureMonitor(model, nn.CrossEntropyLoss(), held_out, every=2, k=2,
    ...                                    tensorboard=False)  # log_path="run/curvature.jsonl" to log
    >>> for step in range(1, 5):
    ...     opt.zero_grad()
    ...     nn.functional.cross_entropy(model(x), y).backward()
    ...     opt.step()
    ...     record = monitor.step(step)  # a record at steps 2 and 4, None otherwise
    >>> [r["step"] for r in monitor.records], sorted(monitor.records[0])[:3]
    ([2, 4], ['eigenvalue_error_bounds', 'eigenvalues_converged', 'gradient_concentration'])
    >>> monitor.close()
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from .operators import HessianOperator
from .summary import curvature_summary, derive_seed

__all__ = ["CurvatureMonitor", "read_jsonl"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


@contextlib.contextmanager
def _training_state_guard(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Restore the global RNG streams (CPU and the model's CUDA devices), module modes and ``p.grad``.

    The operator already restores modes and RNG; this outer guard also covers the monitor's own
    work between products, so the promise does not rest on every estimator being careful.
    """
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in params]
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            yield
        finally:
            for m, flag in modes:
                m.training = flag
            for p, g in grads:
                p.grad = g


class CurvatureMonitor:
    """Hessian diagnostics every ``every`` steps on fixed held-out data (see the module docstring).

    Args:
        model: the network being trained (a DistributedDataParallel wrapper is unwrapped).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` mean loss.
        data: one ``(inputs, targets)`` batch or a list of batches, without augmentation, kept fixed.
        every: evaluate when ``step % every == 0`` (``0`` disables :meth:`step`; :meth:`compute`
            always runs).
        k: number of top eigenvalues.
        tol: relative accuracy for the eigenvalues (Lanczos stops when every error bound is below
            ``tol * |eigenvalue|`` or after ``max_matvecs``; ``eigenvalues_converged`` says which).
        max_matvecs: Lanczos budget per evaluation (default ``max(30, 8 k)``).
        trace_matvecs: Hutch++ budget (at least 4; its standard error comes from a third of them).
        density: also record the spectral density (SLQ nodes and weights).
        density_steps: Lanczos steps of the density (one run per evaluation).
        gradient_concentration: also record ``||V_k^T g||^2 / ||g||^2`` and ``||g||``.
        bn_mode: ``"eval"`` (running statistics) or ``"train"`` (batch statistics; the running
            statistics are still left untouched), as in :class:`hessopt.HessianOperator`.
        params: which parameters (as in :class:`hessopt.HessianOperator`; default all trainable).
        seed: base seed; evaluation at step ``s`` uses the summary seed ``1000003 seed + 7 s``
            (:func:`hessopt.curvature_summary`), so a record does not depend on which other steps
            were evaluated, nor on the global RNG.
        log_path: JSONL file to append records to (``None``: keep them in :attr:`records` only).
        tensorboard: ``None`` (default): write scalars when the ``tensorboard`` package is installed
            and a directory is known (``tensorboard_dir``, or ``<folder of log_path>/tensorboard``);
            ``True``: required (ImportError naming the ``[tensorboard]`` extra otherwise); ``False``: off.
        tensorboard_dir: directory for the TensorBoard event files.

    Attributes:
        records: the records computed so far (dicts, as written to the JSONL file).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        data: Any,
        every: int = 100,
        k: int = 5,
        tol: float = 1e-3,
        max_matvecs: Optional[int] = None,
        trace_matvecs: int = 30,
        density: bool = False,
        density_steps: int = 60,
        gradient_concentration: bool = True,
        bn_mode: str = "eval",
        params: Any = None,
        seed: int = 0,
        log_path: Union[str, os.PathLike, None] = None,
        tensorboard: Optional[bool] = None,
        tensorboard_dir: Union[str, os.PathLike, None] = None,
    ):
        for name, value, minimum in (("every", every, 0), ("k", k, 1), ("trace_matvecs", trace_matvecs, 4),
                                     ("density_steps", density_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if max_matvecs is not None and (not isinstance(max_matvecs, int) or max_matvecs < k):
            raise ValueError(f"max_matvecs must be an int >= k={k}, got {max_matvecs!r}")
        if bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
        if tensorboard not in (None, True, False):
            raise TypeError(f"tensorboard must be None, True or False, got {tensorboard!r}")
        self.model = _unwrap(model)
        self.loss_fn = loss_fn
        self.data = data
        self.every = every
        self.k = k
        self.tol = tol
        self.max_matvecs = max_matvecs if max_matvecs is not None else max(30, 8 * k)
        self.trace_matvecs = trace_matvecs
        self.density = density
        self.density_steps = density_steps
        self.gradient_concentration = gradient_concentration
        self.bn_mode = bn_mode
        self.params = params
        self.seed = int(seed)
        self.log_path = Path(log_path) if log_path is not None else None
        self.records: List[Dict[str, Any]] = []
        self._writer = self._make_writer(tensorboard, tensorboard_dir)
        # validates model, loss_fn, data and params now rather than at the first evaluation
        HessianOperator(self.model, loss_fn, data, params=params, bn_mode=bn_mode, cache_graph=False)

    # -- public ------------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether :meth:`step` evaluates at ``step``."""
        return self.every > 0 and step % self.every == 0

    def step(self, step: int, **extra: Any) -> Optional[Dict[str, Any]]:
        """Evaluate if :meth:`due` (call once per training step, after ``opt.step()``); returns the record or None."""
        return self.compute(step, **extra) if self.due(step) else None

    def compute(self, step: int, **extra: Any) -> Dict[str, Any]:
        """Evaluate now and return the record (also appended to :attr:`records`, the log and TensorBoard).

        ``extra`` fields (e.g. ``epoch=3``) are added to the record.
        """
        start = time.perf_counter()
        op = HessianOperator(self.model, self.loss_fn, self.data, params=self.params, bn_mode=self.bn_mode)
        with _training_state_guard(self.model, op.params):
            record = self._evaluate(op, int(step))
        del op  # drops the cached gradient graph
        record.update(extra)
        record["time_s"] = time.perf_counter() - start
        self.records.append(record)
        self._write(record)
        return record

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the JSONL file is flushed after every record)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "CurvatureMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- evaluation --------------------------------------------------------------------------------

    def _seed(self, step: int) -> int:
        # distinct base seeds per (seed, step); curvature_summary derives eigenvalues s, trace s+1,
        # density s+2 from it (the streams of the monitor's records since 0.1.0)
        return derive_seed(self.seed * 1_000_003, step * 7)

    def _evaluate(self, op: HessianOperator, step: int) -> Dict[str, Any]:
        summary = curvature_summary(
            op, k=self.k, tol=self.tol, max_matvecs=self.max_matvecs, trace_matvecs=self.trace_matvecs,
            density=self.density, density_steps=self.density_steps, density_runs=1,
            gradient_concentration=self.gradient_concentration, generator=self._seed(step))
        return {"step": step, **summary.to_dict()}

    # -- output ------------------------------------------------------------------------------------

    def _make_writer(self, tensorboard: Optional[bool], tensorboard_dir):
        if tensorboard is False:
            return None
        folder = tensorboard_dir
        if folder is None and self.log_path is not None:
            folder = self.log_path.parent / "tensorboard"
        if folder is None:
            if tensorboard:
                raise ValueError("tensorboard=True needs tensorboard_dir= or log_path=")
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            if tensorboard:
                raise ImportError("TensorBoard logging needs the tensorboard package: pip install hessopt[tensorboard]") from err
            return None
        return SummaryWriter(log_dir=str(folder))

    def _write(self, record: Dict[str, Any]) -> None:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step = record["step"]
            for i, v in enumerate(record["top_eigenvalues"]):
                self._writer.add_scalar(f"curvature/eigenvalue_{i + 1}", v, step)
            self._writer.add_scalar("curvature/trace", record["trace"], step)
            if "gradient_concentration" in record:
                self._writer.add_scalar("curvature/gradient_concentration", record["gradient_concentration"], step)
            self._writer.flush()


# --------------------------------------------------------------------------------------------------
# reading (plots of records: hessopt.analysis.plots.plot_curvature / plot_densities)


def read_jsonl(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-empty line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
