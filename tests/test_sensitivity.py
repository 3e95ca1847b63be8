"""hessopt.analysis.sensitivity against exact answers: block-diagonal and dense matrices with known
blocks, all 2^n sign vectors (exact expectations), a tiny float64 model's dense Hessian."""
import dataclasses
import itertools
import json
import math

import pytest
import torch
from torch import nn

import hessopt
from hessopt.analysis import (
    HessianSensitivity,
    hessian_sensitivity,
    quantization_error,
    quantize,
)

DT = torch.float64


def sym(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=DT)
    return (a + a.T) / 2


def block_diag_case(seed=0):
    """Parameters a (2x3), b (4,), c (3x2) and a block-diagonal symmetric H with one block each."""
    g = torch.Generator().manual_seed(seed)
    params = {"a": torch.randn(2, 3, generator=g, dtype=DT), "b": torch.randn(4, generator=g, dtype=DT),
              "c": torch.randn(3, 2, generator=g, dtype=DT)}
    H = torch.block_diag(sym(6, seed + 1) + 3 * torch.eye(6, dtype=DT), sym(4, seed + 2), sym(6, seed + 3))
    return params, H


def all_signs(n):
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=DT).T  # (n, 2^n)


def offsets_of(params):
    out, o = {}, 0
    for name, t in params.items():
        out[name] = slice(o, o + t.numel())
        o += t.numel()
    return out


class ParamMatrixOperator(hessopt.MatrixOperator):
    """A dense matrix that says which parameters it acts on, as a model's curvature operator does."""

    def __init__(self, matrix, params):
        super().__init__(matrix)
        self.param_names = list(params)
        self.params = list(params.values())
        self.shapes = [p.shape for p in self.params]


# ---------------------------------------------------------------------------------------------
# block traces
# ---------------------------------------------------------------------------------------------


def test_block_traces_within_stated_error_on_block_diagonal_hessian():
    params, H = block_diag_case()
    sl = offsets_of(params)
    S = 400
    sens = hessian_sensitivity(ParamMatrixOperator(H, params), num_probes=S, generator=0)
    assert sens.names == ("a", "b", "c")
    for name in params:
        block = sens[name]
        Hbb = H[sl[name], sl[name]]
        exact = float(torch.trace(Hbb))
        assert block.num_params == params[name].numel()
        # 4 standard errors: a fixed generator, the tolerance from the estimator's own variance
        assert abs(block.trace - exact) <= 4 * block.trace_std_error
        assert block.avg_trace == pytest.approx(block.trace / block.num_params, rel=1e-12)
        assert block.avg_trace_std_error == pytest.approx(block.trace_std_error / block.num_params, rel=1e-12)
        # the stated error matches the Rademacher variance 2 sum_{i != j in b} H_ij^2 (block-diagonal)
        var = 2 * float((Hbb.pow(2).sum() - Hbb.diagonal().pow(2).sum()))
        assert block.trace_std_error == pytest.approx(math.sqrt(var / S), rel=0.25)
    assert abs(sens.total_trace - float(torch.trace(H))) <= 4 * sens.total_trace_std_error


def test_exact_expectation_over_all_sign_vectors_with_off_block_coupling():
    """With every sign vector as a probe the mean is the exact expectation: the restriction of the
    full-model quadratic form is an unbiased block-trace estimate even when blocks are coupled, and its
    population variance is 2 sum_{i!=j in b} H_ij^2 + sum_{i in b, j not in b} H_ij^2."""
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(2, 2, generator=g, dtype=DT), "v": torch.randn(3, generator=g, dtype=DT),
              "u": torch.randn(1, 2, generator=g, dtype=DT)}
    H = sym(9, 4)  # dense: blocks coupled
    Z = all_signs(9)
    sens = hessian_sensitivity(hessopt.MatrixOperator(H), probes=Z, params=params)
    assert sens.num_probes == 512 and sens.distribution == "given"
    sl = offsets_of(params)
    for name in params:
        idx = torch.arange(9)[sl[name]]
        rest = torch.tensor([i for i in range(9) if i not in idx.tolist()])
        Hbb = H[idx][:, idx]
        assert sens[name].trace == pytest.approx(float(torch.trace(Hbb)), abs=1e-12)
        var = 2 * float(Hbb.pow(2).sum() - Hbb.diagonal().pow(2).sum()) + float(H[idx][:, rest].pow(2).sum())
        population_var = float(sens[name].samples.var(unbiased=False))
        assert population_var == pytest.approx(var, rel=1e-10)
        assert sens[name].trace_std_error == pytest.approx(math.sqrt(population_var * 512 / 511 / 512), rel=1e-10)


