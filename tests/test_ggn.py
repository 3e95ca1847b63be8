"""GGNOperator (hessopt/operators/ggn.py) against dense oracles, in float64 on tiny models.

Oracle: ``J^T H_L J`` from the full Jacobian of the outputs (``torch.func.jacrev``) and the dense
Hessian of the loss in the outputs (``torch.func.hessian``); for models linear in their parameters
the GGN equals the Hessian (``HessianOperator``), for MSE and for cross-entropy.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessopt
from hessopt.operators import flatten, unflatten
from hessopt.operators.ggn import loss_hessian_product

DT = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _mlp(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)).to(DT)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _bn_net():
    torch.manual_seed(0)
    model = BNNet().to(DT)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def dense_ggn(model, loss_of_outputs, inputs) -> torch.Tensor:
    """``J^T H_L J`` with ``J`` the full Jacobian of the outputs (eval mode, functional_call)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    buffers = dict(model.named_buffers())

    def outputs(flat):
        return torch.func.functional_call(model, {**buffers, **dict(zip(names, unflatten(flat, shapes)))}, (inputs,))

    flat = flatten([params[n].detach() for n in names])
    z = outputs(flat).detach()
    J = torch.func.jacrev(outputs)(flat).reshape(z.numel(), -1)
    H = torch.func.hessian(lambda zz: loss_of_outputs(zz.reshape(z.shape)))(z.reshape(-1))
    return J.T @ H @ J


def _targets(n=8, classes=3, seed=2):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


LOSSES = {
    "CrossEntropyLoss": (nn.CrossEntropyLoss(), "class"),
    "F.cross_entropy": (F.cross_entropy, "class"),
    "'cross_entropy'": ("cross_entropy", "class"),
    "CE sum, ignore_index": (nn.CrossEntropyLoss(reduction="sum", ignore_index=1), "class"),
    "CE label smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), "class"),
    "CE class weights (autograd)": (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=DT)), "class"),
    "CE probabilities": (nn.CrossEntropyLoss(), "probs"),
    "MSELoss": (nn.MSELoss(), "real"),
    "MSE sum": (nn.MSELoss(reduction="sum"), "real"),
    "'mse'": ("mse", "real"),
    "quartic (autograd)": (lambda z, t: ((z - t) ** 4).mean() + torch.logsumexp(z, dim=-1).sum(), "real"),
}


def _loss_and_targets(name, n=8):
    loss_fn, kind = LOSSES[name]
    if kind == "class":
        y = _targets(n)
    elif kind == "probs":
        y = torch.softmax(_randn(n, 3, seed=4), dim=-1)
    else:
        y = _randn(n, 3, seed=4)
    fn = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}.get(loss_fn, loss_fn) if isinstance(loss_fn, str) else loss_fn
    return loss_fn, fn, y


