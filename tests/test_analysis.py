"""hessopt.analysis against exact answers: constructed matrices and tiny float64 models."""
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import hessopt
from hessopt.analysis import (
    eigenspace_overlap,
    eigenvector_structures,
    gradient_concentration,
    kronecker_factors,
    layerwise,
    layerwise_overlap,
    loss_landscape,
    low_rank_structure,
    random_directions,
    resolve_blocks,
)

DT = torch.float64


def dense_hessian(model, loss_fn, x, y, names=None):
    """Dense Hessian over the named parameters (all by default), flattened in model order."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params) if names is None else names
    fixed = {n: p for n, p in params.items() if n not in names}

    def f(*flat):
        out = functional_call(model, {**fixed, **dict(zip(names, flat))}, (x,))
        return loss_fn(out, y)

    blocks = hessian(f, argnums=tuple(range(len(names))))(*[params[n] for n in names])
    sizes = [params[n].numel() for n in names]
    rows = [torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1) for i in range(len(names))]
    return torch.cat(rows, 0)


def orthogonal(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]


def mlp(seed=0, act=nn.Tanh, d=4, h=3, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), act(), nn.Linear(h, c)).to(DT)


def batch(n=12, d=4, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, c, (n,), generator=g)


# ---------------------------------------------------------------------------------------------
# eigenspace overlap
# ---------------------------------------------------------------------------------------------

def test_overlap_same_subspace_is_one_and_orthogonal_is_zero():
    Q = orthogonal(8)
    V = Q[:, :3]
    R = orthogonal(3, seed=5)  # another basis of the same subspace
    assert eigenspace_overlap(V, V @ R) == pytest.approx(1.0, abs=1e-12)
    assert eigenspace_overlap(V, Q[:, 3:6]) == pytest.approx(0.0, abs=1e-12)
    # nested subspaces: overlap 1 by the min(k1, k2) normalization
    assert eigenspace_overlap(Q[:, :2], Q[:, :5]) == pytest.approx(1.0, abs=1e-12)
    # half shared: span{e1, e2} vs span{e1, e3}
    I = torch.eye(5, dtype=DT)
    assert eigenspace_overlap(I[:, [0, 1]], I[:, [0, 2]]) == pytest.approx(0.5)
    # single vectors: cos^2 of the angle
    a, b = I[:, 0], (I[:, 0] + I[:, 1]) / math.sqrt(2)
    assert eigenspace_overlap(a, b) == pytest.approx(0.5)


def test_overlap_validation():
    with pytest.raises(ValueError, match="not orthonormal"):
        eigenspace_overlap(torch.ones(4, 2, dtype=DT), torch.eye(4, dtype=DT)[:, :2])
    A = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]], dtype=DT)
    assert eigenspace_overlap(A, torch.eye(3, dtype=DT)[:, :2], orthonormalize=True) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different spaces"):
        eigenspace_overlap(torch.eye(4)[:, :1], torch.eye(5)[:, :1])
    with pytest.raises(TypeError, match="tensor of column vectors"):
        eigenspace_overlap([1, 0], torch.eye(2))


def test_layerwise_overlap_of_a_model_with_itself_and_with_a_copy():
    model = mlp()
    x, y = batch()
    loss = nn.CrossEntropyLoss()
    copy = mlp()
    res = layerwise_overlap(model, copy, loss, (x, y), k=2, tol=1e-8)
    assert res.names == ("0", "2")
    assert all(o == pytest.approx(1.0, abs=1e-6) for o in res.overlaps)
    assert res.chance == (2 / 15, 2 / 12)
    json.dumps(res.to_dict())
    with pytest.raises(TypeError, match="two models or two LayerwiseSpectrum"):
        layerwise_overlap(model, 3)


# ---------------------------------------------------------------------------------------------
# gradient concentration
# ---------------------------------------------------------------------------------------------

def test_gradient_in_top2_eigenspace_gives_one_for_k2():
    Q = orthogonal(6, seed=3)
    lam = torch.tensor([5.0, 4.0, 1.0, 0.5, -0.2, 0.1], dtype=DT)
    H = Q @ torch.diag(lam) @ Q.T
    H = (H + H.T) / 2
    g = 3 * Q[:, 0] - 2 * Q[:, 1]
    r = gradient_concentration(H, grad=g, k=2, tol=1e-10)
    assert r.fraction == pytest.approx(1.0, abs=1e-10)
    assert r.per_direction.tolist() == pytest.approx([9 / 13, 4 / 13], abs=1e-10)
    assert r.eigenvalues.tolist() == pytest.approx([5.0, 4.0], abs=1e-8)
    assert r.chance == pytest.approx(2 / 6)
    # a known mixture: weights 1, 1 in the top-2 and 2 outside -> 2 / 6
    g2 = Q[:, 0] + Q[:, 1] + 2 * Q[:, 2]
    assert gradient_concentration(H, grad=g2, k=2, tol=1e-10).fraction == pytest.approx(2 / 6, abs=1e-10)
    # precomputed eigenvectors (tensor or EigenResult) give the same
    assert gradient_concentration(grad=g2, k=2, eigenvectors=Q[:, :2]).fraction == pytest.approx(2 / 6)
    res = hessopt.top_eigenvalues(H, k=3, tol=1e-10)
    assert gradient_concentration(grad=g2, k=2, eigenvectors=res).fraction == pytest.approx(2 / 6, abs=1e-10)
    json.dumps(r.to_dict())


def test_gradient_concentration_on_a_model_matches_dense():
    model = mlp()
    x, y = batch()
    loss = nn.CrossEntropyLoss()
    op = hessopt.HessianOperator(model, loss, (x, y))
    H = dense_hessian(model, loss, x, y)
    evals, evecs = torch.linalg.eigh(H)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss(model(x), y), list(model.parameters()))])
    expected = float(((evecs[:, -3:].T @ g) ** 2).sum() / (g @ g))
    r = gradient_concentration(op, k=3, tol=1e-10)
    assert r.fraction == pytest.approx(expected, rel=1e-8)
    assert r.gradient_norm == pytest.approx(float(g.norm()), rel=1e-10)


@pytest.mark.parametrize("seed", [4, 13, 17])
def test_gradient_concentration_default_tolerance_targets_the_eigenvectors(seed):
    """Close second and third eigenvalues (3, 2.95): an eigenvalue bound of 1e-3 still leaves the
    top-2 eigenspace tilted by ~0.1 (the fraction was 0.313 or 0.473 instead of 0.36); the
    Davis-Kahan stopping rule makes the default ``tol`` the fraction's absolute accuracy."""
    n, k = 20, 2
    lam = torch.cat([torch.tensor([4.0, 3.0, 2.95, 2.9], dtype=DT), torch.linspace(1, -1, n - 4, dtype=DT)])
    Q = orthogonal(n, seed=seed)
    H = Q @ torch.diag(lam) @ Q.T
    H = (H + H.T) / 2
    c = torch.zeros(n, dtype=DT)
    c[:k] = (0.36 / k) ** 0.5  # 0.36 of ||g||^2 in the top-2 eigenspace, the rest along v3..v5
    c[k:k + 3] = (0.64 / 3) ** 0.5
    g = Q @ c
    r = gradient_concentration(H, grad=g, k=k)
    assert abs(r.fraction - 0.36) <= 1e-3
    assert r.error_bound is not None and abs(r.fraction - 0.36) <= r.error_bound <= 1e-3
    assert gradient_concentration(grad=g, k=k, eigenvectors=Q[:, :k]).error_bound is None


