"""The HVP core (hessopt/hvp.py) against dense and closed-form Hessians, in float64 on tiny models.

Oracles: ``torch.func.hessian`` over ``functional_call`` (conftest ``dense_hessian``); for attention,
a plain double backward run with PyTorch's composite "math" kernel forced by ``sdpa_kernel``; for
BatchNorm in train mode, a copy of the model without running statistics (``torch.func.hessian``
mis-handles the in-place running-stat update); closed forms for linear and logistic regression.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention  # imported directly on purpose

import hessopt
from hessopt.operators import flatten

DT = torch.float64
FLASH_ERROR = "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _random_like(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def _plain_hvp(loss, params, vectors):
    """Reference HVP by a plain double backward (no hessopt code involved)."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vectors)), params)


def _plain_dense_hessian(loss, params):
    """Reference Hessian, row by row, by plain double backward (no hessopt, no torch.func)."""
    grads = flatten(torch.autograd.grad(loss, params, create_graph=True))
    rows = []
    for g in grads:
        row = torch.autograd.grad(g, params, retain_graph=True, allow_unused=True)
        rows.append(flatten([torch.zeros_like(p) if r is None else r for p, r in zip(params, row)]))
    return torch.stack(rows)


def _assert_close(actual, expected, rtol=1e-10, atol=1e-12):
    actual = flatten(actual) if isinstance(actual, (list, tuple)) else actual
    expected = flatten(expected) if isinstance(expected, (list, tuple)) else expected
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


class SmallCNN(nn.Module):
    """conv -> BatchNorm -> tanh -> 2x2 average pool -> linear (89 parameters)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        h = F.avg_pool2d(torch.tanh(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1))


def _cnn():
    torch.manual_seed(0)
    model = SmallCNN().to(DT)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model


class ExplicitBatchNorm2d(nn.Module):
    """Train-mode BatchNorm written out (batch mean and biased variance), same parameter names."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, h):
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _train_mode_reference(model):
    """A copy of the CNN whose BatchNorm uses batch statistics, written out, with no buffers.

    The usual oracle, ``F.batch_norm(x, None, None, w, b, training=True)`` (or
    ``track_running_stats=False``) under ``torch.func.hessian``, is itself wrong on torch 2.14
    (pytorch#196699): its (bn.weight, conv.bias) block is non-zero and the matrix is not symmetric, while finite
    differences, a plain double backward and this explicit formula agree (conv.bias is cancelled by
    the batch mean, so its rows must be zero; see test_train_mode_oracle_sanity).
    """
    ref = copy.deepcopy(model)
    ref.bn = ExplicitBatchNorm2d(ref.bn)
    return ref.train()


def _encoder():
    """``nn.TransformerEncoderLayer`` with default settings, only small (172 parameters)."""
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True).to(DT)


class DirectSDPA(nn.Module):
    """Attention calling the directly imported ``scaled_dot_product_attention`` with ``options``."""

    def __init__(self, d=4, q_heads=2, kv_heads=2, head_dim=2, **options):
        super().__init__()
        self.shape = (q_heads, kv_heads, head_dim)
        self.q = nn.Linear(d, q_heads * head_dim)
        self.k = nn.Linear(d, kv_heads * head_dim)
        self.v = nn.Linear(d, kv_heads * head_dim)
        self.o = nn.Linear(q_heads * head_dim, d)
        self.options = options

    def forward(self, x):
        (b, t, _), (hq, hkv, dh) = x.shape, self.shape
        q = self.q(x).view(b, t, hq, dh).transpose(1, 2)
        k = self.k(x).view(b, t, hkv, dh).transpose(1, 2)
        v = self.v(x).view(b, t, hkv, dh).transpose(1, 2)
        out = scaled_dot_product_attention(q, k, v, **self.options)
        return self.o(out.transpose(1, 2).reshape(b, t, hq * dh))


def _bool_mask(t=5):
    mask = _randn(t, t, seed=3) > 0
    mask[:, 0] = True  # every query sees at least one key (no all-masked row, which gives NaN)
    return mask


