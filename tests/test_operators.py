"""HessianOperator, MatrixOperator and LambdaOperator (hessopt/operators.py), in float64.

The oracle is the dense Hessian of the whole data set (conftest ``dense_hessian``, eval mode, where
``torch.func.hessian`` is trustworthy) or the operator's own ``to_dense`` on one concatenated batch.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessopt
from hessopt.operators import flatten, unflatten

DT = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _mlp(dropout: float = 0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(4, 2)]
    return nn.Sequential(*layers).to(DT)


def _data(n=16):
    return _randn(n, 3), torch.arange(n) % 2


class BNNet(nn.Module):
    """Linear -> BatchNorm1d -> tanh -> dropout -> linear: every mode-dependent layer in one model."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _bn_net():
    torch.manual_seed(0)
    model = BNNet().to(DT)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.num_batches_tracked.fill_(7)
    return model


def _flat_probe(op, seed=1):
    return torch.randn(op.num_params, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ---------------------------------------------------------------------------------------------
# Data handling
# ---------------------------------------------------------------------------------------------


def test_batches_of_10_and_6_give_the_hessian_of_the_16_together(dense_hessian):
    model, (x, y) = _mlp(), _data(16)
    whole = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    torch.testing.assert_close(whole, dense_hessian(model, lambda out: F.cross_entropy(out, y), x), rtol=1e-10, atol=1e-12)
    split = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), [(x[:10], y[:10]), (x[10:], y[10:])]).to_dense()
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)
    # the unweighted mean of the two batch Hessians is a different matrix (so weighting is tested)
    h10 = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x[:10], y[:10])).to_dense()
    h6 = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x[10:], y[10:])).to_dense()
    assert (0.5 * (h10 + h6) - whole).abs().max() > 1e-4


def test_dataloader_and_one_shot_generator(dense_hessian):
    model, (x, y) = _mlp(), _data(16)
    whole = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    loader = DataLoader(TensorDataset(x, y), batch_size=10)  # batches of 10 and 6, as lists
    from_loader = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), loader)
    torch.testing.assert_close(from_loader.to_dense(), whole, rtol=0, atol=1e-12)
    one_shot = ((x[i : i + 10], y[i : i + 10]) for i in (0, 10))
    from_generator = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), one_shot)
    v = _flat_probe(from_generator)
    first = from_generator @ v
    torch.testing.assert_close(from_generator @ v, first, rtol=0, atol=0)  # not consumed by the first product
    torch.testing.assert_close(first, whole @ v, rtol=0, atol=1e-12)


def test_tuple_and_dict_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x, z):
            return torch.tanh(self.a(x)) + self.b(z)

    torch.manual_seed(0)
    model = TwoInputs().to(DT)
    x, z, y = _randn(6, 3), _randn(6, 3, seed=1), torch.arange(6) % 2
    as_tuple = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), ((x, z), y)).to_dense()
    as_dict = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), ({"x": x, "z": z}, y)).to_dense()
    torch.testing.assert_close(as_tuple, as_dict, rtol=0, atol=0)
    assert as_tuple.abs().max() > 0


# ---------------------------------------------------------------------------------------------
# Parameter selection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, names",
    [
        ("list", ["2.weight"]),
        (r"^0\.", ["0.weight", "0.bias"]),
        ("predicate", ["0.bias", "2.bias"]),  # not contiguous in the full vector
    ],
)
def test_layerwise_blocks_equal_the_blocks_of_the_full_hessian(spec, names, offsets):
    model, data = _mlp(), _data(16)
    if spec == "list":
        params = [model[2].weight]
    elif spec == "predicate":
        params = lambda name: name.endswith("bias")  # noqa: E731
    else:
        params = spec
    full = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data)
    H = full.to_dense()
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data, params=params)
    assert op.param_names == names
    all_names = [n for n, _ in model.named_parameters()]
    starts = offsets(list(model.parameters()))
    index = torch.cat([torch.arange(starts[all_names.index(n)], starts[all_names.index(n) + 1]) for n in names])
    assert op.num_params == index.numel() and op.shapes == [dict(model.named_parameters())[n].shape for n in names]
    torch.testing.assert_close(op.to_dense(), H[index][:, index], rtol=0, atol=1e-13)