def test_gradient_concentration_errors():
    H = torch.eye(3, dtype=DT)
    with pytest.raises(ValueError, match="gradient is zero"):
        gradient_concentration(H, grad=torch.zeros(3, dtype=DT), k=1)
    with pytest.raises(ValueError, match="pass grad="):
        gradient_concentration(H, k=1)
    with pytest.raises(ValueError, match="not orthonormal"):
        gradient_concentration(grad=torch.ones(3, dtype=DT), eigenvectors=torch.ones(3, 2, dtype=DT))
    with pytest.raises(ValueError, match="k must be a positive int"):
        gradient_concentration(H, grad=torch.ones(3, dtype=DT), k=0)


# ---------------------------------------------------------------------------------------------
# low-rank structure
# ---------------------------------------------------------------------------------------------

def test_stable_rank_of_rank_one_is_one_and_of_identity_is_n():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(5, generator=g, dtype=DT), torch.randn(7, generator=g, dtype=DT)
    r = low_rank_structure(torch.outer(u, v))
    assert r.stable_rank == pytest.approx(1.0, abs=1e-12)
    assert r.rank1_energy == pytest.approx(1.0, abs=1e-12)
    r = low_rank_structure(torch.eye(4, dtype=DT))
    assert r.stable_rank == pytest.approx(4.0) and r.rank1_energy == pytest.approx(0.25)
    # flat vector + conv shape: (out, in, kh, kw) is read as (out, in*kh*kw)
    w = torch.einsum("o,i,h,w->oihw", torch.ones(3), torch.arange(1.0, 3.0), torch.ones(2), torch.ones(2))
    r = low_rank_structure(w.reshape(-1), shape=(3, 2, 2, 2))
    assert r.shape == (3, 8) and r.stable_rank == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        low_rank_structure(torch.ones(3))
    with pytest.raises(ValueError, match="do not fit"):
        low_rank_structure(torch.ones(5), shape=(2, 3))