SDPA_CASES = {
    "is_causal": dict(is_causal=True),
    "float_mask": dict(attn_mask=_randn(5, 5, seed=2)),
    "bool_mask": dict(attn_mask=_bool_mask()),
    "enable_gqa": dict(q_heads=4, kv_heads=2, enable_gqa=True),
    "scale": dict(scale=0.3, is_causal=True),
    # dropout_p > 0 takes the all-math branch; p = 1e-12 keeps every entry (scale 1 + 1e-12)
    "dropout_branch_bool_mask": dict(attn_mask=_bool_mask(), dropout_p=1e-12),
}


# ---------------------------------------------------------------------------------------------
# Dense oracles
# ---------------------------------------------------------------------------------------------


def test_mlp_hvp_matches_dense_hessian(dense_hessian):
    model, x, y = _mlp(), _randn(8, 4), torch.arange(8) % 3
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    params = list(model.parameters())
    v = _random_like(params)
    hv = hessopt.hvp(lambda: F.cross_entropy(model(x), y), params, v)
    assert [h.shape for h in hv] == [p.shape for p in params]
    _assert_close(hv, H @ flatten(v))
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    _assert_close(op.to_dense(), H)


def test_cnn_batchnorm_eval_mode_matches_dense_hessian(dense_hessian):
    model, x, y = _cnn().eval(), _randn(6, 2, 4, 4), torch.arange(6) % 2
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), bn_mode="eval")
    _assert_close(op.to_dense(), H)
    params = list(model.parameters())
    v = _random_like(params)
    _assert_close(hessopt.hvp(lambda: F.cross_entropy(model(x), y), params, v), H @ flatten(v))


def test_cnn_batchnorm_train_mode_matches_reference_without_running_stats(dense_hessian):
    model, x, y = _cnn(), _randn(6, 2, 4, 4), torch.arange(6) % 2
    ref = _train_mode_reference(model)
    H_train = dense_hessian(ref, lambda out: F.cross_entropy(out, y), x)
    op = hessopt.HessianOperator(model.eval(), nn.CrossEntropyLoss(), (x, y), bn_mode="train")
    _assert_close(op.to_dense(), H_train)
    # the two modes really are different Hessians (the test would be vacuous otherwise)
    H_eval = dense_hessian(model.eval(), lambda out: F.cross_entropy(out, y), x)
    assert (H_train - H_eval).abs().max() > 1e-3
    params = list(ref.parameters())
    v = _random_like(params)
    _assert_close(hessopt.hvp(lambda: F.cross_entropy(ref(x), y), params, v), H_train @ flatten(v))


def test_train_mode_oracle_sanity(dense_hessian):
    """The explicit-formula oracle is symmetric, and conv.bias (cancelled by the batch mean) has zero rows."""
    model, x, y = _cnn(), _randn(6, 2, 4, 4), torch.arange(6) % 2
    H = dense_hessian(_train_mode_reference(model), lambda out: F.cross_entropy(out, y), x)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-14)
    conv_bias = slice(54, 57)  # conv.weight has 2*3*3*3 = 54 entries
    assert H[conv_bias].abs().max() < 1e-14


# ---------------------------------------------------------------------------------------------
# Attention: fused kernels have no double backward; second_order_safe() routes around it
# ---------------------------------------------------------------------------------------------


def test_plain_double_backward_through_transformer_fails_on_this_torch():
    layer, x = _encoder(), _randn(2, 5, 4)
    params = list(layer.parameters())
    with pytest.raises(RuntimeError, match=FLASH_ERROR):
        _plain_hvp(layer(x).pow(2).mean(), params, _random_like(params))


def test_transformer_hvp_and_operator_match_math_kernel_reference():
    """The dense reference is a plain double backward with the math kernel forced: torch.func.hessian
    is not an oracle here, its LayerNorm second derivatives are wrong on torch 2.14 (pytorch#196700)."""
    layer, x = _encoder(), _randn(2, 5, 4)
    target = _randn(2, 5, 4, seed=4)
    params = list(layer.parameters())
    v = _random_like(params)
    hv = hessopt.hvp(lambda: F.mse_loss(layer(x), target), params, v)
    with sdpa_kernel(SDPBackend.MATH):
        expected = _plain_hvp(F.mse_loss(layer(x), target), params, v)
        H = _plain_dense_hessian(F.mse_loss(layer(x), target), params)
    _assert_close(hv, expected)
    op = hessopt.HessianOperator(layer, nn.MSELoss(), (x, target))
    _assert_close(op @ flatten(v), flatten(expected))
    _assert_close(op.to_dense(), H)


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_directly_imported_sdpa_hvp_matches_math_kernel(case):
    torch.manual_seed(0)
    model = DirectSDPA(**SDPA_CASES[case]).to(DT)
    x, target = _randn(2, 5, 4), _randn(2, 5, 4, seed=4)
    params = list(model.parameters())
    v = _random_like(params)
    if "dropout_p" not in SDPA_CASES[case]:  # the CPU flash kernel has no dropout: math already
        with pytest.raises(RuntimeError, match=FLASH_ERROR):  # this case needs the fix
            _plain_hvp(F.mse_loss(model(x), target), params, v)
    hv = hessopt.hvp(lambda: F.mse_loss(model(x), target), params, v)
    with sdpa_kernel(SDPBackend.MATH):
        expected = _plain_hvp(F.mse_loss(model(x), target), params, v)
    _assert_close(hv, expected)


