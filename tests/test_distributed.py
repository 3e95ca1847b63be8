"""hessopt under torch.distributed: real processes (2 ranks, gloo, CPU, float64) against one process.

One 2-process job (tests/dist_workers/worker.py, launched once per module) runs every distributed
scenario; each test below compares its results with a single-process oracle computed here, in a
process without a process group:

* AdaHessian on a DistributedDataParallel model, each rank half of every batch, the user's loop
  unchanged (closure and explicit ``create_graph=True``; ``update_each`` 1 and 2; gradient
  accumulation with ``no_sync``; an optimizer built before ``init_process_group``; DDP over a
  one-process subgroup) equals one process on the whole batches to 1e-10 (measured: 1e-15, and
  5e-14 with accumulation, whose micro-batches sum in another order).
* HessianOperator over sharded data (equal 8/8 and uneven 9/7 shards, one rank with two batches)
  gives the full-batch dense Hessian, gradient, loss, top eigenvalues, trace and spectral density.
* Bad input raises the same error on every rank (checked with ``pytest.raises(match=)`` in the
  worker, where it is raised), and the job goes on to a final barrier.

Rendezvous is through a file in the test's temporary directory (no port to collide on when test
runs overlap); the job has a wall-clock limit and gloo collectives time out after 60 s.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hessopt
from hessopt.distributed import OptimizerSync, all_reduce_sum, broadcast_object

WORKERS = Path(__file__).resolve().parent / "dist_workers"
WORLD = 2
TOL = 1e-10

_spec = importlib.util.spec_from_file_location("hessopt_dist_common", WORKERS / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _launch(out: Path, timeout: float = 240.0):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(WORKERS / "worker.py"), str(out), str(rank), str(WORLD)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {WORLD}-process job did not finish within {timeout:.0f} s")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]




@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of every rank of the one distributed job."""
    return _launch(tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def batches():
    return common.make_batches()


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _same_on_all_ranks(ranks, key) -> None:
    first = ranks[0][key]
    for r in ranks[1:]:
        other = r[key]
        if isinstance(first, list):
            assert all(torch.equal(x, y) for x, y in zip(first, other)), key
        elif isinstance(first, dict):
            for k, v in first.items():
                assert torch.equal(v, other[k]) if torch.is_tensor(v) else v == other[k], (key, k)
        else:
            assert torch.equal(first, other) if torch.is_tensor(first) else first == other, key


# -- AdaHessian under DDP ---------------------------------------------------------------------------


@pytest.mark.parametrize("update_each", [1, 2])
@pytest.mark.parametrize("mode", ["closure", "explicit"])
def test_ddp_adahessian_equals_one_process_on_the_whole_batch(ranks, batches, mode, update_each):
    want = common.reference_run(mode, update_each, batches)
    key = f"ddp/{mode}/{update_each}"
    _same_on_all_ranks(ranks, key)  # every rank took the same steps, bit for bit
    assert _max_diff(ranks[0][key], want) < TOL
    # sharp: one process on one rank's half of each batch ends far away
    half = common.reference_run(mode, update_each, [common.shard(b, 0, common.BATCH // WORLD) for b in batches])
    assert _max_diff(half, want) > 1e-3


@pytest.mark.parametrize("mode", ["closure", "explicit"])
def test_no_sync_accumulation_equals_the_whole_batch(ranks, batches, mode):
    """Two micro-batches per rank (loss / 2 each), the first under ddp.no_sync(): the summed local
    gradient and graph, then one all-reduce, equal one process on the whole batch."""
    key = f"accumulate/{mode}"
    _same_on_all_ranks(ranks, key)
    assert _max_diff(ranks[0][key], common.reference_run(mode, 1, batches)) < TOL


def test_optimizer_built_before_init_process_group(ranks, batches):
    _same_on_all_ranks(ranks, "late_init")
    assert _max_diff(ranks[0]["late_init"], common.reference_run("closure", 1, batches)) < TOL


def test_ddp_over_a_one_process_subgroup_trains_each_rank_alone(ranks, batches):
    """distributed=<the DDP group>: the curvature is averaged over DDP's group only (here one
    process, which is also DDP with a single process: its reducer must not see graph gradients)."""
    per_rank = common.BATCH // WORLD
    for rank, result in enumerate(ranks):
        local = [common.shard(b, rank * per_rank, (rank + 1) * per_rank) for b in batches]
        assert _max_diff(result["subgroup"], common.reference_run("explicit", 1, local)) < TOL


def test_optimizer_on_a_process_group_deep_copies_but_does_not_pickle(ranks):
    """copy.deepcopy shares the group; pickle.dumps is refused with advice (save state_dict())."""
    for result in ranks:
        assert result["subgroup/deepcopy_shares_group"] is True
        assert re.search(r"distributed=<a ProcessGroup>, which cannot be pickled.*state_dict\(\)",
                         result["subgroup/pickle"])


def test_hessian_operator_between_ddp_adahessian_steps(ranks, batches):
    """An HVP diagnostic on the DDP model after step 2 is the full-batch Hessian there, and the run
    (which went on to step 5) still equals the undisturbed single-process run."""
    data = common.make_batches(1, common.BATCH, seed=5)[0]
    dense = {}

    def after_step(step, model):
        if step == 1:
            dense["want"] = hessopt.HessianOperator(model, common.loss_fn, data).to_dense()

    common.reference_run("closure", 1, batches, after_step)
    for result in ranks:
        torch.testing.assert_close(result["during/dense"], dense["want"], rtol=0, atol=1e-12)


# -- diagnostics over sharded data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_batch():
    """The single-process operator on the whole probe batch, and its diagnostics."""
    data = common.make_batches(1, common.BATCH, seed=5)[0]
    op = hessopt.HessianOperator(common.build_model(), common.loss_fn, data)
    return {"op": op, "data": data, "dense": op.to_dense(), **common.diagnostics(op)}


def _assert_diagnostics_equal(got, want) -> None:
    for key in ("top", "density_nodes", "density_weights", "gradient"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12, msg=key)
    for key in ("trace", "hutchinson", "loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), key


def test_sharded_operator_equals_the_full_batch(ranks, full_batch):
    """Equal shards (8 + 8): same probes on both ranks (int seed), HVPs averaged: top eigenvalues,
    Hutch++ and Hutchinson traces, spectral density, gradient, loss and the dense Hessian."""
    for result in ranks:
        _assert_diagnostics_equal(result["op/equal"], full_batch)
        torch.testing.assert_close(result["op/equal/dense"], full_batch["dense"], rtol=0, atol=1e-12)


def test_uneven_shards_are_weighted_by_sample_count(ranks, full_batch):
    """9 samples on rank 0 (as two batches, 5 + 4) and 7 on rank 1 give the Hessian of all 16."""
    for result in ranks:
        _assert_diagnostics_equal(result["op/uneven"], full_batch)
        torch.testing.assert_close(result["op/uneven/dense"], full_batch["dense"], rtol=0, atol=1e-12)
    # sharp: the unweighted mean of the two shards' Hessians is a different matrix
    model, data = common.build_model(), full_batch["data"]
    h9 = hessopt.HessianOperator(model, common.loss_fn, common.shard(data, 0, 9)).to_dense()
    h7 = hessopt.HessianOperator(model, common.loss_fn, common.shard(data, 9, 16)).to_dense()
    torch.testing.assert_close((9 * h9 + 7 * h7) / 16, full_batch["dense"], rtol=0, atol=1e-12)
    assert ((h9 + h7) / 2 - full_batch["dense"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(common.OTHER_OPERATORS))
def test_ggn_fisher_and_finite_differences_average_over_ranks(ranks, full_batch, name):
    """GGNOperator, EmpiricalFisherOperator and the finite-difference Hessian on the uneven shards
    (5 + 4 samples on rank 0, 7 on rank 1) equal the single-process operator on all 16."""
    want = common.OTHER_OPERATORS[name](common.build_model(), full_batch["data"]).to_dense()
    tol = 1e-7 if name == "finite_difference" else 1e-12
    for result in ranks:
        torch.testing.assert_close(result[f"op/{name}/dense"], want, rtol=0, atol=tol)


def test_an_empty_shard_counts_for_nothing(ranks, full_batch):
    """Rank 0 holds all 16 samples, rank 1 an empty list: both get the Hessian of the 16."""
    exact = torch.linalg.eigvalsh(full_batch["dense"])[-1]
    for result in ranks:
        torch.testing.assert_close(result["op/empty_shard/dense"], full_batch["dense"], rtol=0, atol=1e-12)
        torch.testing.assert_close(result["op/empty_shard/top"][0], exact, rtol=1e-8, atol=0)


def test_default_generator_gives_the_same_probes_on_every_rank(ranks, full_batch):
    """generator=None: each rank draws a seed, rank 0's is broadcast, so all ranks agree."""
    _same_on_all_ranks(ranks, "op/none/top")
    _same_on_all_ranks(ranks, "op/none/trace")
    exact = torch.linalg.eigvalsh(full_batch["dense"])[-1]
    torch.testing.assert_close(ranks[0]["op/none/top"][0], exact, rtol=1e-5, atol=0)  # tol=1e-5


def test_distributed_false_is_this_ranks_hessian(ranks, full_batch):
    per_rank = common.BATCH // WORLD
    for rank, result in enumerate(ranks):
        local = common.shard(full_batch["data"], rank * per_rank, (rank + 1) * per_rank)
        want = hessopt.HessianOperator(common.build_model(), common.loss_fn, local).to_dense()
        torch.testing.assert_close(result["op/local/dense"], want, rtol=0, atol=1e-12)


def test_operator_on_a_ddp_model_unwraps_it_and_training_goes_on(ranks, full_batch, batches):
    for result in ranks:
        torch.testing.assert_close(result["op/ddp/dense"], full_batch["dense"], rtol=0, atol=1e-12)
        assert _max_diff(result["op/ddp/after_step"], common.reference_run("closure", 1, batches[:1])) < TOL


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(common.BAD_INPUT))
def test_bad_input_is_a_clear_error_on_every_rank(ranks, name):
    """Different seeds, update_each, optimizer state, parameter lists or values (AdaHessian,
    checked at the first step), different probe vectors (HessianOperator, every product), an
    error in one rank's share of a product, every shard empty, and FSDP2's sharded DTensor
    parameters (AdaHessian's constructor)."""
    for rank, result in enumerate(ranks):
        assert result[f"error/{name}"] == "ok", f"rank {rank}: {result[f'error/{name}']}"


def test_an_operator_error_on_one_rank_is_raised_on_every_rank(ranks):
    """Rank 1's loss is NaN: rank 1 raises its own error, rank 0 (which would otherwise wait in the
    collective forever) a DistributedOperatorError that quotes it; then both go on (the job ends)."""
    assert ranks[0]["error/operator_rank_failure/type"] == "DistributedOperatorError"
    assert ranks[1]["error/operator_rank_failure/type"] == "NonFiniteCurvatureError"


# -- one process, no process group ---------------------------------------------------------------------


def test_without_a_process_group_the_hooks_are_inert():
    model = common.build_model()
    opt = hessopt.AdaHessian(model.parameters(), **common.OPT_ARGS)
    assert isinstance(opt._distributed, OptimizerSync)  # installed, for a later init_process_group
    x, y = common.make_batches(1)[0]
    common.loss_fn(model(x), y).backward(create_graph=True)
    assert all(p.grad.requires_grad for p in model.parameters())  # autograd's own behaviour
    assert opt._distributed._kept == {}
    opt.step()


def test_launched_by_torchrun_without_a_process_group_warns_once(monkeypatch):
    """torchrun sets WORLD_SIZE; without init_process_group each process would silently train alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = common.build_model()
    opt = hessopt.AdaHessian(model.parameters(), **common.OPT_ARGS)
    x, y = common.make_batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = common.loss_fn(model(x), y)
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match=r"WORLD_SIZE=2\) but no torch.distributed process group"):
        opt.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)  # once only
        hessopt.AdaHessian(model.parameters(), distributed=False).step(closure)  # opted out: silent


def test_distributed_false_installs_nothing():
    opt = hessopt.AdaHessian(common.build_model().parameters(), distributed=False)
    assert opt._distributed is None


def test_distributed_true_without_a_process_group_raises():
    model = common.build_model()
    opt = hessopt.AdaHessian(model.parameters(), distributed=True, **common.OPT_ARGS)
    x, y = common.make_batches(1)[0]
    common.loss_fn(model(x), y).backward(create_graph=True)
    with pytest.raises(ValueError, match=r"distributed=True.*no torch.distributed process group"):
        opt.step()
    op = hessopt.HessianOperator(model, common.loss_fn, (x, y), distributed=True)
    with pytest.raises(ValueError, match=r"distributed=True but no torch.distributed process group"):
        op @ torch.zeros(op.num_params, dtype=op.dtype)


def test_distributed_argument_is_checked():
    with pytest.raises(TypeError, match=r"distributed must be None \(automatic\), True, False or a"):
        hessopt.AdaHessian(common.build_model().parameters(), distributed="yes")


def test_ddp_without_a_process_group_is_torchs_error():
    """DDP cannot be built before init_process_group (torch's own error, which names the fix); an
    optimizer can, and works once the group exists (test_optimizer_built_before_init_process_group)."""
    with pytest.raises((ValueError, RuntimeError), match="init_process_group"):
        nn.parallel.DistributedDataParallel(common.build_model())


def test_collective_helpers_without_a_process_group_return_their_input():
    t = [torch.ones(3), torch.zeros(2, dtype=torch.float64)]
    assert all(a is b for a, b in zip(all_reduce_sum(t), t))
    assert broadcast_object({"seed": 4}) == {"seed": 4}