def test_eigenvector_structures_split_by_parameter_and_skip_vectors():
    model = mlp()
    shapes = [p.shape for p in model.parameters()]
    n = sum(p.numel() for p in model.parameters())
    V = torch.linalg.qr(torch.randn(n, 2, dtype=DT))[0]
    out = eigenvector_structures(V, shapes, names=[n for n, _ in model.named_parameters()])
    assert [o.name for o in out] == ["eigvec 0 / 0.weight", "eigvec 0 / 2.weight", "eigvec 1 / 0.weight", "eigvec 1 / 2.weight"]
    first = V[:12, 0].reshape(3, 4)
    assert out[0].singular_values.tolist() == pytest.approx(torch.linalg.svdvals(first).tolist())


# ---------------------------------------------------------------------------------------------
# layer-wise spectra
# ---------------------------------------------------------------------------------------------

def test_layerwise_blocks_equal_diagonal_blocks_of_the_dense_hessian():
    model = mlp()
    x, y = batch()
    loss = nn.CrossEntropyLoss()
    H = dense_hessian(model, loss, x, y)
    table = layerwise(model, loss, (x, y), k=3, trace_matvecs=60, tol=1e-10, density=True, density_steps=20)
    assert table.names == ("0", "2")
    offsets = {"0": (0, 15), "2": (15, 27)}
    for row in table:
        lo, hi = offsets[row.name]
        block = H[lo:hi, lo:hi]
        evals = torch.linalg.eigvalsh(block).flip(0)
        assert row.num_params == hi - lo
        assert row.top_eigenvalues.tolist() == pytest.approx(evals[:3].tolist(), abs=1e-8)
        assert row.trace == pytest.approx(float(block.trace()), abs=1e-8)  # Hutch++ sketch spans the block
        assert row.trace_std_error == 0.0
        # 20 >= n Lanczos steps exhaust the Krylov space: the quadrature nodes are eigenvalues of the block
        nodes = row.density.nodes[0]
        assert (nodes[:, None] - evals[None, :]).abs().min(dim=1).values.max() < 1e-8
        V = row.eigenvectors
        assert torch.allclose(block @ V, V * row.top_eigenvalues, atol=1e-5)  # residual ~ sqrt(eigenvalue error)
    json.dumps(table.to_dict())
    assert "| `0` | 15 |" in table.to_markdown()
    assert table["2"].num_params == 12


