"""Fast paths behind the HVP core, each against the plain path (PyTorch's own kernels) in float64.

* BatchNorm (hessopt/_batchnorm.py): under ``second_order_safe()``, ``F.batch_norm`` runs PyTorch's
  fused kernels forward and first-order backward, and a closed-form double backward. The oracle is
  the same computation with the fast path off (``hessopt.hvp.fast_paths(batchnorm=False)``), i.e.
  PyTorch's ``batchnorm_double_backward``; Hessians are also checked against a dense Hessian of a
  written-out BatchNorm.
* ``hvp_from_grads`` seeds the backward with ``grad_outputs=v``: checked against a dot-product HVP.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessopt
from hessopt.hvp import fast_paths
from hessopt.operators import flatten

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close(a, b, rtol=1e-10, atol=1e-12):
    a = flatten(a) if isinstance(a, (list, tuple)) else a
    b = flatten(b) if isinstance(b, (list, tuple)) else b
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


class BNNet(nn.Module):
    """conv -> BN -> relu -> conv -> BN(affine=False) -> tanh, a residual add, BN1d on the features."""

    def __init__(self, dims=2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.conv1 = conv(2, 3, 3, padding=1)
        self.bn1 = bn(3)
        self.conv2 = conv(3, 3, 3, padding=1, bias=False)
        self.bn2 = bn(3, affine=False)
        self.fc = nn.Linear(3, 4)
        self.bn3 = nn.BatchNorm1d(4, momentum=None)  # cumulative average: momentum from Python
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = torch.tanh(self.bn2(self.conv2(h))) + h
        h = h.flatten(2).mean(-1)
        return self.out(torch.tanh(self.bn3(self.fc(h))) ** 2)


def _net(dims=2):
    torch.manual_seed(0)
    model = BNNet(dims).to(DT)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def _batch(dims=2, n=5, seed=0):
    g = _gen(seed)
    x = torch.randn((n, 2) + (4,) * dims, generator=g, dtype=DT) * 2 + 0.7
    return x, torch.randint(0, 2, (n,), generator=g)


def _hvp(model, x, y, v, fast, create_graph=False):
    params = list(model.parameters())
    with fast_paths(batchnorm=fast), hessopt.second_order_safe():
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v, create_graph=create_graph)
    return grads, hv


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batchnorm_hvp_matches_pytorch_double_backward(train, dims):
    x, y = _batch(dims)
    model = _net(dims).train(train)
    ref_model = copy.deepcopy(model)
    v = [torch.randn(p.shape, generator=_gen(1), dtype=DT) for p in model.parameters()]
    grads, hv = _hvp(model, x, y, v, fast=True)
    grads_ref, hv_ref = _hvp(ref_model, x, y, v, fast=False)
    _close(grads, grads_ref)
    _close(hv, hv_ref)
    assert flatten(hv).abs().max() > 1e-3  # a non-trivial product
    # running statistics and counters updated exactly as PyTorch's own path does
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref_model.named_buffers()):
        assert torch.equal(b, b_ref), name


def test_batchnorm_fast_path_is_used_and_cheaper():
    """The fast path records its own node, and its double backward runs far fewer kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    x, y = _batch(2)
    counts = {}
    for fast in (True, False):
        model = _net(2).train()
        params = list(model.parameters())
        v = [torch.ones_like(p) for p in params]
        with fast_paths(batchnorm=fast), hessopt.second_order_safe():
            out = model.bn1(model.conv1(x))
            assert ("_BatchNormBackward" in type(out.grad_fn).__name__) == fast
            grads = torch.autograd.grad(out.pow(2).sum(), params[:4], create_graph=True)
        Count.n = 0
        with Count():
            torch.autograd.grad(grads, params[:4], grad_outputs=v[:4])
        counts[fast] = Count.n
    assert counts[True] * 2 < counts[False], counts


def test_batchnorm_first_order_gradient_unchanged():
    """A plain backward under second_order_safe uses PyTorch's fused backward kernel: same gradient."""
    x, y = _batch(2)
    for train in (True, False):
        a, b = _net(2).train(train), _net(2).train(train)
        with hessopt.second_order_safe():
            F.cross_entropy(a(x), y).backward()
        F.cross_entropy(b(x), y).backward()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-13, atol=1e-15)


def test_batchnorm_hessian_matches_written_out_oracle(dense_hessian):
    """Train mode: the dense Hessian from fast HVPs equals torch.func.hessian of BatchNorm written
    out by hand (no running statistics); eval mode: equals torch.func.hessian of the model itself."""

    x, y = _batch(2, n=4)
    model = _net(2)
    for train in (True, False):
        model.train(train)
        snapshot = {k: b.clone() for k, b in model.named_buffers()}
        op = hessopt.HessianOperator(model, F.cross_entropy, (x, y), bn_mode="train" if train else "eval")
        dense = op.to_dense()
        ref = _explicit(model) if train else copy.deepcopy(model).eval()
        expected = dense_hessian(ref, lambda out: F.cross_entropy(out, y), x)
        _close(dense, expected, rtol=1e-9, atol=1e-11)
        for k, b in model.named_buffers():
            assert torch.equal(b, snapshot[k]), k


