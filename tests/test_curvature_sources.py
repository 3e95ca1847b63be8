"""Curvature sources against oracles, in float64: Gauss-Newton-Bartlett's exact expectation against a
dense Gauss-Newton matrix, finite differences against the exact Hutchinson estimate, and both in the
settings they exist for (fused attention, torch.compile, reentrant checkpointing)."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessopt
from hessopt.optim.curvature import (CurvatureInputs, FiniteDifference, GaussNewtonBartlett, Hutchinson,
                                     _flat_predictions)


def _mlp(seed=0, d_in=3, hidden=4, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()


def _dense_ggn_diagonal(model, x):
    r"""diag of (1/B) sum_b J_b^T (diag p_b - p_b p_b^T) J_b from full Jacobians (torch.func)."""
    params = dict(model.named_parameters())
    names = list(params)

    def logits_of(*flat):
        return torch.func.functional_call(model, dict(zip(names, flat)), (x,))

    jac = torch.func.jacrev(logits_of, argnums=tuple(range(len(names))))(*params.values())
    B, C = x.shape[0], model[-1].out_features
    J = torch.cat([j.reshape(B, C, -1) for j in jac], dim=2)  # [B, C, n]
    p = torch.softmax(logits_of(*params.values()), dim=-1)
    H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # [B, C, C]
    ggn = torch.einsum("bci,bcd,bdj->ij", J, H, J) / B
    return ggn.diagonal()


def test_gnb_expectation_equals_gauss_newton_diagonal_by_enumeration(float64):
    """E over all C^B label draws of B * g_hat^2 equals diag(GGN) of the mean cross-entropy exactly."""
    model = _mlp()
    x = torch.randn(3, 3, dtype=torch.float64)
    params = list(model.parameters())
    logits = model(x)
    probs = torch.softmax(logits.detach(), dim=-1)
    B, C = logits.shape
    expectation = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for labels in itertools.product(range(C), repeat=B):
        labels = torch.tensor(labels)
        weight = probs[torch.arange(B), labels].prod()
        terms = GaussNewtonBartlett.for_labels(params, logits, labels, retain_graph=True)
        expectation += weight * torch.cat([t.reshape(-1) for t in terms])
    torch.testing.assert_close(expectation, _dense_ggn_diagonal(model, x), rtol=1e-10, atol=1e-14)


def test_gnb_sampled_mean_converges_to_gauss_newton_diagonal(float64):
    """The sampling path: the mean of many estimates is within 5 standard errors of diag(GGN)."""
    model = _mlp(seed=1)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    params = list(model.parameters())
    source = GaussNewtonBartlett()
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(400):
        with hessopt._patches.capture_cross_entropy() as captures:
            F.cross_entropy(model(x), y)
        est = source.estimate(CurvatureInputs(params, [None] * len(params), {torch.device("cpu"): gen}, captures))
        samples.append(torch.cat([e.reshape(-1) for e in est]))
    samples = torch.stack(samples)
    mean, se = samples.mean(0), samples.std(0) / 400**0.5
    exact = _dense_ggn_diagonal(model, x)
    assert ((mean - exact).abs() <= 5 * se + 1e-12).all()


def test_gnb_honours_ignore_index_and_sum_reduction(float64):
    """Rows whose target is ignore_index are not predictions; reduction='sum' scales by B."""
    model = _mlp(seed=2)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, -100, 2, -100, 1])
    with hessopt._patches.capture_cross_entropy() as captures:
        F.cross_entropy(model(x), y, ignore_index=-100)
    logits, valid, scale = _flat_predictions(captures[0])
    assert valid.tolist() == [True, False, True, False, True] and scale == 1.0
    with hessopt._patches.capture_cross_entropy() as captures:
        nn.CrossEntropyLoss(reduction="sum", ignore_index=7)(model(x)[:2], torch.tensor([7, 1]))
    _, valid, scale = _flat_predictions(captures[0])
    assert valid.tolist() == [False, True] and scale == 1.0  # one prediction: sum = mean
    # language-model layout (N, C, T): the class dimension is 1
    logits3 = torch.randn(2, 3, 4, dtype=torch.float64)
    target3 = torch.tensor([[0, 1, -100, 2], [2, 2, 1, -100]])
    with hessopt._patches.capture_cross_entropy() as captures:
        F.cross_entropy(logits3, target3, reduction="sum")
    flat, valid, scale = _flat_predictions(captures[0])
    assert flat.shape == (8, 3) and int(valid.sum()) == 6 and scale == 6.0
    torch.testing.assert_close(flat[1], logits3[0, :, 1])


def test_gnb_refuses_closures_without_exactly_one_cross_entropy():
    model = nn.Linear(3, 2)
    opt = hessopt.Sophia(model.parameters(), curvature="gnb")
    x = torch.randn(4, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="exactly one F.cross_entropy call"):
        opt.step(closure)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="needs the closure"):
        F.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
        opt.step()


def _tanh_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1), nn.Tanh()).double()


@pytest.mark.parametrize("scheme, rtol", [("forward", 1e-5), ("central", 1e-8)])
def test_finite_difference_equals_exact_hutchinson_to_truncation_error(float64, scheme, rtol):
    """Same probes (same seeded stream): z * (g(theta + h z) - g(theta)) / h = z * Hz + O(h) (forward),
    O(h^2) (central), with h ~ 1.5e-8 / 6e-6 (float64) times the parameter scale."""
    model = _tanh_model()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    params = list(model.parameters())

    def loss():
        return F.mse_loss(model(x), y)

    grads = torch.autograd.grad(loss(), params, create_graph=True)
    exact = Hutchinson().estimate(CurvatureInputs(params, grads, {torch.device("cpu"): torch.Generator().manual_seed(3)}))
    plain = [g.detach() for g in torch.autograd.grad(loss(), params)]

    def again():
        return [g.detach() for g in torch.autograd.grad(loss(), params)]

    before = [p.detach().clone() for p in params]
    fd = FiniteDifference(scheme=scheme).estimate(
        CurvatureInputs(params, plain, {torch.device("cpu"): torch.Generator().manual_seed(3)}, gradients_again=again))
    for e, f in zip(exact, fd):
        torch.testing.assert_close(f, e, rtol=rtol, atol=rtol * max(float(e.abs().max()), 1e-3))
    for p, b in zip(params, before):
        assert torch.equal(p, b)  # restored bit-exactly


def test_finite_difference_step_replays_the_steps_random_numbers_and_restores_state(float64):
    """With dropout, the re-evaluation sees the same masks (so the estimate is the Hessian's of one
    loss, not noise); the global RNG ends where one closure call leaves it; BN buffers restored with model=."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    opt = hessopt.AdaHessian(model.parameters(), lr=0.0,
                             curvature=FiniteDifference(scheme="central", model=model))

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    torch.manual_seed(5)
    opt.step(closure)
    after_step = torch.get_rng_state()
    torch.manual_seed(5)
    F.mse_loss(twin(x), y).backward()  # one closure call of the twin
    assert torch.equal(after_step, torch.get_rng_state())
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name  # lr=0: weights and BN statistics as after one plain pass
    # the estimate is the Hessian's of the loss with the step's dropout mask: compare with the exact one
    state = opt.state[model[0].weight]
    assert torch.isfinite(state["exp_hessian_diag_sq"]).all() and state["curvature_updates"] == 1