def test_frozen_parameter_excluded_by_default_and_refused_explicitly(snapshot, assert_unchanged):
    model, data = _mlp(), _data(16)
    model[0].weight.requires_grad_(False)
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data)
    assert op.param_names == ["0.bias", "2.weight", "2.bias"]
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"params\[1\] \(0.weight\) does not require grad \(it is frozen\): leave it out"):
        hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data, params=[model[2].weight, model[0].weight])
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# The model is left exactly as it was
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_bn_mode_leaves_buffers_and_flags_bit_identical(bn_mode, snapshot, assert_unchanged):
    model, (x, y) = _bn_net(), _data(16)
    model.train()
    model.fc2.eval()  # mixed flags, each must come back as it was
    before = snapshot(model)
    for cache_graph in (True, False):
        op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), [(x[:10], y[:10]), (x[10:], y[10:])], bn_mode=bn_mode, cache_graph=cache_graph)
        op @ _flat_probe(op)
        op.gradient(), op.loss()
        assert_unchanged(model, before)


def test_bn_mode_train_uses_batch_statistics_and_eval_the_running_ones():
    model, (x, y) = _bn_net(), _data(16)
    with torch.no_grad():
        eval_loss = F.cross_entropy(model.eval()(x), y).item()
        fc1 = model.fc1(x)
        h = F.batch_norm(fc1, None, None, model.bn.weight, model.bn.bias, training=True, eps=model.bn.eps)
        train_loss = F.cross_entropy(model.fc2(torch.tanh(h)), y).item()
    assert hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), bn_mode="eval").loss() == pytest.approx(eval_loss, rel=1e-14)
    assert hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), bn_mode="train").loss() == pytest.approx(train_loss, rel=1e-14)
    assert abs(eval_loss - train_loss) > 1e-3


def test_dropout_is_off_and_the_operator_deterministic():
    model, data = _mlp(dropout=0.5), _data(16)
    model.train()
    no_dropout = nn.Sequential(model[0], model[1], model[3])  # same parameter tensors
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data, cache_graph=False)
    ref = hessopt.HessianOperator(no_dropout, nn.CrossEntropyLoss(), data)
    v = _flat_probe(op)
    first = op @ v
    torch.testing.assert_close(op @ v, first, rtol=0, atol=0)
    torch.testing.assert_close(first, ref @ v, rtol=0, atol=1e-14)
    assert model.training and model[2].training


class Noisy(nn.Module):
    """Draws from the global RNG in every forward, whatever the mode (like some augmentation layers)."""

    def forward(self, x):
        return x + 1e-3 * torch.randn_like(x)


def test_global_rng_state_unchanged_by_products():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Noisy(), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), _data(16), cache_graph=False)
    v = _flat_probe(op)
    state = torch.get_rng_state()
    first = op @ v
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(op @ v, first, rtol=0, atol=0)  # same noise each time
    op.gradient(), op.loss()
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------
# What `op @ v` accepts and returns; gradient and loss; caching
# ---------------------------------------------------------------------------------------------


def test_list_of_tensors_and_matrix_inputs():
    model, data = _mlp(), _data(16)
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data)
    H = op.to_dense()
    vs = [torch.randn(p.shape, dtype=DT) for p in model.parameters()]
    out = op @ vs
    assert isinstance(out, list) and [o.shape for o in out] == [p.shape for p in model.parameters()]
    torch.testing.assert_close(flatten(out), H @ flatten(vs), rtol=1e-12, atol=1e-13)
    V = _randn(op.num_params, 3, seed=5)
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(op.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-12, atol=1e-13)
    assert op.shape == (op.num_params, op.num_params) and op.dtype == DT and op.device == torch.device("cpu")


def test_flatten_unflatten_round_trip():
    tensors = [_randn(2, 3), _randn(4, seed=1), _randn(1, 1, 2, seed=2)]
    flat = flatten(tensors)
    back = unflatten(flat, [t.shape for t in tensors])
    assert all(torch.equal(a, b) for a, b in zip(tensors, back))