@pytest.mark.parametrize("name", list(LOSSES))
def test_ggn_equals_dense_jt_hl_j(name):
    model, x = _mlp(), _randn(8, 3, seed=1)
    loss_fn, fn, y = _loss_and_targets(name)
    oracle = dense_ggn(model, lambda z: fn(z, y), x)
    G = hessopt.GGNOperator(model, loss_fn, (x, y)).to_dense()
    torch.testing.assert_close(G, oracle, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # PSD for a convex loss
    fresh = hessopt.GGNOperator(model, loss_fn, (x, y), cache_graph=False).to_dense()
    torch.testing.assert_close(fresh, G, rtol=0, atol=1e-14)


def test_closed_form_cross_entropy_on_k_dim_outputs_with_ignore_index():
    z = _randn(2, 3, 4)  # (N, C, d)
    y = torch.tensor([[0, 1, 2, -100], [2, -100, 1, 0]])
    u = _randn(2, 3, 4, seed=1)
    for reduction in ("mean", "sum"):
        fn = nn.CrossEntropyLoss(reduction=reduction)
        H = torch.func.hessian(lambda zz: fn(zz.reshape(z.shape), y))(z.reshape(-1))
        torch.testing.assert_close(loss_hessian_product(fn, z, y, u).reshape(-1), H @ u.reshape(-1), rtol=1e-12, atol=1e-14)


def test_batches_weighted_by_size_and_bn_eval(snapshot, assert_unchanged):
    model, x = _bn_net(), _randn(16, 3, seed=1)
    y = _targets(16)
    model.train()
    before = snapshot(model)
    whole = hessopt.GGNOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    split = hessopt.GGNOperator(model, nn.CrossEntropyLoss(), [(x[:10], y[:10]), (x[10:], y[10:])]).to_dense()
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)
    model.eval()
    oracle = dense_ggn(model, lambda z: F.cross_entropy(z, y), x)
    model.train()
    torch.testing.assert_close(whole, oracle, rtol=1e-10, atol=1e-12)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_leaves_statistics_flags_and_rng_untouched(bn_mode, snapshot, assert_unchanged):
    model, x = _bn_net(), _randn(16, 3, seed=1)
    model.train()
    model.fc2.eval()
    before = snapshot(model)
    state = torch.get_rng_state()
    op = hessopt.GGNOperator(model, nn.CrossEntropyLoss(), [(x[:10], _targets(10)), (x[10:], _targets(6))], bn_mode=bn_mode)
    first = op @ _randn(op.num_params, seed=3)
    torch.testing.assert_close(op @ _randn(op.num_params, seed=3), first, rtol=0, atol=0)
    op.gradient(), op.loss()
    assert torch.equal(torch.get_rng_state(), state)
    assert_unchanged(model, before)
    assert first.abs().max() > 0


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_ggn_equals_the_hessian_for_a_linear_model(loss):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    x = _randn(10, 4, seed=1)
    y = _randn(10, 3, seed=2) if loss == "mse" else _targets(10)
    loss_fn = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    G = hessopt.GGNOperator(model, loss_fn, (x, y)).to_dense()
    H = hessopt.HessianOperator(model, loss_fn, (x, y)).to_dense()
    torch.testing.assert_close(G, H, rtol=1e-10, atol=1e-12)
    if loss == "mse":  # closed form too: H = 2/(N*C) * (X^T X) per output, with the bias column
        assert G.abs().max() > 0.1


def test_differs_from_the_hessian_for_a_nonlinear_model():
    model, x, y = _mlp(), _randn(8, 3, seed=1), _targets(8)
    G = hessopt.GGNOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    H = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    assert (G - H).abs().max() > 1e-3


class _Out(dict):
    __getattr__ = dict.get