def test_learned_float_mask_gets_its_own_curvature():
    """A mask that is a parameter (relative position bias) is differentiated twice as well."""

    class RelativeBias(DirectSDPA):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(0.5 * torch.randn(2, 5, 5))

        def forward(self, x):
            self.options = dict(attn_mask=self.bias)
            return super().forward(x)

    torch.manual_seed(0)
    model = RelativeBias().to(DT)
    x, target = _randn(2, 5, 4), _randn(2, 5, 4, seed=4)
    params = list(model.parameters())
    v = _random_like(params)
    hv = hessopt.hvp(lambda: F.mse_loss(model(x), target), params, v)
    with sdpa_kernel(SDPBackend.MATH):
        expected = _plain_hvp(F.mse_loss(model(x), target), params, v)
    _assert_close(hv, expected)
    assert hv[-1].abs().max() > 1e-3  # the bias block is not trivially zero


def test_multihead_attention_need_weights_false():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).to(DT)
    x, target = _randn(2, 5, 4), _randn(2, 5, 4, seed=4)
    params = list(mha.parameters())
    v = _random_like(params)

    def loss():
        return F.mse_loss(mha(x, x, x, need_weights=False)[0], target)

    with pytest.raises(RuntimeError, match=FLASH_ERROR):
        _plain_hvp(loss(), params, v)
    hv = hessopt.hvp(loss, params, v)
    with sdpa_kernel(SDPBackend.MATH):
        expected = _plain_hvp(loss(), params, v)
    _assert_close(hv, expected)


def test_first_order_gradients_inside_second_order_safe_equal_those_outside():
    layer, x = _encoder(), _randn(2, 5, 4)
    params = list(layer.parameters())
    outside = torch.autograd.grad(layer(x).pow(2).mean(), params)
    with hessopt.second_order_safe():
        inside = torch.autograd.grad(layer(x).pow(2).mean(), params)
        with_graph = torch.autograd.grad(layer(x).pow(2).mean(), params, create_graph=True)
    _assert_close(inside, outside, rtol=1e-13, atol=1e-15)
    _assert_close([g.detach() for g in with_graph], outside, rtol=1e-12, atol=1e-14)
    # the patch is gone after the block
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


def test_second_order_safe_is_reentrant_and_restores_on_error():
    with pytest.raises(KeyError):
        with hessopt.second_order_safe():
            with hessopt.second_order_safe():
                assert F.scaled_dot_product_attention is not torch._C._nn.scaled_dot_product_attention
            assert F.scaled_dot_product_attention is not torch._C._nn.scaled_dot_product_attention
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


# ---------------------------------------------------------------------------------------------
# Parameters without curvature
# ---------------------------------------------------------------------------------------------


class WithIdleParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 2)  # never called
        self.offset = nn.Parameter(torch.tensor(0.5))  # enters the loss linearly: zero curvature

    def forward(self, x):
        return self.used(x)