def test_finite_difference_needs_the_closure():
    model = nn.Linear(3, 1)
    opt = hessopt.AdaHessian(model.parameters(), curvature="finite_difference")
    model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(ValueError, match="finite_difference.*needs the closure|needs the closure"):
        opt.step()
    assert not opt.state[model.weight] and opt.state["adahessian"]["step"] == 0


class _Attention(nn.Module):
    """A causal self-attention block on PyTorch's default SDPA kernels (fused on CPU and GPU)."""

    def __init__(self, vocab=11, d=8, heads=2):
        super().__init__()
        self.emb, self.heads = nn.Embedding(vocab, d), heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.emb(tokens)
        B, T, D = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h + a.transpose(1, 2).reshape(B, T, D))


def _lm_closure(opt, model, tokens):
    def closure():
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("curvature", ["gnb", "finite_difference"])
def test_first_order_sources_train_on_default_attention_kernels(curvature):
    """No double backward: the fused SDPA kernel is used as is, no second_order_safe() needed."""
    torch.manual_seed(0)
    model = _Attention()
    tokens = torch.randint(0, 11, (4, 9))
    opt = hessopt.Sophia(model.parameters(), lr=3e-3, update_each=2, curvature=curvature)
    losses = [float(opt.step(_lm_closure(opt, model, tokens))) for _ in range(30)]
    assert losses[-1] < losses[0] - 0.3
    assert all(s["curvature_updates"] == 15 for p, s in opt.state.items() if isinstance(p, torch.Tensor))