def test_diagonal_hessian_is_exact_with_rademacher_probes():
    g = torch.Generator().manual_seed(5)
    params = {"conv": torch.randn(3, 2, 2, 2, generator=g, dtype=DT), "bias": torch.randn(3, generator=g, dtype=DT)}
    d = torch.randn(27, generator=g, dtype=DT)
    op = ParamMatrixOperator(torch.diag(d), params)
    sens = hessian_sensitivity(op, num_probes=2, generator=1)
    conv, bias = sens["conv"], sens["bias"]
    assert conv.trace == pytest.approx(float(d[:24].sum()), abs=1e-12)
    assert conv.trace_std_error == pytest.approx(0.0, abs=1e-12)
    assert bias.trace == pytest.approx(float(d[24:].sum()), abs=1e-12)
    torch.testing.assert_close(conv.channel_trace, d[:24].reshape(3, 8).sum(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(bias.channel_trace, d[24:], rtol=0, atol=1e-12)
    torch.testing.assert_close(conv.diagonal[0], d[:24].reshape(3, 2, 2, 2), rtol=0, atol=1e-12)


def test_gaussian_probes_unbiased_within_error():
    params, H = block_diag_case(seed=7)
    sens = hessian_sensitivity(ParamMatrixOperator(H, params), num_probes=300, generator=2, distribution="gaussian")
    sl = offsets_of(params)
    for name in params:
        exact = float(torch.trace(H[sl[name], sl[name]]))
        assert abs(sens[name].trace - exact) <= 4 * sens[name].trace_std_error


# ---------------------------------------------------------------------------------------------
# channels
# ---------------------------------------------------------------------------------------------


def test_channel_split_sums_to_block_estimate_and_channel_traces_are_exact_in_expectation():
    params, H = block_diag_case(seed=11)
    H = H + 0.3 * sym(16, 12)  # couple the blocks: the split must still add up
    sl = offsets_of(params)
    sens = hessian_sensitivity(ParamMatrixOperator(H, params), num_probes=37, generator=3)
    for name in params:
        b = sens[name]
        assert b.num_channels == params[name].shape[0]
        assert b.channel_trace.sum().item() == pytest.approx(b.trace, rel=1e-12, abs=1e-12)
        torch.testing.assert_close(b.channel_samples.sum(1), b.samples, rtol=0, atol=0)
        assert b.channel_sizes.tolist() == [params[name][0].numel()] * params[name].shape[0]
        torch.testing.assert_close(b.channel_avg_trace, b.channel_trace / b.channel_sizes.double())
        torch.testing.assert_close(b.channel_sq_norm, params[name].reshape(params[name].shape[0], -1).pow(2).sum(1))
    # exact expectation of each channel (all 2^16 sign vectors is too many; 2^9 on a smaller case)
    small = {"w": params["a"][:, :2].contiguous(), "v": torch.randn(5, generator=torch.Generator().manual_seed(14), dtype=DT)}  # 4 + 5 = 9
    Hs = sym(9, 13)
    exact = hessian_sensitivity(hessopt.MatrixOperator(Hs), probes=all_signs(9), params=small)
    torch.testing.assert_close(exact["w"].channel_trace, Hs.diagonal()[:4].reshape(2, 2).sum(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(exact["v"].channel_trace, Hs.diagonal()[4:], rtol=0, atol=1e-12)


def test_module_blocks_of_a_model_match_its_dense_hessian(dense_hessian):
    """Module blocks (weight and bias together; channel c = weight row c and bias c) on a tiny float64
    model, with every sign vector as a probe: exact block and channel traces of the real Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).to(DT)  # 6 + 3 = 9 parameters
    x = torch.randn(8, 2, dtype=DT)
    y = torch.randn(8, 1, dtype=DT)
    loss_fn = nn.MSELoss()
    op = hessopt.HessianOperator(model, loss_fn, (x, y))
    H = dense_hessian(model, lambda out: loss_fn(out, y), x)
    sens = hessian_sensitivity(op, model, probes=all_signs(9))
    assert sens.names == ("0", "2")
    d = H.diagonal()
    first, last = sens["0"], sens["2"]
    assert first.param_names == ("0.weight", "0.bias") and first.num_params == 6 and first.num_channels == 2
    assert first.trace == pytest.approx(float(d[:6].sum()), abs=1e-10)
    # channel 0 = weight[0, :] (entries 0, 1) and bias[0] (entry 4)
    torch.testing.assert_close(first.channel_trace, torch.stack([d[[0, 1, 4]].sum(), d[[2, 3, 5]].sum()]),
                               rtol=0, atol=1e-10)
    assert first.channel_sizes.tolist() == [3, 3]
    assert last.trace == pytest.approx(float(d[6:].sum()), abs=1e-10)
    # per-parameter blocks from the same model
    per_param = hessian_sensitivity(op, model, blocks="parameter", probes=all_signs(9))
    assert per_param.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert per_param["2.bias"].num_channels == 1
    assert per_param["0.bias"].trace == pytest.approx(float(d[4:6].sum()), abs=1e-10)


def test_blocks_without_a_common_channel_dimension_have_no_channel_split():
    params = {"w": torch.ones(2, 3, dtype=DT), "b": torch.ones(3, dtype=DT), "s": torch.ones((), dtype=DT)}
    H = torch.diag(torch.arange(1.0, 11.0, dtype=DT))
    sens = hessian_sensitivity(hessopt.MatrixOperator(H), params=params, blocks={"wb": ["w", "b"], "s": ["s"]},
                               num_probes=2, generator=0)
    assert sens["wb"].num_channels == 0 and sens["wb"].channel_trace.numel() == 0
    assert sens["s"].num_channels == 0
    assert sens["wb"].trace == pytest.approx(float(torch.arange(1.0, 10.0).sum()))
    assert sens.channel_ranking() == []


# ---------------------------------------------------------------------------------------------
# quantizer
# ---------------------------------------------------------------------------------------------


def test_quantize_known_values_and_representable_grids():
    assert quantize(torch.tensor([0.6, -1.0, 0.2], dtype=DT), bits=2).tolist() == [1.0, -1.0, 0.0]
    g = torch.Generator().manual_seed(0)
    for bits in (3, 4, 8):
        qmax = 2 ** (bits - 1) - 1
        codes = torch.randint(-qmax, qmax + 1, (5, 7), generator=g).to(DT)
        codes[0, 0] = qmax
        w = 0.037 * codes  # on the 'bits' grid, max |w| = 0.037 * qmax
        assert quantization_error(w, bits) == 0.0
        rows = codes.clone()
        rows[:, 0] = qmax  # every row reaches its maximum: on the per-channel grid with row scales
        w_rows = rows * torch.linspace(0.01, 2.0, 5, dtype=DT)[:, None]
        assert quantization_error(w_rows, bits, "per_channel") == pytest.approx(0.0, abs=1e-28)
    assert quantize(torch.zeros(3, 2, dtype=DT), 4, "per_channel").abs().sum() == 0


def test_quantization_error_bounded_and_decreasing_in_bits():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 300, generator=g, dtype=DT)
    errors = []
    for bits in range(2, 14):
        q = quantize(w, bits)
        scale = float(w.abs().max()) / (2 ** (bits - 1) - 1)
        assert float((q - w).abs().max()) <= scale / 2 + 1e-12
        errors.append(quantization_error(w, bits))
    assert all(a > b for a, b in zip(errors, errors[1:]))
    # rows of very different scales: per-channel scales keep the small rows, one scale rounds them to 0
    w_rows = w * torch.logspace(-3, 0, 64, dtype=DT)[:, None]
    small_rows = slice(0, 32)
    err_channel = (quantize(w_rows, 4, "per_channel") - w_rows)[small_rows].pow(2).sum()
    err_tensor = (quantize(w_rows, 4, "per_tensor") - w_rows)[small_rows].pow(2).sum()
    assert quantize(w_rows, 4, "per_tensor")[:8].abs().max() == 0
    assert err_channel < 0.05 * err_tensor
    assert quantization_error(w_rows, 4, "per_channel") < quantization_error(w_rows, 4, "per_tensor")
    # 1-D tensors are quantized per tensor under per_channel
    v = torch.randn(50, generator=g, dtype=DT)
    torch.testing.assert_close(quantize(v, 3, "per_channel"), quantize(v, 3, "per_tensor"))


def test_quantizer_errors():
    with pytest.raises(ValueError, match="bits must be an int >= 2"):
        quantize(torch.ones(3), 1)
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize(torch.ones(3), 4, "per_row")
    with pytest.raises(TypeError, match="floating-point tensor"):
        quantize(torch.ones(3, dtype=torch.int64), 4)


# ---------------------------------------------------------------------------------------------
# scores and rankings
# ---------------------------------------------------------------------------------------------


def ranking_case():
    """Diagonal H with block average traces a: 3, b: 1, c: 2; a's weights are on its 4-bit grid."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-7, 8, (2, 3), generator=g).to(DT)
    codes[0, 0] = 7
    params = {"a": 0.1 * codes, "b": torch.randn(4, generator=g, dtype=DT), "c": torch.randn(3, 2, generator=g, dtype=DT)}
    d = torch.cat([torch.full((6,), 3.0), torch.full((4,), 1.0), torch.tensor([1.0, 3.0, 0.5, 3.5, 2.0, 2.0])]).to(DT)
    return params, torch.diag(d)


def test_rankings_on_a_constructed_case():
    params, H = ranking_case()
    sens = hessian_sensitivity(ParamMatrixOperator(H, params), num_probes=2, generator=0)
    assert sens.ranking() == ("a", "c", "b")
    assert sens.ranking(by="trace") == ("a", "c", "b")  # traces 18, 12, 4
    # channels of c: avg traces (1+3)/2, (0.5+3.5)/2, (2+2)/2 all 2 -> removal score orders by ||W_c||^2
    c = sens["c"]
    torch.testing.assert_close(c.channel_avg_trace, torch.full((3,), 2.0, dtype=DT))
    torch.testing.assert_close(c.channel_removal_score, 2.0 * params["c"].pow(2).sum(1))
    ranked = sens.channel_ranking()
    assert [v for _, _, v in ranked] == sorted((v for _, _, v in ranked), reverse=True)
    assert len(ranked) == 2 + 4 + 3
    # 4-bit quantization: a is exactly representable, so its score is 0 despite the largest avg trace
    q = sens.quantization(bits=4)
    assert q["a"].quant_error_sq == 0.0 and q["a"].score == 0.0
    for name in ("b", "c"):
        err = quantization_error(params[name], 4)
        assert q[name].quant_error_sq == pytest.approx(err)
        assert q[name].score == pytest.approx(sens[name].avg_trace * err)
    assert q.ranking()[-1] == "a"
    assert q.total_score == pytest.approx(sum(r.score for r in q))
    mixed = sens.quantization(bits={"a": 2, "b": 8, "c": 4}, scheme="per_channel")
    assert mixed.average_bits == pytest.approx((2 * 6 + 8 * 4 + 4 * 6) / 16)
    assert mixed["b"].quant_error_sq == pytest.approx(quantization_error(params["b"], 8, "per_channel"))


def test_results_are_frozen_and_serializable():
    params, H = ranking_case()
    sens = hessian_sensitivity(ParamMatrixOperator(H, params), num_probes=3, generator=0)
    assert isinstance(sens, HessianSensitivity)
    d = sens.to_dict()
    json.dumps(d)
    json.dumps(sens.quantization(4).to_dict())
    assert "diagonal" not in d["blocks"][0] and "channel_samples" not in d["blocks"][0]
    assert d["blocks"][2]["channel_removal_score"] == sens["c"].channel_removal_score.tolist()
    with pytest.raises(dataclasses.FrozenInstanceError):
        sens.blocks[0].trace = 0.0
    with pytest.raises(KeyError, match="no block named"):
        sens["zzz"]
    assert "| `a` | 6 |" in sens.to_markdown()


def test_hessian_operator_float32_and_seeded_reproducibility():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 2, (6,))
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    a = hessian_sensitivity(op, model, num_probes=4, generator=5)
    b = hessian_sensitivity(op, model, num_probes=4, generator=5)
    assert a.names == ("0", "3") and a["0"].num_channels == 3 and a["3"].num_channels == 2
    assert [r.trace for r in a] == [r.trace for r in b]
    assert a["0"].diagonal[0].dtype == DT and a["0"].diagonal[0].shape == (3, 1, 3, 3)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_errors():
    params, H = block_diag_case()
    with pytest.raises(TypeError, match="does not say which parameters"):
        hessian_sensitivity(hessopt.MatrixOperator(H), num_probes=2)
    with pytest.raises(ValueError, match="the parameters have 6 entries but the operator acts on 16"):
        hessian_sensitivity(hessopt.MatrixOperator(H), params={"a": params["a"]}, num_probes=2)
    op = ParamMatrixOperator(H, params)
    with pytest.raises(ValueError, match="num_probes must be an int >= 1"):
        hessian_sensitivity(op, num_probes=0)
    with pytest.raises(ValueError, match="probes must be a \\(16, S\\) tensor"):
        hessian_sensitivity(op, probes=torch.ones(5, 2, dtype=DT))
    with pytest.raises(ValueError, match="selects no parameters"):
        hessian_sensitivity(op, blocks={"x": "^zzz"}, num_probes=2)
    with pytest.raises(ValueError, match="without a model, blocks must be"):
        hessian_sensitivity(op, blocks="module", num_probes=2)
    with pytest.raises(ValueError, match="unknown probe distribution"):
        hessian_sensitivity(op, num_probes=2, distribution="uniform")
    sens = hessian_sensitivity(op, num_probes=2, generator=0)
    with pytest.raises(ValueError, match="gives no width for blocks"):
        sens.quantization(bits={"a": 4})
    with pytest.raises(ValueError, match="unknown blocks"):
        sens.quantization(bits={"a": 4, "b": 4, "c": 4, "d": 4})
    with pytest.raises(ValueError, match="bits must be an int >= 2"):
        sens.quantization(bits=1)
    with pytest.raises(ValueError, match="by must be 'avg_trace' or 'trace'"):
        sens.ranking(by="score")
    # a model block the operator does not cover
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).to(DT)
    sub = hessopt.HessianOperator(model, nn.MSELoss(), (torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)),
                                  params="^0\\.")
    with pytest.raises(ValueError, match="which the operator does not act on"):
        hessian_sensitivity(sub, model, num_probes=2)
    assert hessian_sensitivity(sub, model, blocks={"first": "^0\\."}, num_probes=2, generator=0).names == ("first",)


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_other_curvature_operators_give_their_own_block_traces(kind):
    """Any operator over a model's parameters works: GGN and empirical Fisher, exact over all sign vectors."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).to(DT)
    x, y = torch.randn(8, 2, dtype=DT), torch.randn(8, 1, dtype=DT)
    cls = hessopt.GGNOperator if kind == "ggn" else hessopt.EmpiricalFisherOperator
    op = cls(model, nn.MSELoss(), (x, y))
    d = op.to_dense().diagonal()
    sens = hessian_sensitivity(op, model, probes=all_signs(9))
    assert sens["0"].trace == pytest.approx(float(d[:6].sum()), abs=1e-10)
    assert sens["2"].trace == pytest.approx(float(d[6:].sum()), abs=1e-10)
    assert all(float(b.channel_trace.min()) >= -1e-12 for b in sens)  # positive semi-definite matrices