def test_layerwise_block_specs():
    model = mlp()
    assert resolve_blocks(model) == [("0", ["0.weight", "0.bias"]), ("2", ["2.weight", "2.bias"])]
    assert [b for b, _ in resolve_blocks(model, "parameter")] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert resolve_blocks(model, {"weights": r"weight$"}) == [("weights", ["0.weight", "2.weight"])]
    assert resolve_blocks(model, [model[2]]) == [("2", ["2.weight", "2.bias"])]
    assert resolve_blocks(model, {"w": [model[0].weight, "2.bias"]}) == [("w", ["0.weight", "2.bias"])]
    with pytest.raises(ValueError, match="selects no trainable parameters"):
        resolve_blocks(model, {"none": "conv"})
    with pytest.raises(ValueError, match="use 'module', 'parameter'"):
        resolve_blocks(model, "layers")
    model[0].weight.requires_grad_(False)
    assert resolve_blocks(model)[0] == ("0", ["0.bias"])


def test_layerwise_block_across_modules_matches_dense():
    model = mlp()
    x, y = batch()
    loss = nn.CrossEntropyLoss()
    names = ["0.weight", "2.weight"]
    H = dense_hessian(model, loss, x, y, names=names)
    table = layerwise(model, loss, (x, y), blocks={"weights": r"weight$"}, k=2, trace_matvecs=0, tol=1e-10)
    assert table[0].top_eigenvalues.tolist() == pytest.approx(torch.linalg.eigvalsh(H).flip(0)[:2].tolist(), abs=1e-8)
    assert math.isnan(table[0].trace)


# ---------------------------------------------------------------------------------------------
# Kronecker factors
# ---------------------------------------------------------------------------------------------

def test_kronecker_is_exact_for_a_linear_layer_with_mse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(10, 4, generator=g, dtype=DT), torch.randn(10, 3, generator=g, dtype=DT)
    loss = nn.MSELoss()  # mean over N*out entries: H_W = 2/(N*out) * I_out (x) X^T X  (row-major vec)
    kf = kronecker_factors(model, "0", loss, (x, t), k=6, tol=1e-10, return_ggn=True)
    expected = 2.0 / (10 * 3) * torch.kron(torch.eye(3, dtype=DT), x.T @ x)
    H = dense_hessian(model, loss, x, t, names=["0.weight"])
    assert torch.allclose(H, expected, atol=1e-12)
    assert torch.allclose(kf.matrix(), expected, atol=1e-12)
    assert torch.allclose(kf.ggn, expected, atol=1e-12)
    assert torch.allclose(kf.output_factor, 2.0 / 3 * torch.eye(3, dtype=DT), atol=1e-12)
    assert torch.allclose(kf.input_factor, x.T @ x / 10, atol=1e-12)
    # top-6 = kron(I_3, top-2 of X^T X): eigenvalues each thrice, eigenspace unique
    assert kf.eigenvalues.tolist() == pytest.approx(torch.linalg.eigvalsh(expected).flip(0)[:6].tolist(), abs=1e-10)
    evecs = torch.linalg.eigh(expected)[1].flip(1)[:, :6]
    assert eigenspace_overlap(kf.eigenvectors, evecs) == pytest.approx(1.0, abs=1e-10)
    V = kf.eigenvectors
    assert torch.allclose(expected @ V, V * kf.eigenvalues, atol=1e-10)
    json.dumps(kf.to_dict())


def test_kronecker_exact_eigenpairs_and_overlap_for_a_weighted_squared_error():
    # weights per output make M = diag(2 w / out) (still exactly Kronecker) with distinct eigenvalues,
    # so the exact Lanczos eigenpairs (exact=True) must agree with the factors' products.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(10, 4, generator=g, dtype=DT), torch.randn(10, 3, generator=g, dtype=DT)
    w = torch.tensor([1.0, 2.5, 7.0], dtype=DT)
    kf = kronecker_factors(model, "0", lambda out, tt: ((out - tt) ** 2 * w).mean(), (x, t), k=4, tol=1e-10)
    assert torch.allclose(kf.output_factor, torch.diag(2 * w / 3), atol=1e-12)
    assert kf.factor_indices[0].tolist() == [0, 0]
    assert kf.exact_eigenvalues.tolist() == pytest.approx(kf.eigenvalues.tolist(), rel=1e-8)
    assert kf.overlap == pytest.approx(1.0, abs=1e-8)
    # reshaped top eigenvectors of a Kronecker product are rank one
    for i in range(4):
        assert low_rank_structure(kf.eigenvectors[:, i], (3, 4)).stable_rank == pytest.approx(1.0, abs=1e-10)


