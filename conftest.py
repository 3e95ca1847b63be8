"""Doctest set-up for the ``>>>`` examples in hessopt's docstrings (``pytest --doctest-modules hessopt``).

The examples are written for a reader, with the names a reader has at hand (``model``, ``x``,
``y``, ``op``, ``loader``, ..., and hessopt's and hessopt.analysis's public names). :func:`_doctest_names` gives every doctest a fresh set of them, on a
tiny classifier, so each example runs exactly as printed; a few docstrings get their own names
(:data:`_PER_EXAMPLE`). Two rules:

* an example that shows its output is compared with it as usual;
* an example that shows no output (``hessopt.top_eigenvalues(op, k=5).eigenvalues``, a ``print``)
  is run, and must not raise, but what it prints is not compared: the values depend on the
  reader's model and data.

Each doctest runs in its own temporary folder (examples write ``runs/...`` files), with
matplotlib's non-interactive backend.
"""
from __future__ import annotations

import doctest
import importlib.util
import json
from collections import OrderedDict

import pytest

# modules that import an optional framework at import time (hessopt imports the others lazily)
collect_ignore = [] if importlib.util.find_spec("timm") else ["hessopt/integrations/timm/_lookahead.py"]

try:
    from _pytest.doctest import DoctestItem
except ImportError:  # pragma: no cover - pytest moved it
    DoctestItem = ()


class _ShownOutputOnly(doctest.OutputChecker):
    """Compare an example's output only where the docstring shows one (see the module docstring)."""

    def __init__(self, inner: doctest.OutputChecker):
        self.inner = inner

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return want == "" or self.inner.check_output(want, got, optionflags)

    def output_difference(self, example, got, optionflags):
        return self.inner.output_difference(example, got, optionflags)


def _names():
    import torch
    import torch.nn.functional as F
    from torch import nn

    import hessopt

    torch.manual_seed(0)

    def classifier():
        return nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act=nn.Tanh(), fc2=nn.Linear(8, 3)))

    model = classifier()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    op = hessopt.HessianOperator(model, loss_fn, (x, y))
    model_b = classifier()
    import hessopt.analysis

    public = {name: getattr(hessopt, name) for name in hessopt.__all__}  # what `from hessopt import *` gives
    public.update({name: getattr(hessopt.analysis, name) for name in getattr(hessopt.analysis, "__all__", ())})
    return dict(
        public,
        torch=torch, nn=nn, F=F, hessopt=hessopt, json=json,
        model=model, x=x, y=y, params=params, loader=loader, data=(x, y), loss=loss_fn,
        x_val=x, y_val=y, fc=model.fc1, op=op, vectors=[torch.randn_like(p) for p in params],
        criterion=loss_fn, transformer=model,
        model_seed0=model, model_seed1=model_b,
        op_a=op, op_b=hessopt.HessianOperator(model_b, loss_fn, (x, y)),
    )


def _transformer_names():
    """``second_order_safe``'s example: a model with attention (what the block is for)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    transformer = nn.Sequential(nn.Unflatten(1, (4, 1)), nn.Linear(1, 8), layer, nn.Flatten(), nn.Linear(32, 3))
    params = list(transformer.parameters())
    return dict(transformer=transformer, params=params, vectors=[torch.randn_like(p) for p in params])


# doctest name (module.object) -> extra names for that example only
_PER_EXAMPLE = {
    "hessopt.hvp.second_order_safe": _transformer_names,
}


@pytest.fixture(autouse=True)
def _doctest_names(request):
    """Fresh names, a temporary working folder and output rule for every doctest; nothing for other tests."""
    item = request.node
    if not (DoctestItem and isinstance(item, DoctestItem)):
        yield
        return
    tmp_path, monkeypatch = request.getfixturevalue("tmp_path"), request.getfixturevalue("monkeypatch")
    import matplotlib
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared
    namespace = request.getfixturevalue("doctest_namespace")
    namespace.clear()
    namespace.update(_names(), plt=plt)
    extra = _PER_EXAMPLE.get(item.dtest.name)
    if extra is not None:
        namespace.update(extra())
    runner = item.runner
    if not isinstance(runner._checker, _ShownOutputOnly):  # doctest.DocTestRunner keeps its checker there
        runner._checker = _ShownOutputOnly(runner._checker)
    yield
    plt.close("all")
    torch.set_num_threads(threads)