@pytest.mark.parametrize("curvature", ["gnb", "finite_difference"])
def test_first_order_sources_work_on_compiled_models(curvature):
    """torch.compile (AOTAutograd, the part that has no double backward) with the plain closure."""
    torch.manual_seed(0)
    model = _Attention()
    compiled = torch.compile(model, backend="aot_eager")
    tokens = torch.randint(0, 11, (4, 9))
    opt = hessopt.Sophia(model.parameters(), lr=3e-3, update_each=1, curvature=curvature)
    losses = [float(opt.step(_lm_closure(opt, compiled, tokens))) for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    state = opt.state[model.qkv.weight]
    assert state["curvature_updates"] == 6 and float(state["hessian"].abs().sum()) > 0


def test_finite_difference_works_with_reentrant_checkpointing(float64):
    """use_reentrant=True checkpointing cannot be differentiated twice; finite differences need not."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64, requires_grad=True), torch.randn(8, 1, dtype=torch.float64)
    opt = hessopt.AdaHessian(block.parameters(), lr=0.05, curvature=FiniteDifference(scheme="central"))
    ref = copy.deepcopy(block)
    ref_opt = hessopt.AdaHessian(ref.parameters(), lr=0.05, curvature="hutchinson")

    def closure_of(o, net, checkpointed):
        def closure():
            o.zero_grad()
            out = torch.utils.checkpoint.checkpoint(net, x, use_reentrant=True) if checkpointed else net(x)
            loss = F.mse_loss(out, y)
            loss.backward()
            return loss
        return closure

    for _ in range(3):
        opt.step(closure_of(opt, block, True))
        ref_opt.step(closure_of(ref_opt, ref, False))
    for p, q in zip(block.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def test_gnb_sees_cross_entropy_through_any_reference():
    """Calls through a reference taken before the step (a stored loss_fn, nn.CrossEntropyLoss, an
    imported name) are captured: the capture is a torch function mode, not an attribute patch."""
    from torch.nn.functional import cross_entropy as imported

    model = nn.Linear(3, 4)
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    for loss_fn in (F.cross_entropy, imported, nn.CrossEntropyLoss()):
        with hessopt._patches.capture_cross_entropy() as captures:
            loss_fn(model(x), y)
        assert len(captures) == 1 and captures[0]["logits"].shape == (6, 4)


def _relu_step(curvature, freeze=True):
    """One AdaHessian step on a ReLU / leaky-ReLU net (1024 samples, float64); its squared-curvature moment."""
    import contextlib

    import hessopt.optim._base as base

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 128), nn.ReLU(inplace=True), nn.Linear(128, 128), nn.LeakyReLU(0.1),
                          nn.Linear(128, 10)).double()
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(1024, 16, generator=gen, dtype=torch.float64), torch.arange(1024) % 10
    opt = hessopt.AdaHessian(model.parameters(), lr=1e-3, curvature=curvature, seed=3)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    recorder = base.frozen_activations
    if not freeze:  # the control: no pattern recorded, so none replayed
        base.frozen_activations = contextlib.contextmanager(lambda masks=None: (yield []))
    try:
        opt.step(closure)
    finally:
        base.frozen_activations = recorder
    return [opt.state[p]["exp_hessian_diag_sq"] for p in model.parameters()]


def test_finite_difference_keeps_the_relu_pattern_of_the_steps_own_evaluation():
    """The re-evaluations replay the on/off pattern of the step's ReLUs, so a kink between theta and
    theta +- h z does not add the gradient's jump / h: central differences equal the exact Hutchinson
    estimate (same probes) to 1e-10 (measured 1.1e-10 relative to the largest entry; the control
    without the pattern, whose step crosses kinks here, is off by 3.9e6)."""
    exact = _relu_step("hutchinson")
    frozen = _relu_step(FiniteDifference(scheme="central"))
    raw = _relu_step(FiniteDifference(scheme="central"), freeze=False)
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(frozen, exact))
    assert err < 1e-8
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(raw, exact)) > 1.0


def test_finite_difference_with_changing_activation_calls_warns_once_and_goes_on():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3
    opt = hessopt.AdaHessian(model.parameters(), lr=1e-2, curvature="finite_difference", seed=1)
    calls = {"n": 0}

    def closure():  # data-dependent control flow: one ReLU call the first time, two afterwards
        calls["n"] += 1
        opt.zero_grad()
        h = torch.relu(model(x))
        if calls["n"] > 1:
            h = torch.relu(h + 0.0)
        loss = F.cross_entropy(h, y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="could not be kept fixed"):
        opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
