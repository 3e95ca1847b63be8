"""Shared test helpers: small, generic, float64 oracles. Add fixtures here only if several files use them.

Helpers are handed out as fixtures (``def test_x(dense_hessian): ...``) rather than imported, so the
suite works whatever pytest's import mode.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
from torch import nn
from torch.func import functional_call


def _dense_hessian(
    model: nn.Module,
    loss_of_outputs: Callable[[torch.Tensor], torch.Tensor],
    inputs,
    names: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """Oracle: the ``(n, n)`` Hessian of ``loss_of_outputs(model(inputs))`` by ``torch.func.hessian``.

    ``names`` (default: all parameters that require grad, in ``named_parameters`` order) picks the
    parameters and their order; the others are held fixed. The model is called with
    ``functional_call``, so it must not update buffers in place (use eval mode, or a model without
    running statistics).
    """
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad] if names is None else list(names)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    fixed.update(dict(model.named_buffers()))

    def loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = [c.view(s) for c, s in zip(flat.split(sizes), shapes)]
        return loss_of_outputs(functional_call(model, {**fixed, **dict(zip(names, chunks))}, (inputs,)))

    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    return torch.func.hessian(loss)(flat0)


def _snapshot(model: nn.Module) -> Dict[str, object]:
    """Everything a Hessian computation must leave alone: values, buffer versions, train flags."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "buffer_versions": {n: b._version for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }


def _assert_unchanged(model: nn.Module, before: Dict[str, object]) -> None:
    """Assert that ``model`` is bit-identical to the :func:`_snapshot` ``before``."""
    after = _snapshot(model)
    assert after["training"] == before["training"], "train/eval flags changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["buffer_versions"] == before["buffer_versions"], "a buffer was written in place"
    for key in ("params", "buffers", "grads"):
        assert after[key].keys() == before[key].keys()
        for name, value in before[key].items():
            other = after[key][name]
            assert (value is None) == (other is None), f"{key}[{name}] appeared or vanished"
            if value is not None:
                assert torch.equal(value, other), f"{key}[{name}] changed"


def _offsets(params: Sequence[torch.Tensor]) -> List[int]:
    """Offsets of each tensor in the flat vector: ``[0, n_0, n_0 + n_1, ...]``."""
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    return offsets


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Run the whole suite on one intra-op thread (restored afterwards).

    The tests use tiny models, which make thousands of small BLAS/LAPACK calls; with 2 OpenMP
    threads on a busy 2-core machine each can take milliseconds of spin-waiting instead of
    microseconds (observed: 6 minutes instead of 50 s for the recipe tests). Subprocesses that a
    test starts set OMP_NUM_THREADS themselves.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dense_hessian():
    """The :func:`_dense_hessian` oracle (``torch.func.hessian`` over ``functional_call``)."""
    return _dense_hessian


@pytest.fixture
def snapshot():
    """:func:`_snapshot`: record a model's parameters, buffers (and versions), grads and flags."""
    return _snapshot


@pytest.fixture
def assert_unchanged():
    """:func:`_assert_unchanged`: compare a model with a :func:`_snapshot`, bit for bit."""
    return _assert_unchanged


@pytest.fixture
def offsets():
    """:func:`_offsets`: start of each tensor in a flat vector."""
    return _offsets