def test_gradient_and_loss_match_autograd_over_weighted_batches():
    model, (x, y) = _mlp(), _data(16)
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), [(x[:10], y[:10]), (x[10:], y[10:])])
    loss = F.cross_entropy(model(x), y)
    grad = flatten(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(op.gradient(), grad, rtol=1e-12, atol=1e-14)
    assert op.loss() == pytest.approx(loss.item(), rel=1e-13)
    assert all(p.grad is None for p in model.parameters())  # no .grad side effect


@pytest.mark.parametrize("batches", [1, 2])
def test_cache_graph_false_equals_cached(batches):
    model, (x, y) = _mlp(), _data(16)
    data = (x, y) if batches == 1 else [(x[:10], y[:10]), (x[10:], y[10:])]
    calls = {"cached": 0, "fresh": 0}

    def counting(key):
        def loss_fn(out, t):
            calls[key] += 1
            return F.cross_entropy(out, t)

        return loss_fn

    cached = hessopt.HessianOperator(model, counting("cached"), data, cache_graph=True)
    fresh = hessopt.HessianOperator(model, counting("fresh"), data, cache_graph=False)
    V = _randn(cached.num_params, 4, seed=3)
    torch.testing.assert_close(cached @ V, fresh @ V, rtol=0, atol=1e-14)
    assert calls == {"cached": batches, "fresh": 4 * batches}  # one forward per batch, ever
    # the cache follows the parameters only after clear_cache()
    with torch.no_grad():
        model[0].weight.add_(0.1)
    cached.clear_cache()
    torch.testing.assert_close(cached @ V, fresh @ V, rtol=0, atol=1e-14)


def test_matrix_and_lambda_operators():
    A = _randn(5, 5)
    A = A + A.T
    op = hessopt.MatrixOperator(A)
    v = _randn(5, seed=1)
    torch.testing.assert_close(op @ v, A @ v)
    torch.testing.assert_close(op.to_dense(), A)
    lam = hessopt.LambdaOperator(lambda u: A @ u, 5, dtype=DT)
    torch.testing.assert_close(lam @ v, A @ v)
    torch.testing.assert_close(lam.to_dense(), A)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, and the model untouched
# ---------------------------------------------------------------------------------------------


def _bad_input_cases(model, x, y):
    data = (x, y)

    def loss_op(loss_fn, **kw):
        return lambda: hessopt.HessianOperator(model, loss_fn, data, **kw) @ torch.zeros(34, dtype=DT)

    def product(v):
        return lambda: hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data) @ v

    def with_data(d):
        return lambda: hessopt.HessianOperator(model, nn.CrossEntropyLoss(), d) @ torch.zeros(34, dtype=DT)

    return {
        "non-scalar loss": (
            loss_op(nn.CrossEntropyLoss(reduction="none")),
            ValueError,
            r"loss_fn must return a scalar mean loss, got \(16,\); use reduction='mean'",
        ),
        "wrong size": (product(torch.zeros(33, dtype=DT)), ValueError, r"expected a vector of length 34 .* got shape \(33,\)"),
        "3-d input": (product(torch.zeros(34, 2, 2, dtype=DT)), ValueError, r"expected a vector of length 34"),
        "wrong dtype": (product(torch.zeros(34)), TypeError, r"dtype torch.float32 but the operator works in torch.float64; convert with v.to\(torch.float64\)"),
        "wrong device": (product(torch.zeros(34, dtype=DT, device="meta")), ValueError, r"the vector is on meta but the operator is on cpu; move it with v.to\(op.device\)"),
        "not a tensor": (product("v"), TypeError, r"an operator multiplies a tensor or a list of tensors, not str"),
        "wrong list": (product([torch.zeros(4, 3, dtype=DT)]), ValueError, r"expected 6 tensors \(one per parameter\), got 1"),
        "wrong list shape": (
            product([torch.zeros(s, dtype=DT) for s in [(4, 3), (4,), (4,), (2, 4), (2, 4), (2,)]]),
            ValueError,
            r"tensor 3 should have shape \(4,\), got \(2, 4\)",
        ),
        "empty list": (with_data([]), ValueError, r"data is empty: pass at least one \(inputs, targets\) batch"),
        "empty generator": (with_data(b for b in []), ValueError, r"data is empty"),
        "empty loader": (with_data(DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)), ValueError, r"data is empty"),
        "not a batch": (with_data([x, x, y]), ValueError, r"each batch must be an \(inputs, targets\) pair"),
        "bad bn_mode": (loss_op(nn.CrossEntropyLoss(), bn_mode="batch"), ValueError, r"bn_mode must be 'eval' or 'train', got 'batch'"),
        "bad params regex": (loss_op(nn.CrossEntropyLoss(), params="^nothing"), ValueError, r"no parameters selected"),
        "not a model": (lambda: hessopt.HessianOperator(lambda t: t, nn.CrossEntropyLoss(), data), TypeError, r"model must be a torch.nn.Module"),
        "loss not callable": (lambda: hessopt.HessianOperator(model, "mse", data), TypeError, r"loss_fn must be callable"),
        "loss_fn raises mid-forward (train mode)": (
            loss_op(lambda out, t: 1 / 0, bn_mode="train"),
            ZeroDivisionError,
            r"division by zero",
        ),
        "nan loss": (
            loss_op(lambda out, t: F.cross_entropy(out, t) * float("nan")),
            hessopt.NonFiniteCurvatureError,
            r"the loss is nan: the Hessian is undefined here",
        ),
    }


