"""Fast paths behind the HVP core, each against the plain path (PyTorch's own kernels) in float64.

* BatchNorm (hessopt/_batchnorm.py): under ``second_order_safe()``, ``F.batch_norm`` runs PyTorch's
  fused kernels forward and first-order backward, and a closed-form double backward. The oracle is
  the same computation with the fast paths off (``hessopt.hvp.fast_paths(batchnorm=False, ...)``),
  i.e. PyTorch's ``batchnorm_double_backward``; Hessians are also checked against a dense Hessian
  of a written-out BatchNorm.
* Convolutions (hessopt/_conv.py) and ReLU (hessopt/_relu.py), likewise against PyTorch's own
  double backward, over strides, paddings, dilations, groups and dimensionalities.
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


def _all(fast):
    """All fast paths on (True) or off (False)."""
    return fast_paths(batchnorm=fast, conv=fast, relu=fast)


def _hvp(model, x, y, v, fast, create_graph=False):
    params = list(model.parameters())
    with _all(fast), hessopt.second_order_safe():
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
        with _all(fast):
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
            with _all(fast):
                hvs.append(hessopt.hvp(lambda: F.cross_entropy(model(x), y), params, v))
        _close(hvs[0], hvs[1])


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("missing", [(), ("c_w",), ("c_b",), ("c_w", "c_b")])
def test_batchnorm_multi_tensor_double_backward_equals_reference(affine, missing):
    """The batched per-channel arithmetic gives the plain-op formula's values."""
    from hessopt import _batchnorm as bn

    g = _gen(7)
    x, grad_out, a = (torch.randn(4, 3, 2, 5, generator=g, dtype=DT) for _ in range(3))
    weight = torch.rand(3, generator=g, dtype=DT) + 0.5 if affine else None
    var, mu = torch.var_mean(x, [0, 2, 3], correction=0)
    r = torch.rsqrt(var + 1e-5)
    x_hat = (x - mu.view(1, 3, 1, 1)) * r.view(1, 3, 1, 1)
    g1, g2 = grad_out.sum([0, 2, 3]), (grad_out * x_hat).sum([0, 2, 3])
    cot = {"c_w": torch.randn(3, generator=g, dtype=DT), "c_b": torch.randn(3, generator=g, dtype=DT)}
    c_w, c_b = (None if k in missing else cot[k] for k in ("c_w", "c_b"))
    need = (True, True, True)
    expected = bn._train_vjp(x, weight, grad_out, a, c_w, c_b, mu, r, g1, g2, need)
    actual = bn._train_vjp_multi_tensor(x, weight, grad_out, a, c_w, c_b, mu, r, g1, g2, need)
    for e, got in zip(expected, actual):
        assert (e is None) == (got is None)
        if e is not None:
            _close(got, e, rtol=1e-12, atol=1e-13)


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


# ---------------------------------------------------------------------------------------------
# Convolutions and ReLU
# ---------------------------------------------------------------------------------------------

CONV_CASES = [
    # dims, in, out, kernel, keyword arguments, input size
    (2, 3, 4, 3, dict(padding=1), 6),
    (2, 4, 6, 3, dict(stride=2, padding=1, groups=2, bias=False), 7),  # output size does not divide
    (2, 4, 4, 3, dict(padding=(2, 1), dilation=(2, 1), groups=4), 6),  # depthwise, dilated
    (2, 3, 5, 1, dict(stride=2), 5),
    (2, 3, 2, (2, 3), dict(padding="valid"), 5),
    (1, 3, 4, 3, dict(stride=2, padding=2), 9),
    (3, 2, 3, 2, dict(padding=1), 4),
]


class ConvNet(nn.Module):
    def __init__(self, dims, cin, cout, kernel, options):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.stem = conv(2, cin, 1)
        self.conv = conv(cin, cout, kernel, **options)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        h = F.relu(self.stem(x), inplace=True)  # in place, like nn.ReLU(inplace=True)
        h = torch.tanh(self.conv(h))
        return self.fc(h.flatten(1) ** 2)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}d-{c[4]}")