class Explicit(nn.Module):
    """BatchNorm written out in torch operations (batch or running statistics), no buffers updated."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, h):
        bn = self.bn
        dims = [0] + list(range(2, h.dim()))
        shape = (1, -1) + (1,) * (h.dim() - 2)
        if bn.training:
            var, mean = torch.var_mean(h, dims, correction=0, keepdim=True)
        else:
            var, mean = bn.running_var.view(shape), bn.running_mean.view(shape)
        out = (h - mean) / torch.sqrt(var + bn.eps)
        if bn.weight is not None:
            out = out * bn.weight.view(shape) + bn.bias.view(shape)
        return out


def _explicit(model):
    ref = copy.deepcopy(model)
    for name in ("bn1", "bn2", "bn3"):
        setattr(ref, name, Explicit(getattr(ref, name)))
    return ref


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_third_derivative(train):
    """A create_graph=True HVP through the fast node differentiates again exactly (PyTorch's own
    batch_norm has no third derivative: the oracle is BatchNorm written out)."""
    x, y = _batch(2, n=4)
    results = []
    for fast in (True, False):
        model = _net(2).train(train)
        if not fast:
            model = _explicit(model)
        params = list(model.parameters())
        v = [torch.randn(p.shape, generator=_gen(2), dtype=DT) for p in params]
        w = [torch.randn(p.shape, generator=_gen(3), dtype=DT) for p in params]
        _, hv = _hvp(model, x, y, v, fast=fast, create_graph=True)
        results.append(torch.autograd.grad(hv, params, grad_outputs=w))
    _close(results[0], results[1], rtol=1e-9, atol=1e-11)


def test_batchnorm_partial_requires_grad():
    """Frozen BatchNorm affine parameters, or an input that needs no gradient: still exact."""
    x, y = _batch(2)
    for freeze in ("bn1.weight", "bn1.bias", "conv1.weight"):
        hvs = []
        for fast in (True, False):
            model = _net(2).train()
            dict(model.named_parameters())[freeze].requires_grad_(False)
            if freeze == "conv1.weight":
                model.conv1.bias.requires_grad_(False)  # bn1's input needs no gradient at all
            params = [p for p in model.parameters() if p.requires_grad]
            v = [torch.randn(p.shape, generator=_gen(4), dtype=DT) for p in params]
            with fast_paths(batchnorm=fast), hessopt.second_order_safe():
                hvs.append(hessopt.hvp(lambda: F.cross_entropy(model(x), y), params, v))
        _close(hvs[0], hvs[1])


def test_batchnorm_direct_calls_are_routed():
    """torch.batch_norm and an F.batch_norm imported before the block are intercepted too."""
    from torch.nn.functional import batch_norm as imported_batch_norm

    x = torch.randn(4, 3, 5, generator=_gen(0), dtype=DT, requires_grad=True)
    w = torch.rand(3, generator=_gen(1), dtype=DT, requires_grad=True)
    b = torch.rand(3, generator=_gen(2), dtype=DT, requires_grad=True)
    for call in (lambda: torch.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, True),
                 lambda: imported_batch_norm(x, None, None, w, b, training=True)):
        with hessopt.second_order_safe():
            out = call()
        assert "_BatchNorm" in type(out.grad_fn).__name__
        out_ref = F.batch_norm(x, None, None, w, b, training=True)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)


def test_batchnorm_falls_back_where_not_covered():
    """bfloat16, no grad, or torch.func: PyTorch's own op, same result."""
    x = torch.randn(4, 3, 5, generator=_gen(0), requires_grad=True)
    with hessopt.second_order_safe():
        with torch.no_grad():
            out = F.batch_norm(x, None, None, training=True)
        assert out.grad_fn is None
        out = F.batch_norm(x.bfloat16(), None, None, training=True)
        assert "NativeBatchNorm" in type(out.grad_fn).__name__
        jac = torch.func.jacrev(lambda t: F.batch_norm(t, None, None, training=True).sum())(x.detach())
    torch.testing.assert_close(jac, torch.zeros_like(jac), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        with hessopt.second_order_safe():
            F.batch_norm(torch.randn(1, 3, requires_grad=True), None, None, training=True)


def test_hvp_from_grads_equals_dot_product_hvp():
    """Seeding with grad_outputs gives the gradient of <g, v>; unused parameters get zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    unused = nn.Parameter(torch.randn(2, dtype=DT))
    params = list(model.parameters()) + [unused]
    x = torch.randn(6, 3, dtype=DT)
    loss = model(x).pow(3).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    v = [torch.randn(p.shape, generator=_gen(5), dtype=DT) for p in params]
    hv = hessopt.hvp_from_grads(grads, params, v)
    dot = sum((g * u).sum() for g, u in zip(grads, v) if g is not None)
    expected = torch.autograd.grad(dot, params, allow_unused=True)
    _close(hv[:-1], expected[:-1])
    assert torch.equal(hv[-1], torch.zeros(2, dtype=DT))