def test_parameters_that_do_not_affect_the_loss_get_a_zero_block(dense_hessian):
    torch.manual_seed(0)
    model, x, y = WithIdleParameters().to(DT), _randn(5, 3), torch.arange(5) % 2
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def loss_of(out):
        return F.cross_entropy(out, y) + 2.0 * model.offset

    v = _random_like(params)
    hv = hessopt.hvp(lambda: loss_of(model(x)), params, v)
    for name, block in zip(names, hv):
        if not name.startswith("used"):
            assert torch.equal(block, torch.zeros_like(block)), name
    op = hessopt.HessianOperator(model, lambda out, t: loss_of(out), (x, y))
    H = op.to_dense()
    idle = torch.cat([torch.full((p.numel(),), not n.startswith("used")) for n, p in zip(names, params)])
    assert torch.equal(H[idle], torch.zeros_like(H[idle])) and torch.equal(H[:, idle], torch.zeros_like(H[:, idle]))
    # functional_call substitutes parameters, so the oracle cannot see model.offset: compare the block
    used = dense_hessian(model, lambda out: F.cross_entropy(out, y), x, names=["used.weight", "used.bias"])
    _assert_close(H[~idle][:, ~idle], used)


def test_a_loss_with_zero_curvature_gives_zeros_not_an_error():
    w = nn.Parameter(_randn(3))
    x = _randn(3, seed=1)
    hv = hessopt.hvp(lambda: (w * x).sum(), [w], [torch.ones(3, dtype=DT)])
    assert torch.equal(hv[0], torch.zeros(3, dtype=DT))
    model = nn.Linear(3, 1).to(DT)
    op = hessopt.HessianOperator(model, lambda out, t: out.mean(), (_randn(4, 3), torch.zeros(4)))
    assert torch.equal(op.to_dense(), torch.zeros(4, 4, dtype=DT))


def test_hvp_from_grads_without_a_graph_says_what_to_do():
    w = nn.Parameter(_randn(3))
    grads = torch.autograd.grad((w ** 3).sum(), [w])  # no create_graph
    with pytest.raises(ValueError, match="create_graph=True"):
        hessopt.hvp_from_grads(grads, [w], [torch.ones(3, dtype=DT)])


def test_hvp_from_grads_matches_hvp():
    model, x, y = _mlp(), _randn(8, 4), torch.arange(8) % 3
    params = list(model.parameters())
    v = _random_like(params)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    first = hessopt.hvp_from_grads(grads, params, v)  # retain_graph=True by default: reusable
    second = hessopt.hvp_from_grads(grads, params, v, retain_graph=False)
    _assert_close(first, second, rtol=0, atol=0)
    _assert_close(first, hessopt.hvp(lambda: F.cross_entropy(model(x), y), params, v))


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


def test_linear_regression_mse_hessian_is_two_over_n_xtx():
    n, d = 16, 3
    X, y = _randn(n, d), _randn(n, 1, seed=1)
    torch.manual_seed(0)
    model = nn.Linear(d, 1).to(DT)
    X1 = torch.cat([X, torch.ones(n, 1, dtype=DT)], dim=1)  # the bias is a weight on a constant 1
    op = hessopt.HessianOperator(model, nn.MSELoss(), (X, y))
    _assert_close(op.to_dense(), 2.0 / n * X1.T @ X1)
    v = _random_like(list(model.parameters()))
    hv = hessopt.hvp(lambda: F.mse_loss(model(X), y), list(model.parameters()), v)
    _assert_close(hv, 2.0 / n * X1.T @ (X1 @ flatten(v)))


def test_logistic_regression_hessian_is_xt_diag_p_one_minus_p_x_over_n():
    n, d = 20, 3
    X = _randn(n, d)
    y = (torch.arange(n) % 2).to(DT).unsqueeze(1)
    torch.manual_seed(0)
    model = nn.Linear(d, 1).to(DT)
    X1 = torch.cat([X, torch.ones(n, 1, dtype=DT)], dim=1)
    with torch.no_grad():
        p = torch.sigmoid(model(X)).squeeze(1)
    expected = X1.T @ torch.diag(p * (1 - p)) @ X1 / n
    op = hessopt.HessianOperator(model, nn.BCEWithLogitsLoss(), (X, y))
    _assert_close(op.to_dense(), expected)


# ---------------------------------------------------------------------------------------------
# Bad input to the core functions
# ---------------------------------------------------------------------------------------------


def test_hvp_rejects_a_non_scalar_loss(snapshot, assert_unchanged):
    model, x = _mlp(), _randn(8, 4)
    before = snapshot(model)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="the loss must be a scalar, got shape \\(8, 3\\)"):
        hessopt.hvp(lambda: model(x), params, _random_like(params))
    assert_unchanged(model, before)