def test_conv_hvp_matches_pytorch_double_backward(case):
    dims, cin, cout, kernel, options, size = case
    x = torch.randn((3, 2) + (size,) * dims, generator=_gen(0), dtype=DT)
    y = torch.tensor([0, 2, 1])
    torch.manual_seed(0)
    model = ConvNet(dims, cin, cout, kernel, options).to(DT)
    model(x)  # materialize the lazy layer
    v = [torch.randn(p.shape, generator=_gen(1), dtype=DT) for p in model.parameters()]
    results = {}
    for fast in (True, False):
        grads, hv = _hvp(model, x, y, v, fast=fast)
        with _all(fast), hessopt.second_order_safe():
            out = model.conv(model.stem(x))
        assert ("_ConvBackward" in type(out.grad_fn).__name__) == fast
        results[fast] = (grads, hv)
    _close(results[True][0], results[False][0])
    _close(results[True][1], results[False][1])
    assert flatten(results[True][1]).abs().max() > 1e-3


def test_conv_and_relu_third_derivative_and_partial_grads():
    """create_graph=True HVPs differentiate again exactly; frozen weights or inputs work."""
    x = torch.randn(3, 2, 6, 6, generator=_gen(0), dtype=DT)
    y = torch.tensor([0, 2, 1])
    for frozen in (None, "stem.weight", "conv.weight", "conv.bias"):
        results = []
        for fast in (True, False):
            torch.manual_seed(0)
            model = ConvNet(2, 3, 4, 3, dict(padding=1, stride=2)).to(DT)
            model(x)
            if frozen:
                dict(model.named_parameters())[frozen].requires_grad_(False)
            params = [p for p in model.parameters() if p.requires_grad]
            v = [torch.randn(p.shape, generator=_gen(2), dtype=DT) for p in params]
            w = [torch.randn(p.shape, generator=_gen(3), dtype=DT) for p in params]
            with _all(fast), hessopt.second_order_safe():
                loss = F.cross_entropy(model(x), y)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                hv = torch.autograd.grad(grads, params, grad_outputs=v, create_graph=True)
                third = torch.autograd.grad(hv, params, grad_outputs=w, allow_unused=True)
            results.append((hv, [torch.zeros_like(p) if t is None else t for p, t in zip(params, third)]))
        _close(results[0][0], results[1][0])
        _close(results[0][1], results[1][1], rtol=1e-9, atol=1e-11)


def test_relu_fast_path_is_exact_and_routes_every_spelling():
    """F.relu (in place or not), torch.relu(_), Tensor.relu(_): same values and HVPs, bit for bit;
    the graph-building backward no longer depends on the ReLU output."""
    base = torch.randn(4, 5, generator=_gen(0), dtype=DT)
    w = torch.randn(5, 5, generator=_gen(1), dtype=DT, requires_grad=True)
    v = torch.randn(5, 5, generator=_gen(2), dtype=DT)
    spellings = [
        lambda h: F.relu(h), lambda h: F.relu(h, inplace=True), lambda h: torch.relu(h),
        lambda h: torch.relu_(h), lambda h: h.relu(), lambda h: h.relu_(), lambda h: nn.ReLU(inplace=True)(h),
    ]
    for act in spellings:
        results = []
        for fast in (True, False):
            with _all(fast), hessopt.second_order_safe():
                out = act(base @ w)
                assert ("_ReLU" in type(out.grad_fn).__name__) == fast
                g = torch.autograd.grad((out ** 3).sum(), w, create_graph=True)[0]
                results.append((out, g, torch.autograd.grad(g, w, grad_outputs=v)[0]))
        for a, b in zip(*results):
            assert torch.equal(a, b)