def test_kronecker_ggn_equals_layer_hessian_of_relu_nets_with_cross_entropy():
    # A ReLU net is piecewise linear after each layer, so its layer Hessian is the Gauss-Newton block
    # (1/N) sum_n M_n (x) x_n x_n^T with M_n = J^T (diag p - p p^T) J: checks the back-propagated M.
    model = mlp(act=nn.ReLU, d=4, h=5, c=3)
    x, y = batch(n=9, d=4, c=3)
    loss = nn.CrossEntropyLoss()
    for name in ("0", "2"):
        kf = kronecker_factors(model, name, loss, (x, y), k=2, exact=False, return_ggn=True)
        H = dense_hessian(model, loss, x, y, names=[f"{name}.weight"])
        assert torch.allclose(kf.ggn, H, atol=1e-12), name
        K = kf.matrix()
        assert kf.eigenvalues.tolist() == pytest.approx(torch.linalg.eigvalsh(K).flip(0)[:2].tolist(), abs=1e-12)
        v = torch.randn(K.shape[0], dtype=DT)
        assert torch.allclose(kf.operator() @ v, K @ v, atol=1e-12)
    # last layer: M = diag(p) - p p^T exactly, so S is its mean
    p = torch.softmax(model(x), dim=1).detach()
    S = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    assert torch.allclose(kronecker_factors(model, model[2], loss, (x, y), exact=False).output_factor, S, atol=1e-12)


def test_kronecker_conv_unfolding_matches_layer_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 4)).to(DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 4, (5,), generator=g)
    loss = nn.CrossEntropyLoss()
    kf = kronecker_factors(model, "0", loss, [(x[:3], y[:3]), (x[3:], y[3:])], k=3, tol=1e-10, return_ggn=True)
    H = dense_hessian(model, loss, x, y, names=["0.weight"])
    assert kf.positions == 4 and kf.num_samples == 5 and kf.input_factor.shape == (18, 18)
    assert torch.allclose(kf.ggn, H, atol=1e-12)  # exact block, cross-position terms included
    assert kf.exact_eigenvalues.tolist() == pytest.approx(torch.linalg.eigvalsh(H).flip(0)[:3].tolist(), abs=1e-8)
    assert 0.0 <= kf.overlap <= 1.0


def test_kronecker_reduce_is_exact_for_spatially_constant_inputs_and_expand_misses_a_factor_p():
    # 1x1 conv on images constant over space, then ReLU and global average pooling: every position sees
    # the same patch and the same output Jacobian, so per sample the exact block is M_reduce (x) u u^T,
    # and "expand" (KFC), which drops the cross-position terms, keeps 1/P of it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 1, 1, generator=g, dtype=DT).expand(6, 3, 3, 3).contiguous()
    y = torch.randint(0, 3, (6,), generator=g)
    loss = nn.CrossEntropyLoss()
    red = kronecker_factors(model, "0", loss, (x, y), k=3, exact=False, return_ggn=True, positions="reduce")
    exp = kronecker_factors(model, "0", loss, (x, y), k=3, exact=False, positions="expand")
    H = dense_hessian(model, loss, x, y, names=["0.weight"])
    assert red.positions == 9 and red.mode == "reduce"
    assert torch.allclose(red.ggn, H, atol=1e-12)
    assert torch.allclose(exp.matrix() * 9, red.matrix(), atol=1e-12)
    # one sample: no averaging over samples to decouple, so "reduce" is the exact block
    one = kronecker_factors(model, "0", loss, (x[:1], y[:1]), k=3, exact=False, positions="reduce")
    assert torch.allclose(one.matrix(), dense_hessian(model, loss, x[:1], y[:1], names=["0.weight"]), atol=1e-12)
    with pytest.raises(ValueError, match="'expand' or 'reduce'"):
        kronecker_factors(model, "0", loss, (x, y), positions="sum")


