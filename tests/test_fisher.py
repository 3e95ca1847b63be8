"""EmpiricalFisherOperator (hessopt/operators/fisher.py) against the sum of per-sample gradient outer
products computed one sample at a time with plain autograd, in float64 on tiny models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessopt
from hessopt.operators import flatten

DT = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _data(n=16):
    return _randn(n, 3, seed=1), torch.arange(n) % 3


def outer_product_oracle(model, loss_of_sample, samples) -> torch.Tensor:
    """``(1/N) sum_n g_n g_n^T`` with each ``g_n`` from its own plain backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [flatten(torch.autograd.grad(loss_of_sample(s), params)) for s in samples]
    G = torch.stack(rows)
    return G.T @ G / len(rows)


class ItemLoop(nn.Module):
    """A model vmap cannot run (a data-dependent Python branch on .item())."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(x)
        return torch.tanh(h) if h.sum().item() > -1e9 else h


@pytest.mark.parametrize("per_sample", ["auto", "vmap", "loop"])
def test_empirical_fisher_equals_the_mean_of_per_sample_outer_products(per_sample):
    model, (x, y) = _mlp(), _data(16)
    oracle = outer_product_oracle(model, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), range(16))
    op = hessopt.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), [(x[:10], y[:10]), (x[10:], y[10:])],
                                         per_sample=per_sample)
    torch.testing.assert_close(op.to_dense(), oracle, rtol=1e-10, atol=1e-13)
    assert op.per_sample_method == ("vmap" if per_sample == "auto" else per_sample)
    # its trace is the mean squared per-sample gradient norm, and it is PSD of rank <= N
    single = hessopt.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (x[:4], y[:4])).to_dense()
    assert torch.linalg.matrix_rank(single) <= 4
    assert torch.linalg.eigvalsh(oracle).min() > -1e-12


def test_a_model_vmap_cannot_run_falls_back_to_the_loop():
    torch.manual_seed(0)
    model, (x, y) = ItemLoop().to(DT), _data(6)
    op = hessopt.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (x, y))
    oracle = outer_product_oracle(model, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), range(6))
    torch.testing.assert_close(op.to_dense(), oracle, rtol=1e-10, atol=1e-13)
    assert op.per_sample_method == "loop"
    with pytest.raises(Exception):
        hessopt.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (x, y), per_sample="vmap") @ torch.zeros(12, dtype=DT)


def test_dict_batches_and_loss_fn_of_model_and_batch():
    class Out(dict):
        __getattr__ = dict.get

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(5, 3), nn.Linear(3, 5)

        def forward(self, input_ids, labels=None):
            logits = self.head(torch.tanh(self.embed(input_ids)))
            return Out(logits=logits, loss=F.cross_entropy(logits.flatten(0, -2), labels.flatten()))

    torch.manual_seed(0)
    model = TinyLM().to(DT)
    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 5, (5, 3), generator=gen), "labels": torch.randint(0, 5, (5, 3), generator=gen)}

    def sample(i):
        return model(**{k: v[i : i + 1] for k, v in batch.items()}).loss

    oracle = outer_product_oracle(model, sample, range(5))
    for op in (hessopt.EmpiricalFisherOperator(model, None, batch),
               hessopt.EmpiricalFisherOperator(model, lambda m, b: m(**b).loss, batch, loss_form="model"),
               hessopt.EmpiricalFisherOperator(model, None, batch, per_sample="loop")):
        torch.testing.assert_close(op.to_dense(), oracle, rtol=1e-10, atol=1e-13)


def test_bn_eval_leaves_everything_untouched_and_train_mode_is_refused(snapshot, assert_unchanged):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
    model.train()
    (x, y) = _data(8)
    before = snapshot(model)
    state = torch.get_rng_state()
    op = hessopt.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (x, y), cache_gradients=False)
    dense = op.to_dense()
    op.gradient(), op.loss()
    assert torch.equal(torch.get_rng_state(), state)
    assert_unchanged(model, before)
    model.eval()
    oracle = outer_product_oracle(model, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), range(8))
    torch.testing.assert_close(dense, oracle, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match=r"batch normalization with batch statistics couples the samples .* use bn_mode='eval'"):
        hessopt.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (x, y), bn_mode="train")
    with pytest.raises(ValueError, match=r"per_sample must be one of \('auto', 'vmap', 'loop'\)"):
        hessopt.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (x, y), per_sample="jacobian")