def _bad_case_names():
    return list(_bad_input_cases(_bn_net(), *_data(16)))


@pytest.mark.parametrize("case", _bad_case_names())
def test_bad_input_raises_a_clear_error_and_leaves_the_model_alone(case, snapshot, assert_unchanged):
    model, (x, y) = _bn_net(), _data(16)
    model.train()
    model.bn.eval()
    before = snapshot(model)
    call, error, message = _bad_input_cases(model, x, y)[case]
    with pytest.raises(error, match=message):
        call()
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda op: hessopt.top_eigenvalues(op, k=35), ValueError, r"k=35 is larger than the dimension of the operator \(34\)"),
        (lambda op: hessopt.top_eigenvalues(op, method="eig"), ValueError, r"unknown method 'eig'"),
        (lambda op: hessopt.trace(op, method="exact"), ValueError, r"unknown trace method 'exact'"),
        (lambda op: hessopt.diagonal(op, probes=torch.ones(33, 2, dtype=DT)), ValueError, r"probes must be a \(34, m\) tensor"),
        (lambda op: hessopt.spectral_density(op, num_steps=0), ValueError, r"num_steps must be a positive int"),
    ],
)
def test_estimator_errors_on_a_hessian_operator_leave_the_model_alone(call, error, message, snapshot, assert_unchanged):
    model, data = _bn_net(), _data(16)
    before = snapshot(model)
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), data, bn_mode="train")
    with pytest.raises(error, match=message):
        call(op)
    assert_unchanged(model, before)


def test_model_without_trainable_parameters(snapshot, assert_unchanged):
    model = _bn_net().requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no parameters selected: the model has no trainable parameters"):
        hessopt.HessianOperator(model, nn.CrossEntropyLoss(), _data(16))
    with pytest.raises(ValueError, match=r"no parameters selected"):
        hessopt.HessianOperator(nn.ReLU(), nn.MSELoss(), _data(16))
    assert_unchanged(model, before)