def test_kronecker_errors():
    model = mlp()
    x, y = batch()
    with pytest.raises(TypeError, match="supports nn.Linear and nn.Conv2d"):
        kronecker_factors(model, "1", nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="no module named 'fc'"):
        kronecker_factors(model, "fc", nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="reduction='mean'"):
        kronecker_factors(model, "0", nn.CrossEntropyLoss(reduction="sum"), (x, y))


# ---------------------------------------------------------------------------------------------
# loss landscape
# ---------------------------------------------------------------------------------------------

class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2, self.drop = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3), nn.Dropout(0.5)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_landscape_restores_parameters_bit_exactly_and_leaves_mode_and_bn_alone(bn_mode):
    torch.manual_seed(0)
    model = BNNet().to(DT)
    x, y = batch(n=16)
    model.train()
    model(x)  # non-trivial running stats
    before = _snapshot(model)
    ls = loss_landscape(model, nn.CrossEntropyLoss(), (x, y), "random", num_directions=2, steps=5, bn_mode=bn_mode)
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model.drop.training
    assert ls.losses.shape == (5, 5) and ls.ndim == 2
    assert ls.losses[2, 2] == pytest.approx(ls.center_loss, abs=1e-12)  # the center is the grid's middle


def test_landscape_restores_parameters_when_the_loss_raises():
    model = mlp()
    x, y = batch()
    before = _snapshot(model)
    calls = {"n": 0}

    def flaky(out, t):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, t)

    d = torch.ones(sum(p.numel() for p in model.parameters()), dtype=DT)
    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape(model, flaky, (x, y), d, steps=7, distance=0.3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_landscape_along_top_eigenvector_of_a_quadratic_is_exact():
    # linear regression with MSE: L(theta + a v) = L + a g.v + a^2/2 v^T H v exactly
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, 1, generator=g, dtype=DT)
    loss = nn.MSELoss()
    ls = loss_landscape(model, loss, (x, t), "top", steps=9, distance=(-1.0, 2.0))
    op = hessopt.HessianOperator(model, loss, (x, t))
    lam, v = float(ls.eigenvalues[0]), None
    H = op.to_dense()
    evals, evecs = torch.linalg.eigh(H)
    assert lam == pytest.approx(float(evals[-1]), rel=1e-8)
    v = evecs[:, -1]
    gv = float(op.gradient() @ v)
    expected = [ls.center_loss + a * gv * s + 0.5 * lam * a * a for a in ls.alphas.tolist() for s in [1]]
    expected_neg = [ls.center_loss - a * gv + 0.5 * lam * a * a for a in ls.alphas.tolist()]
    got = ls.losses.tolist()
    assert got == pytest.approx(expected, abs=1e-10) or got == pytest.approx(expected_neg, abs=1e-10)  # sign of v
    assert ls.direction_norms[0] == pytest.approx(1.0)


def test_random_directions_are_filter_normalized():
    model = mlp()
    D = random_directions(model, num=2, generator=0)
    assert D.shape == (27, 2)
    w0 = model[0].weight.detach()
    d0 = D[:12, 0].reshape(3, 4)
    assert torch.allclose(d0.norm(dim=1), w0.norm(dim=1), atol=1e-12)
    assert torch.count_nonzero(D[12:15]) == 0  # bias of layer 0
    assert not torch.equal(D[:, 0], D[:, 1])
    plain = random_directions(model, num=1, filter_normalize=False, generator=0)
    assert float(plain.norm()) == pytest.approx(1.0)


def test_landscape_validation():
    model = mlp()
    x, y = batch()
    with pytest.raises(ValueError, match="use 'top', 'random'"):
        loss_landscape(model, nn.CrossEntropyLoss(), (x, y), "sideways")
    with pytest.raises(ValueError, match=r"must have shape \(27,\)"):
        loss_landscape(model, nn.CrossEntropyLoss(), (x, y), torch.ones(5, dtype=DT))
    with pytest.raises(ValueError, match="distance must be positive"):
        loss_landscape(model, nn.CrossEntropyLoss(), (x, y), "random", distance=0.0)