class TinyLM(nn.Module):
    """A HuggingFace-style model: keyword inputs, outputs with ``.logits``."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(5, 3), nn.Linear(3, 5)

    def forward(self, input_ids, labels=None):
        return _Out(logits=self.head(torch.tanh(self.embed(input_ids))))


def _tiny_lm():
    torch.manual_seed(0)
    model = TinyLM().to(DT)
    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 5, (3, 4), generator=gen), "labels": torch.randint(0, 5, (3, 4), generator=gen)}
    return model, batch


def lm_loss(logits, b):
    return F.cross_entropy(logits.flatten(0, -2), b["labels"].flatten())


def test_hf_style_dict_batches_with_logits():
    model, batch = _tiny_lm()
    G = hessopt.GGNOperator(model, lm_loss, batch).to_dense()  # logits picked from .logits

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = model.embed, model.head

        def forward(self, ids):
            return self.head(torch.tanh(self.embed(ids))).flatten(0, -2)

    oracle = dense_ggn(Plain(), lambda z: F.cross_entropy(z, batch["labels"].flatten()), batch["input_ids"])
    torch.testing.assert_close(G, oracle, rtol=1e-10, atol=1e-12)


def test_attention_model_without_double_backward():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True).to(DT)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 3)).to(DT)
    x, y = _randn(2, 3, 4, seed=1), _targets(2)
    op = hessopt.GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    v = _randn(op.num_params, seed=5)
    model.eval()
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        oracle = dense_ggn(model, lambda z: F.cross_entropy(z, y), x)
    torch.testing.assert_close(op @ v, oracle @ v, rtol=1e-9, atol=1e-11)


def test_errors_say_what_to_do():
    model, x, y = _mlp(), _randn(8, 3), _targets(8)
    with pytest.raises(ValueError, match=r"GGNOperator needs loss_fn\(z, targets\) on the model's outputs"):
        hessopt.GGNOperator(model, None, (x, y))
    with pytest.raises(ValueError, match=r"loss_fn\(model, batch\) \(loss_form='model'\) cannot be used"):
        hessopt.GGNOperator(model, lambda m, b: m(b[0]).sum(), (x, y), loss_form="model")
    with pytest.raises(ValueError, match=r"loss_fn names one of \['cross_entropy', 'mse'\]"):
        hessopt.GGNOperator(model, "hinge", (x, y))
    with pytest.raises(TypeError, match=r"output_fn must return a tensor, got tuple"):
        hessopt.GGNOperator(model, nn.CrossEntropyLoss(), (x, y), output_fn=lambda out: (out,)) @ torch.zeros(31, dtype=DT)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar mean loss"):
        hessopt.GGNOperator(model, lambda z, t: z.sum(-1), (x, y)) @ torch.zeros(31, dtype=DT)


# -- method="finite_difference": central differences of the outputs, then a plain backward -----------------
# In float64 at the default step (eps_mach^(1/3) = 6.1e-6 relative) the JVP's truncation and rounding
# errors are ~1e-11 relative on these models (measured 1e-11 to 1e-10): the tests ask for 1e-8.


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "CE sum, ignore_index", "CE probabilities", "MSELoss",
                                  "quartic (autograd)"])
def test_finite_difference_ggn_equals_dense_jt_hl_j(name):
    model, x = _mlp(), _randn(8, 3, seed=1)
    loss_fn, fn, y = _loss_and_targets(name)
    oracle = dense_ggn(model, lambda z: fn(z, y), x)
    op = hessopt.GGNOperator(model, loss_fn, (x, y), method="finite_difference")
    v = _randn(op.num_params, seed=5)
    assert float((op @ v - oracle @ v).norm() / (oracle @ v).norm()) < 1e-8


def test_finite_difference_ggn_on_relu_nets_hf_outputs_batches_and_bn(snapshot, assert_unchanged):
    # a ReLU net whose default step crosses kinks (the pattern is frozen at theta), BN in eval mode,
    # two batches weighted by size, and the state left as found
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)).to(DT)
    x, y = _randn(1024, 16, seed=7), torch.arange(1024) % 10
    data = [(x[:600], y[:600]), (x[600:], y[600:])]
    model.train()
    before = snapshot(model)
    exact = hessopt.GGNOperator(model, nn.CrossEntropyLoss(), data)
    fd = hessopt.GGNOperator(model, nn.CrossEntropyLoss(), data, method="finite_difference")
    v = _randn(exact.num_params, seed=8)
    want = exact @ v
    assert float((fd @ v - want).norm() / want.norm()) < 1e-8
    assert_unchanged(model, before)
    assert fd.cache_graph is False and fd.fd_step == pytest.approx(torch.finfo(DT).eps ** (1 / 3))


def test_finite_difference_ggn_with_dict_batches_and_logits():
    model, batch = _tiny_lm()
    G = hessopt.GGNOperator(model, lm_loss, batch).to_dense()
    F_ = hessopt.GGNOperator(model, lm_loss, batch, method="finite_difference").to_dense()
    torch.testing.assert_close(F_, G, rtol=1e-8, atol=1e-10)


def test_ggn_method_and_step_are_checked():
    model, x = _mlp(), _randn(8, 3, seed=1)
    with pytest.raises(ValueError, match=r"method must be one of \('jvp', 'finite_difference'\)"):
        hessopt.GGNOperator(model, nn.CrossEntropyLoss(), (x, _targets()), method="reverse")
    with pytest.raises(ValueError, match=r"fd_step must be a number in \(0, 1\)"):
        hessopt.GGNOperator(model, nn.CrossEntropyLoss(), (x, _targets()), method="finite_difference", fd_step=2)