def test_hvp_rejects_vectors_of_the_wrong_size_dtype_or_device(snapshot, assert_unchanged):
    model, x = _mlp(), _randn(8, 4)
    before = snapshot(model)
    params = list(model.parameters())
    v = _random_like(params)

    def loss():
        return model(x).pow(2).mean()

    with pytest.raises(ValueError, match="got 3 vectors for 4 parameters"):
        hessopt.hvp(loss, params, v[:3])
    with pytest.raises(ValueError, match=r"vectors\[1\] has shape \(7,\) but its parameter has shape \(6,\)"):
        hessopt.hvp(loss, params, [v[0], torch.zeros(7, dtype=DT), v[2], v[3]])
    with pytest.raises(TypeError, match=r"vectors\[0\] has dtype torch.float32 .* v.to\(torch.float64\)"):
        hessopt.hvp(loss, params, [v[0].float()] + v[1:])
    with pytest.raises(ValueError, match=r"vectors\[2\] is on meta but its parameter is on cpu"):
        hessopt.hvp(loss, params, v[:2] + [v[2].to("meta")] + v[3:])
    with pytest.raises(TypeError, match=r"vectors\[3\] is a list"):
        hessopt.hvp(loss, params, v[:3] + [[1.0]])
    assert_unchanged(model, before)


def test_hvp_rejects_empty_or_frozen_params(snapshot, assert_unchanged):
    model, x = _mlp(), _randn(8, 4)
    model[0].weight.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="params is empty"):
        hessopt.hvp(lambda: model(x).sum(), [], [])
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(6, 4\)\) does not require grad"):
        hessopt.hvp(lambda: model(x).pow(2).mean(), [model[0].weight], [torch.zeros(6, 4, dtype=DT)])
    assert_unchanged(model, before)


def test_hvp_rejects_a_loss_that_does_not_depend_on_params():
    w = nn.Parameter(_randn(3))
    with pytest.raises(ValueError, match="does not depend on any tensor that requires grad"):
        hessopt.hvp(lambda: _randn(3).sum(), [w], [torch.ones(3, dtype=DT)])


# ---------------------------------------------------------------------------------------------
# Weight normalization: PyTorch's fused torch._weight_norm has a wrong double backward on CPU
# ---------------------------------------------------------------------------------------------


def _weight_norm_net(legacy=False):
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    if legacy:
        with pytest.warns(FutureWarning):
            first = torch.nn.utils.weight_norm(nn.Linear(3, 4))
    else:
        first = weight_norm(nn.Linear(3, 4))
    return nn.Sequential(first, nn.Tanh(), weight_norm(nn.Linear(4, 2), dim=None), nn.Tanh(),
                         weight_norm(nn.Linear(2, 2), dim=1)).to(DT)


def _fd_hessian(loss_of_flat, flat, eps=1e-5):
    """Oracle: central differences of exact first-order gradients, column by column."""
    cols = []
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = eps
        plus = torch.func.grad(loss_of_flat)(flat + e)
        minus = torch.func.grad(loss_of_flat)(flat - e)
        cols.append((plus - minus) / (2 * eps))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("legacy", [False, True])
def test_weight_norm_hessian_is_symmetric_and_matches_finite_differences(legacy):
    model = _weight_norm_net(legacy)
    x, y = _randn(8, 3), torch.arange(8) % 2
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]

    def loss_of_flat(flat):
        chunks = [c.view(s) for c, s in zip(flat.split([s.numel() for s in shapes]), shapes)]
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, chunks)), (x,)), y)

    flat = flatten([p.detach() for p in params])
    oracle = _fd_hessian(loss_of_flat, flat)  # truncation ~1e-10 at eps 1e-5 in float64
    plain = _plain_dense_hessian(F.cross_entropy(model(x), y), params)
    assert (plain - plain.T).abs().max() > 1e-2  # PyTorch's own double backward is asymmetric here
    for method in ("reverse", "forward_over_reverse"):
        H = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), method=method).to_dense()
        torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(H, oracle, rtol=1e-6, atol=1e-7)
    v = _random_like(params)
    with hessopt.second_order_safe():
        hv = hessopt.hvp(lambda: F.cross_entropy(model(x), y), params, v)
    _assert_close(hv, oracle @ flatten(v), rtol=1e-6, atol=1e-7)
    with torch.no_grad(), hessopt.second_order_safe():  # same forward values inside the block
        inside = model(x)
    torch.testing.assert_close(inside, model(x).detach(), rtol=1e-14, atol=1e-15)