class SqrtAbs(nn.Module):
    """``sqrt(|w|)`` features: finite loss at w = 0, infinite curvature there."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=DT))
        self.bn = nn.BatchNorm1d(3).to(DT)

    def forward(self, x):
        return self.bn(x) * self.w.abs().sqrt()


def test_non_finite_curvature_raises(snapshot, assert_unchanged):
    model = SqrtAbs()
    x, y = _randn(8, 3), _randn(8, 3, seed=1)
    before = snapshot(model)
    op = hessopt.HessianOperator(model, nn.MSELoss(), (x, y), bn_mode="train")
    assert op.loss() == pytest.approx(F.mse_loss(torch.zeros_like(y), y).item())  # the loss is finite
    with pytest.raises(hessopt.NonFiniteCurvatureError, match=r"HessianOperator produced NaN/Inf"):
        op @ torch.ones(op.num_params, dtype=DT)
    with pytest.raises(FloatingPointError):  # it is also a FloatingPointError
        hessopt.top_eigenvalues(op, k=1)
    assert_unchanged(model, before)
    bad = hessopt.MatrixOperator(torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]], dtype=DT))
    with pytest.raises(hessopt.NonFiniteCurvatureError, match=r"MatrixOperator produced NaN/Inf"):
        hessopt.trace(bad, num_matvecs=4, generator=0)


def test_matrix_operator_rejects_bad_matrices():
    A = _randn(4, 4)
    with pytest.raises(ValueError, match=r"the matrix is not symmetric .* pass \(A \+ A.T\) / 2"):
        hessopt.MatrixOperator(A)
    with pytest.raises(ValueError, match=r"not symmetric"):
        hessopt.trace(A, num_matvecs=4)  # dense tensors go through MatrixOperator too
    with pytest.raises(ValueError, match=r"expected a square matrix, got shape \(4, 3\)"):
        hessopt.MatrixOperator(A[:, :3])
    with pytest.raises(TypeError, match=r"expected a floating-point matrix, got torch.int64"):
        hessopt.MatrixOperator(torch.eye(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"MatrixOperator multiplies flat vectors only"):
        hessopt.MatrixOperator(A + A.T) @ [torch.zeros(4, dtype=DT)]
    hessopt.MatrixOperator(A, check_symmetric=False)  # allowed when asked for explicitly


def test_lambda_operator_rejects_bad_functions():
    with pytest.raises(TypeError, match=r"matvec_fn must be callable"):
        hessopt.LambdaOperator(3, 3)
    with pytest.raises(ValueError, match=r"num_params must be a positive int, got 0"):
        hessopt.LambdaOperator(lambda v: v, 0)
    op = hessopt.LambdaOperator(lambda v: v[:2], 3, dtype=DT)
    with pytest.raises(ValueError, match=r"matvec_fn returned \(2,\); it must return a tensor shaped like its input \(3,\)"):
        op @ torch.zeros(3, dtype=DT)
    with pytest.raises(TypeError, match=r"expected a CurvatureOperator .* got list"):
        hessopt.trace([[1.0]])


# ---------------------------------------------------------------------------------------------
# Models left exactly as found, on real-architecture patterns
# ---------------------------------------------------------------------------------------------


class CachedBiasAttention(nn.Module):
    """The pattern of timm's LeViT / EfficientFormerV2: in eval mode the attention biases are
    gathered once into a cache that only an overridden ``train()`` clears."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.biases = nn.Parameter(0.1 * _randn(4, seed=7))
        self.cache = {}
        self.train_calls = []

    @torch.no_grad()
    def train(self, mode: bool = True):
        super().train(mode)
        self.train_calls.append(mode)
        if mode and self.cache:
            self.cache = {}
        return self

    def bias(self) -> torch.Tensor:
        if self.training:
            return self.biases * 2
        if "cpu" not in self.cache:
            self.cache["cpu"] = self.biases * 2
        return self.cache["cpu"]

    def forward(self, x):
        return torch.tanh(self.proj(x) + self.bias())


def _cached_net():
    torch.manual_seed(0)
    return nn.Sequential(CachedBiasAttention(), nn.Linear(4, 2)).to(DT)


@pytest.mark.parametrize("start", ["eval", "train"])
@pytest.mark.parametrize("method", ["reverse", "forward_over_reverse", "finite_difference"])
def test_train_override_runs_and_its_cache_is_left_clean(start, method, dense_hessian):
    model, (x, y) = _cached_net(), _data(8)
    getattr(model, start)()
    with torch.no_grad():
        before = model.eval()(x).clone()  # an eval forward fills the cache (without a graph)
    getattr(model, start)()
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), method=method)
    op @ _flat_probe(op)
    assert model[0].training == (start == "train") and model[1].training == (start == "train")
    assert not any(t.requires_grad for t in model[0].cache.values())  # no graph left behind
    copy_ = __import__("copy").deepcopy(model)  # failed with graph-carrying cached tensors
    with torch.no_grad():
        model[0].biases.add_(0.5)  # a training step on the biases ...
        if start == "train":
            model.eval()
        after = model(x)  # ... must show in eval outputs (a stale cache would hide it)
        model[0].biases.sub_(0.5)
        torch.testing.assert_close(copy_.eval()(x), before, rtol=0, atol=0)
    assert (after - before).abs().max() > 1e-3
    # the stale cache must not hide the biases' curvature either: the operator equals the oracle
    model.eval()
    model[0].cache = {}
    oracle = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    model[0].cache = {"cpu": (model[0].biases * 2).detach()}  # stale and graph-free, as a user leaves it
    tol = dict(rtol=1e-6, atol=1e-6) if method == "finite_difference" else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), method=method).to_dense(),
                               oracle, **tol)