def test_all_fast_paths_in_a_resnet_against_a_dense_hessian(dense_hessian):
    """A residual CNN (conv-BN-ReLU blocks, strided convolution, eval mode): the Hessian from HVPs
    with every fast path on equals torch.func.hessian of the plain model."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(inplace=True),
        nn.Conv2d(2, 2, 3, stride=2, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3),
    ).to(DT)
    x = torch.randn(4, 1, 5, 5, generator=_gen(0), dtype=DT)
    y = torch.tensor([0, 1, 2, 1])
    model.train()
    model(x)  # non-trivial running statistics
    model.eval()
    op = hessopt.HessianOperator(model, F.cross_entropy, (x, y))
    _close(op.to_dense(), dense_hessian(model, lambda out: F.cross_entropy(out, y), x), rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------
# AdaHessian's multi-tensor bookkeeping
# ---------------------------------------------------------------------------------------------


def test_adahessian_multi_tensor_path_matches_reference_loop():
    """foreach=True (multi-tensor finiteness check, |d|, averaging, second moments) equals the
    per-tensor reference loop bit for bit on CPU: conv kernels (spatial averaging), 2-D weights
    (block averaging), biases, and a non-finite estimate that must be skipped and counted."""

    def curvature_with_a_nan(inner):
        calls = {"n": 0}

        def source(params, grads, generators):
            out = inner(params, grads, generators)
            calls["n"] += 1
            if calls["n"] == 2:
                out[0] = out[0].clone()
                out[0].view(-1)[0] = float("nan")
            return out

        return source

    from hessopt.optim import Hutchinson

    runs = []
    for foreach in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
        x, y = torch.randn(6, 2, 4, 4, generator=_gen(0), dtype=DT), torch.tensor([0, 1, 1, 0, 1, 0])
        opt = hessopt.AdaHessian(model.parameters(), lr=0.05, block_length=2, foreach=foreach,
                                 curvature=curvature_with_a_nan(Hutchinson(2)))
        with pytest.warns(RuntimeWarning, match="not finite"):
            for _ in range(4):
                def closure():
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
        runs.append((model, opt))
    (m0, o0), (m1, o1) = runs
    for p, q in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(p, q)
        s0, s1 = o0.state[p], o1.state[q]
        assert torch.equal(s0["exp_hessian_diag_sq"], s1["exp_hessian_diag_sq"])
        assert (s0["curvature_updates"], s0["nonfinite_curvature"]) == (s1["curvature_updates"], s1["nonfinite_curvature"])
    first = next(m0.parameters())
    assert o0.state[first]["nonfinite_curvature"] == 1 and o0.state[first]["curvature_updates"] == 3


def test_finite_flags():
    from hessopt.optim._multi_tensor import finite_flags

    big = torch.full((100,), 60000.0, dtype=torch.float16)  # finite, but its norm overflows float16
    bad = torch.tensor([1.0, float("inf")])
    nan = torch.tensor([[float("nan")]], dtype=DT)
    assert finite_flags([big, bad, nan, torch.zeros(3), torch.ones(())]) == [True, False, False, True, True]
    assert finite_flags([]) == []


# ---------------------------------------------------------------------------------------------
# Forward-over-reverse products (HessianOperator(method="forward_over_reverse"))
# ---------------------------------------------------------------------------------------------


def _tiny_gpt():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.gpt import GPT, lm_loss

    torch.manual_seed(0)
    model = GPT(vocab_size=11, d_model=8, n_layers=2, n_heads=2, max_len=6).to(DT)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(torch.randn(p.shape, generator=_gen(9), dtype=DT) * 0.3)
    tokens = torch.randint(0, 11, (3, 7), generator=_gen(0))
    return model, lm_loss, (tokens[:, :-1], tokens[:, 1:])


def _for_cases():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4),
                        nn.Tanh(), nn.Conv2d(4, 4, 1), nn.InstanceNorm2d(4, affine=True), nn.Flatten(),
                        nn.Linear(16, 3)).to(DT)
    cnn.train()
    g = _gen(0)
    x = torch.randn(8, 2, 4, 4, generator=g, dtype=DT)
    cnn(x)  # running statistics
    labels = torch.randint(0, 3, (8,), generator=g)
    batches = [(x[:5], labels[:5]), (x[5:], labels[5:])]  # unequal batches: weighted average
    return {"cnn": (cnn, F.cross_entropy, batches), "gpt": _tiny_gpt()}


@pytest.mark.parametrize("case,bn_mode", [("cnn", "eval"), ("cnn", "train"), ("gpt", "eval")])
def test_forward_over_reverse_operator_matches_reverse(case, bn_mode, snapshot, assert_unchanged):
    """BatchNorm (batch and running statistics), GroupNorm, InstanceNorm, LayerNorm, attention
    with PyTorch's default kernel: forward-over-reverse equals the double backward."""
    model, loss_fn, data = _for_cases()[case]
    before = snapshot(model)
    ops = {m: hessopt.HessianOperator(model, loss_fn, data, bn_mode=bn_mode, method=m)
           for m in ("reverse", "forward_over_reverse")}
    v = torch.randn(ops["reverse"].num_params, 2, generator=_gen(3), dtype=DT)
    expected = ops["reverse"] @ v
    _close(ops["forward_over_reverse"] @ v, expected)
    assert expected.abs().max() > 1e-3
    assert_unchanged(model, before)
    assert ops["forward_over_reverse"].cache_graph is False


