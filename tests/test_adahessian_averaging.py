"""Spatial averaging of the Hessian-diagonal estimate: one test per shape rule (peer implementations
average only 4-D conv weights and crash on or drop 3-D/5-D ones).

Rules (hessopt/optim/averaging.py): 0-D/1-D never averaged; 2-D not averaged unless block_length=B
(blocks of B along the last dimension, trailing partial block on its own); >= 3-D (Conv1d/2d/3d
kernels) averaged over kernel positions (all dims after the first two); "none" turns all off;
the policy is per parameter group. Through-the-optimizer tests use betas (0, 0), so that
``sqrt(v) = average(|D|)`` with ``D`` captured from the curvature source.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hessopt
from hessopt.optim.averaging import average_curvature, describe_rule
from hessopt.optim.curvature import Hutchinson


class _Capture:
    """Hutchinson, remembering the raw (unaveraged, signed) estimate per parameter."""

    needs_graph = True

    def __init__(self):
        self.inner = Hutchinson()
        self.raw = None

    def __call__(self, params, grads, generators):
        self.raw = {id(p): d.detach().clone() for p, d in zip(params, self.inner(params, grads, generators))}
        return list(self.raw.values())


def _step_and_capture(model, loss_fn, **kwargs):
    """One closure step with betas (0, 0); returns (optimizer, raw D by parameter id)."""
    capture = _Capture()
    params = kwargs.pop("params", None) or model.parameters()
    opt = hessopt.AdaHessian(params, betas=(0.0, 0.0), curvature=capture, **kwargs)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    return opt, capture.raw


def _sqrt_v(opt, p):
    return opt.state[p]["exp_hessian_diag_sq"].sqrt()


@pytest.mark.parametrize("shape", [(), (7,)])
def test_0d_and_1d_never_averaged(shape):
    d = torch.randn(shape).abs()
    for block_length in (None, 3):
        assert torch.equal(average_curvature(d, "auto", block_length), d)
    assert describe_rule(torch.Size(shape), "auto", 4) == "none"


def test_2d_not_averaged_by_default():
    d = torch.randn(4, 6).abs()
    assert torch.equal(average_curvature(d, "auto", None), d)
    assert torch.equal(average_curvature(d, "auto", 1), d)
    assert describe_rule(d.shape, "auto", None) == "none"


def test_2d_block_averaging_along_last_dimension():
    d = torch.arange(24.0).view(3, 8)
    out = average_curvature(d, "auto", 4)
    want = torch.stack([d[:, :4].mean(1), d[:, 4:].mean(1)], dim=1).repeat_interleave(4, dim=1)
    assert torch.equal(out, want)
    assert describe_rule(d.shape, "auto", 4) == "mean over blocks of 4 along the last dimension"


def test_2d_block_averaging_trailing_partial_block():
    d = torch.arange(20.0).view(2, 10)
    out = average_curvature(d, "auto", 4)
    for row in range(2):
        for lo, hi in ((0, 4), (4, 8), (8, 10)):  # the last block has 2 entries, averaged on their own
            assert torch.equal(out[row, lo:hi], d[row, lo:hi].mean().expand(hi - lo))
    wide = average_curvature(d, "auto", 32)  # B larger than the row: one block per row
    assert torch.equal(wide, d.mean(1, keepdim=True).expand_as(d))


@pytest.mark.parametrize("shape", [(4, 3, 5), (4, 3, 3, 2), (2, 3, 2, 3, 4)], ids=["conv1d", "conv2d", "conv3d"])
def test_conv_kernels_averaged_over_kernel_positions(shape):
    d = torch.rand(shape)
    out = average_curvature(d, "auto", None)
    for i in range(shape[0]):
        for j in range(shape[1]):
            assert torch.allclose(out[i, j], d[i, j].mean().expand_as(d[i, j]), rtol=1e-6, atol=0)
    assert describe_rule(d.shape, "auto", None) == f"mean over {len(shape) - 2}-D kernel positions"


def test_1x1_kernels_unchanged():
    d = torch.rand(4, 3, 1, 1)
    assert torch.equal(average_curvature(d, "auto", None), d)


def test_none_turns_every_rule_off():
    for shape in [(5,), (4, 8), (2, 3, 4), (2, 3, 2, 2), (2, 2, 2, 2, 2)]:
        d = torch.rand(shape)
        assert torch.equal(average_curvature(d, "none", 4), d)
        assert describe_rule(d.shape, "none", 4) == "none"


@pytest.mark.parametrize("conv", [nn.Conv1d(2, 3, 3), nn.Conv2d(2, 3, (3, 2)), nn.Conv3d(2, 3, (2, 3, 2))],
                         ids=["Conv1d", "Conv2d", "Conv3d"])
def test_optimizer_averages_conv_kernels_of_every_dimensionality(float64, conv):
    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn((2, 2) + (5,) * (conv.weight.dim() - 2))
    opt, raw = _step_and_capture(conv, lambda: torch.tanh(conv(x)).pow(2).sum())
    w, b = conv.weight, conv.bias
    dims = tuple(range(2, w.dim()))
    want = raw[id(w)].abs().mean(dim=dims, keepdim=True).expand_as(w)
    torch.testing.assert_close(_sqrt_v(opt, w), want, rtol=1e-12, atol=0)
    assert not torch.allclose(raw[id(w)].abs(), want)  # averaging really changed something
    torch.testing.assert_close(_sqrt_v(opt, b), raw[id(b)].abs(), rtol=1e-12, atol=0)  # 1-D: as is


def test_optimizer_block_averages_linear_and_embedding_weights(float64):
    torch.manual_seed(0)
    emb, lin = nn.Embedding(6, 8).double(), nn.Linear(8, 3).double()
    tokens = torch.tensor([[0, 1, 2], [3, 4, 5]])
    opt, raw = _step_and_capture(None, lambda: torch.tanh(lin(emb(tokens))).pow(2).sum(),
                                 params=list(emb.parameters()) + list(lin.parameters()), block_length=4)
    for p in (emb.weight, lin.weight):
        want = average_curvature(raw[id(p)].abs(), "auto", 4)
        torch.testing.assert_close(_sqrt_v(opt, p), want, rtol=1e-12, atol=0)
        assert torch.equal(want[:, :4], want[:, :1].expand(-1, 4))  # constant over a block
    torch.testing.assert_close(_sqrt_v(opt, lin.bias), raw[id(lin.bias)].abs(), rtol=1e-12, atol=0)


def test_policy_is_per_parameter_group(float64):
    torch.manual_seed(0)
    conv_a, conv_b = nn.Conv2d(1, 2, 3).double(), nn.Conv2d(2, 2, 3).double()
    lin = nn.Linear(8, 4).double()
    x = torch.randn(2, 1, 6, 6)
    groups = [
        {"params": conv_a.parameters(), "averaging": "none"},
        {"params": conv_b.parameters()},
        {"params": lin.parameters(), "block_length": 4},
    ]
    opt, raw = _step_and_capture(
        None, lambda: torch.tanh(lin(conv_b(conv_a(x)).flatten(1))).pow(2).sum(), params=groups)
    torch.testing.assert_close(_sqrt_v(opt, conv_a.weight), raw[id(conv_a.weight)].abs(), rtol=1e-12, atol=0)
    want_b = raw[id(conv_b.weight)].abs().mean(dim=(2, 3), keepdim=True).expand_as(conv_b.weight)
    torch.testing.assert_close(_sqrt_v(opt, conv_b.weight), want_b, rtol=1e-12, atol=0)
    want_lin = average_curvature(raw[id(lin.weight)].abs(), "auto", 4)
    torch.testing.assert_close(_sqrt_v(opt, lin.weight), want_lin, rtol=1e-12, atol=0)