def test_flags_are_restored_through_train_even_when_mixed(snapshot, assert_unchanged):
    model = _cached_net()
    model.train()
    model[1].eval()
    before = snapshot(model)
    model[0].train_calls.clear()
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), _data(8))
    op @ _flat_probe(op)
    assert_unchanged(model, before)
    assert model[0].train_calls[-1] is True  # restored through its own train(), not .training = ...


class TwoPathPReLU(nn.Module):
    """One PReLU registered under two names and applied twice (timm CoaT shares modules so)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.PReLU(4, init=0.3)
        self.act_again = self.act
        self.fc2 = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.act_again(self.fc2(self.act(self.fc1(x)))))


@pytest.mark.parametrize("op_class", ["hessian", "ggn", "fisher"])
def test_a_module_registered_twice_keeps_its_parameter_objects(op_class, dense_hessian):
    torch.manual_seed(0)
    model, (x, y) = TwoPathPReLU().to(DT), _data(8)
    originals = {(name, key): p for name, m in model.named_modules(remove_duplicate=False)
                 for key, p in m._parameters.items()}
    make = {
        "hessian": lambda: hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), method="forward_over_reverse"),
        "ggn": lambda: hessopt.GGNOperator(model, nn.CrossEntropyLoss(), (x, y)),
        "fisher": lambda: hessopt.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (x, y)),
    }[op_class]
    op = make()
    first = op @ _flat_probe(op)
    for (name, key), p in originals.items():
        held = getattr(model.get_submodule(name), key)
        assert held is p and isinstance(held, nn.Parameter), f"{name}.{key} is not its Parameter any more"
    torch.testing.assert_close(make() @ _flat_probe(op), first, rtol=0, atol=0)  # later products agree
    if op_class == "hessian":
        twin = __import__("copy").deepcopy(model)  # the oracle's functional_call has the same torch bug
        torch.testing.assert_close(op.to_dense(), dense_hessian(twin, lambda out: F.cross_entropy(out, y), x),
                                   rtol=1e-10, atol=1e-12)
    # and training still updates the shared weight (a leftover tensor would silently drop it)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.act.weight.detach().clone()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(model.act.weight.detach(), before)
    assert model.act_again.weight is model.act.weight


# ---------------------------------------------------------------------------------------------
# HF-style dict batches and loss_fn(model, batch)
# ---------------------------------------------------------------------------------------------


class TinyHFOutput(dict):
    """What HuggingFace models return: attribute and key access (``.loss``, ``["logits"]``)."""

    __getattr__ = dict.get


class TinyHFModel(nn.Module):
    """``model(input_ids=..., attention_mask=..., labels=None)`` -> ``.logits`` and, with labels, ``.loss``."""

    def __init__(self, vocab=5, dim=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.tanh(self.embed(input_ids))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        logits = self.head(h)
        out = TinyHFOutput(logits=logits)
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)
        return out


def _hf_batches():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 5, (6, 4), generator=gen)
    mask = torch.ones(6, 4, dtype=DT)
    mask[0, 3] = 0
    labels = torch.randint(0, 5, (6, 4), generator=gen)
    return [{"input_ids": ids[:4], "attention_mask": mask[:4], "labels": labels[:4]},
            {"input_ids": ids[4:], "attention_mask": mask[4:], "labels": labels[4:]}], (ids, mask, labels)


def _hf_model():
    torch.manual_seed(0)
    return TinyHFModel().to(DT)


def test_dict_batches_with_the_models_own_loss_equal_the_plain_hessian():
    model = _hf_model()
    batches, (ids, mask, labels) = _hf_batches()
    per_batch = []
    for b in batches:
        op = hessopt.HessianOperator(model, None, b)
        per_batch.append(op.to_dense())
    whole = hessopt.HessianOperator(model, None, batches).to_dense()
    # batches of 4 and 2 sequences: weighted by the first tensor's leading dimension
    torch.testing.assert_close(whole, (4 * per_batch[0] + 2 * per_batch[1]) / 6, rtol=1e-12, atol=1e-14)
    # the same loss through loss_fn(outputs, batch) and through loss_fn(model, batch)
    def ce(outputs, batch):
        return F.cross_entropy(outputs.logits.flatten(0, -2), batch["labels"].flatten())

    def model_loss(m, batch):
        return m(**batch).loss

    torch.testing.assert_close(hessopt.HessianOperator(model, ce, batches).to_dense(), whole, rtol=1e-12, atol=1e-14)
    for method in ("reverse", "forward_over_reverse"):
        op = hessopt.HessianOperator(model, model_loss, batches, loss_form="model", method=method)
        torch.testing.assert_close(op.to_dense(), whole, rtol=1e-10, atol=1e-12)
    # an explicit batch size (here: counted tokens) changes the weights
    tokens = hessopt.HessianOperator(model, None, batches, batch_size=lambda b: int(b["attention_mask"].sum()))
    torch.testing.assert_close(tokens.to_dense(), (15 * per_batch[0] + 8 * per_batch[1]) / 23, rtol=1e-12, atol=1e-14)
    # and the oracle: the Hessian of the model's own loss on the whole data by torch.func
    params = dict(model.named_parameters())
    names = list(params)

    def total(*ts):
        sd = dict(zip(names, ts))
        out = 0
        for b, w in zip(batches, (4, 2)):
            out = out + w * torch.func.functional_call(model, sd, (), b).loss
        return out / 6

    H = torch.func.hessian(lambda flat: total(*unflatten(flat, [p.shape for p in params.values()])))(
        flatten([p.detach() for p in params.values()]))
    torch.testing.assert_close(whole, H, rtol=1e-10, atol=1e-12)


def test_dict_batch_errors_say_what_to_do():
    model = _hf_model()
    batches, _ = _hf_batches()
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match=r"loss_fn=None takes the loss the model returns .* include the labels"):
        hessopt.HessianOperator(model, None, no_labels).loss()
    with pytest.raises(ValueError, match=r"loss_form must be one of \('outputs', 'model'\)"):
        hessopt.HessianOperator(model, None, batches, loss_form="batch")
    with pytest.raises(ValueError, match=r"loss_form='model' needs loss_fn\(model, batch\)"):
        hessopt.HessianOperator(model, None, batches, loss_form="model")
    with pytest.raises(ValueError, match=r"batch_size\(batch\) must return a non-negative int"):
        hessopt.HessianOperator(model, None, batches, batch_size=lambda b: "four").loss()
    with pytest.raises(TypeError, match=r"batch_size must be a callable"):
        hessopt.HessianOperator(model, None, batches, batch_size=4)


@pytest.mark.parametrize("start", ["eval", "train"])
@pytest.mark.parametrize("op_class", ["ggn", "fisher"])
def test_train_override_cache_left_clean_by_ggn_and_fisher(start, op_class):
    model, (x, y) = _cached_net(), _data(8)
    with torch.no_grad():
        before = model.eval()(x).clone()
    getattr(model, start)()
    build = hessopt.GGNOperator if op_class == "ggn" else hessopt.EmpiricalFisherOperator
    op = build(model, nn.CrossEntropyLoss(), (x, y))
    op @ _flat_probe(op)
    assert model[0].training == (start == "train")
    assert not any(t.requires_grad or type(t) is not torch.Tensor for t in model[0].cache.values())
    __import__("copy").deepcopy(model)
    with torch.no_grad():
        model[0].biases.add_(0.5)
        after = model.eval()(x)
    assert (after - before).abs().max() > 1e-3