def test_forward_over_reverse_bad_input():
    torch.manual_seed(0)
    x, y = torch.randn(4, 2, 3, 3, dtype=DT), torch.tensor([0, 1, 0, 1])
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Flatten(), nn.Linear(18, 2)).to(DT)
    extra = torch.zeros(2, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="not parameters of the model"):
        hessopt.HessianOperator(model, F.cross_entropy, (x, y), params=[model[0].weight, extra],
                                method="forward_over_reverse")
    with pytest.raises(ValueError, match="method must be one of"):
        hessopt.HessianOperator(model, F.cross_entropy, (x, y), method="forward")
    op = hessopt.HessianOperator(model, lambda out, t: F.cross_entropy(out, t, reduction="none"), (x, y),
                                 method="forward_over_reverse")
    with pytest.raises(ValueError, match="scalar mean loss"):
        op @ torch.zeros(op.num_params, dtype=DT)


# ---------------------------------------------------------------------------------------------
# Memory: nothing of hessopt keeps a graph alive after a step or a fresh product
# ---------------------------------------------------------------------------------------------


class _WatchActivation(nn.Module):
    """tanh that keeps a weak reference to its output: an activation every graph here saves."""

    def forward(self, h):
        out = torch.tanh(h)
        self.ref = __import__("weakref").ref(out)
        return out


def _watched_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), _WatchActivation(), nn.Flatten(),
                         nn.Linear(12, 2)).to(DT)


@pytest.mark.parametrize("n_samples", [1, 3])
def test_adahessian_step_frees_the_graph(n_samples):
    model = _watched_model()
    x, y = torch.randn(4, 2, 4, 4, generator=_gen(0), dtype=DT), torch.tensor([0, 1, 1, 0])
    opt = hessopt.AdaHessian(model.parameters(), n_samples=n_samples)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.grad_fn is None
    assert model[3].ref() is None, "the forward graph (and its saved activations) outlived the step"
    assert all(not p.grad.requires_grad for p in model.parameters())


def test_fresh_operator_product_frees_the_graph():
    model = _watched_model()
    x, y = torch.randn(4, 2, 4, 4, generator=_gen(0), dtype=DT), torch.tensor([0, 1, 1, 0])
    for method in ("reverse", "forward_over_reverse"):
        op = hessopt.HessianOperator(model, F.cross_entropy, [(x, y)], bn_mode="train", method=method)
        op @ torch.ones(op.num_params, dtype=DT)
        assert model[3].ref() is None, method


def test_profile_script_smoke(tmp_path):
    """benchmarks/profile_hvp.py runs end to end on CPU (toy size, two contenders) and writes its files."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import profile_hvp

    out = tmp_path / "prof"
    profile_hvp.main(["--device", "cpu", "--quick", "--workloads", "cifar_resnet20_b128", "--repeats", "1",
                      "--warmup", "0", "--methods", "hessopt_hvp,adahessian_step", "--out", str(out),
                      "--profile-rows", "5"])
    data = json.loads((out / "profile_hvp.json").read_text())
    rec = data["workloads"]["cifar_resnet20_b128_quick"]
    assert rec["times"]["hessopt_hvp"]["error"] is None and rec["times"]["hessopt_hvp"]["median_ms"] > 0
    assert rec["times"]["adahessian_step"]["ratio_to_adamw"] > 0
    assert rec["exactness"]["hessopt_hvp_vs_plain"] < 1e-4
    assert rec["exactness"]["forward_over_reverse_vs_reverse_operator"] < 1e-4
    assert "hessopt_hvp" in rec["profiles"] and (out / "profile_hvp.txt").exists()
