"""AdaHessian and Sophia on FSDP2 (``fully_shard``, DTensor parameters): 2 real gloo processes on CPU.

The worker (tests/dist_workers/fsdp_worker.py) shards a tiny float64 model whose every parameter
has an odd dim 0 (uneven ``Shard(0)`` chunks; one parameter of a single row leaves rank 1 an empty
chunk) and trains it with the user's closure unchanged, each rank on half of every batch.

Tolerances (float64, eps = 2.2e-16). The 2-rank gradients are FSDP's average of two half-batch
gradients, the 1-process gradient is one pass over the whole batch: the same number up to summation
order, |dg| <~ eps * |g|. A finite difference turns that into an error dg / h of ``Hz``, with
h = c (1 + ||theta||) / ||z||, ||z|| = sqrt(74) for the 74 entries here, ||theta|| ~ 2:
central (c = eps^(1/3)): h ~ 2e-6, curvature error ~ 1e-10 |g|; forward (c = eps^(1/2)):
h ~ 5e-9, error ~ 4e-8 |g|. The steps divide by the curvature and multiply by lr (0.05 AdaHessian,
0.02 Sophia), over 5 steps (2 curvature steps for Sophia): about 1e-12 (central) and 1e-9
(forward) in the parameters; measured 3.2e-12 and 3.2e-10. The tests allow 30x that: 1e-10 for
central differences, 1e-8 for forward ones.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import hessopt

WORKERS = Path(__file__).resolve().parent / "dist_workers"
_launcher = importlib.util.spec_from_file_location("hessopt_two_ranks", WORKERS / "two_ranks.py")
_two_ranks = importlib.util.module_from_spec(_launcher)
_launcher.loader.exec_module(_two_ranks)
_spec = importlib.util.spec_from_file_location("hessopt_fsdp_worker", WORKERS / "fsdp_worker.py")
fsdp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fsdp)

pytest.importorskip("torch.distributed.fsdp")


def _launch(out: Path, mode: str, limit: float):
    return _two_ranks.launch(WORKERS / "fsdp_worker.py", out, mode, limit)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    procs, logs, _ = _launch(out, "train", 300)
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _single(name):
    model = fsdp.build_model()
    opt = fsdp.make_opt(name, model.parameters())
    fsdp.train(model, opt, fsdp.make_batches())
    return [p.detach() for p in model.parameters()]


def test_shards_are_uneven(ranks):
    shapes = [r["sophia_fd_local_shapes"] for r in ranks]
    assert shapes[0] == [(1,), (4, 6), (4,), (2, 7), (2,)]
    assert shapes[1] == [(0,), (3, 6), (3,), (1, 7), (1,)]  # rank 1's chunk of the 1-row scale is empty


@pytest.mark.parametrize("name, tol", [("adahessian_fd", 1e-10), ("sophia_fd", 1e-8)])
def test_two_ranks_equal_one_process_on_the_full_batch(ranks, name, tol):
    want = _single(name)
    start = [p.detach() for p in fsdp.build_model().parameters()]
    for r in ranks:
        for a, b in zip(r[name], want):
            torch.testing.assert_close(a, b, rtol=0, atol=tol)
    assert max((a - s).abs().max().item() for a, s in zip(want, start)) > 0.05  # it trained


def test_sophia_g_trains_and_its_explicit_form_takes_the_closures_steps(ranks):
    # (each shard lives on one rank, and the gathered parameters are one all-gather: the ranks cannot
    # disagree on them, so there is nothing to compare between ranks here)
    start = [p.detach() for p in fsdp.build_model().parameters()]
    a = ranks[0]["sophia_g"]
    assert all(torch.isfinite(x).all() for x in a)
    assert max((x - s).abs().max().item() for x, s in zip(a, start)) > 0.05
    # the explicit form (opt.capture(), then opt.step()) takes the same steps as the closure form
    assert all(torch.equal(x, y) for x, y in zip(a, ranks[0]["sophia_g_capture"]))


def test_sophia_g_under_bfloat16_mixed_precision_trains_and_ranks_agree(ranks):
    """FSDP2's MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32): the parameters and
    Sophia's moments stay float32 shards and the model trains (finite, moved). Not compared with one
    process: the bfloat16 forward of two half batches and of the whole batch round differently."""
    start = [p.detach().float() for p in fsdp.build_model().parameters()]
    a = ranks[0]["sophia_g_bf16"]
    assert a["param_dtype"] == a["moment_dtype"] == "torch.float32"
    assert all(torch.isfinite(x).all() for x in a["params"])
    assert max((x - s).abs().max().item() for x, s in zip(a["params"], start)) > 0.05


def test_gnb_on_shards_is_the_one_process_estimate_for_the_same_labels(ranks):
    """B * g_hat^2 with g_hat FSDP's rank average of the sampled loss's gradient and B the global
    number of predictions = the 1-process estimator on the whole batch, for the same labels."""
    model = fsdp.build_model()
    x, _ = fsdp.make_batches()[0]
    labels = torch.arange(fsdp.BATCH) % 3
    want = hessopt.GaussNewtonBartlett.for_labels(list(model.parameters()), model(x), labels)
    assert len(want) == 5 and all(w.abs().max() > 0 for w in want)
    for r in ranks:
        for a, b in zip(r["gnb_fixed_labels"], want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_hutchinson_refuses_sharded_parameters_naming_the_sources_that_work(ranks):
    for message in ranks[0]["refusals"].values():
        assert "sharded DTensor parameter (FSDP2's fully_shard" in message
        assert "curvature='gnb'" in message and "curvature='finite_difference'" in message


def test_a_nan_batch_on_one_rank_raises_on_every_rank_and_changes_nothing(ranks):
    assert ranks[1]["nan_batch"].startswith("NonFiniteError: Sophia: the loss of this step is not finite")
    assert ranks[0]["nan_batch"].startswith("NonFiniteError: Sophia: the gradient of this step is not finite")
    assert ranks[0]["nan_batch_unchanged"] and ranks[1]["nan_batch_unchanged"]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["after_nan"], ranks[1]["after_nan"]))


def test_checkpoint_through_dcp_resumes_bit_identically(ranks):
    for r in ranks:
        d = r["dcp"]
        assert d["steps"] == (5, 5)
        assert all(torch.equal(a, b) for a, b in zip(d["straight"], d["resumed"]))
        # the control: the loaded moments and generators matter
        assert not all(torch.equal(a, b) for a, b in zip(d["straight"], d["fresh_optimizer"]))


def test_optimizer_state_is_sharded(ranks):
    single = fsdp.build_model()
    opt = fsdp.make_opt("sophia_fd", single.parameters())
    fsdp.train(single, opt, fsdp.make_batches()[:1])
    whole = fsdp.state_bytes(opt)
    per_rank = [r["sophia_fd_state_bytes"] for r in ranks]
    assert sum(per_rank) == whole and max(per_rank) < whole


def test_an_exception_in_one_ranks_closure_fails_every_rank_without_a_hang(tmp_path):
    procs, logs, seconds = _launch(tmp_path, "closure_error", 200)
    assert [p.returncode for p in procs] == [3, 3], "\n".join(logs)
    assert (tmp_path / "error1.txt").read_text() == "RuntimeError: the user's closure failed on this rank"
    assert (tmp_path / "error0.txt").read_text().startswith("RuntimeError")
