"""The diagnostics on FSDP2 (``fully_shard``): 2 real gloo processes on CPU against one process.

The worker (tests/dist_workers/fsdp_operator_worker.py) builds ``HessianOperator(method=
"finite_difference")`` on fsdp_worker's sharded float64 net (74 parameters, uneven chunks, one empty
on rank 1) with uneven data shards (rank 0: 7 + 2 samples, rank 1: 3 + 4), and on every rank a
one-process reference with all 16 samples: the exact (double-backward) Hessian and its dense matrix,
and the dense GGN for ``GGNOperator(method="finite_difference")`` on the sharded model.

Tolerance. Central differences in float64 with the default step ``r = eps^(1/3)`` (6.1e-6) have a
relative error of order ``eps^(2/3)`` ~ 4e-11 at unit third-derivative scale (the step's docstring);
the two ranks' gradients are FSDP's average of two partial gradients, equal to the one-process
gradient up to summation order (~eps |g|, i.e. ~eps |g| / (r ||theta||) ~ 4e-11 in a product). The
measured errors are 1e-11 to 2e-10 (CG on a damped system included); the tests allow 1e-8 relative.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")

WORKERS = Path(__file__).resolve().parent / "dist_workers"
_launcher = importlib.util.spec_from_file_location("hessopt_two_ranks", WORKERS / "two_ranks.py")
_two_ranks = importlib.util.module_from_spec(_launcher)
_launcher.loader.exec_module(_two_ranks)
TOL = 1e-8


def _launch(out: Path, mode: str, limit: float):
    procs, logs, _ = _two_ranks.launch(WORKERS / "fsdp_operator_worker.py", out, mode, limit)
    return procs, logs


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_diagnostics")
    procs, logs = _launch(out, "diagnostics", 300)
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_vectors_are_sharded_like_the_parameters(ranks):
    assert [r["local_shapes"] for r in ranks] == [[(1,), (4, 6), (4,), (2, 7), (2,)],
                                                  [(0,), (3, 6), (3,), (1, 7), (1,)]]
    assert [r["local_size"] for r in ranks] == [45, 29] and ranks[0]["num_params"] == 74
    # the Lanczos basis holds this process's entries only: memory per process falls with processes
    assert [r["lanczos_basis_shape"] for r in ranks] == [(45, 10), (29, 10)]


def test_products_gradient_and_loss_equal_one_process(ranks):
    for r in ranks:
        assert _rel(r["product"], r["product_exact"]) < TOL
        assert _rel(r["gradient"], r["gradient_exact"]) < 1e-12  # no finite difference in a gradient
        assert abs(r["loss"] - r["loss_exact"]) < 1e-14


def test_top_eigenvalues_equal_the_dense_hessians(ranks):
    want = torch.linalg.eigvalsh(ranks[0]["dense"]).flip(0)
    for r in ranks:
        assert r["top_converged"]
        torch.testing.assert_close(r["top"], want[:3], rtol=TOL, atol=0)
        torch.testing.assert_close(r["power"], want[:2], rtol=TOL, atol=0)
    assert ranks[0]["top_matvecs"] == ranks[1]["top_matvecs"]


def test_train_sharded_then_analyze_sharded_equals_one_process(ranks):
    """5 AdaHessian steps (central differences) on the sharded model in the user's loop, then the top
    eigenvalues of the trained model's Hessian by sharded finite differences, against the same
    training in one process and the exact dense Hessian (the parameters agree to ~1e-11, see
    tests/test_fsdp.py; the eigenvalues to the finite-difference tolerance)."""
    for r in ranks:
        assert r["trained_moved"] > 0.05  # it trained
        torch.testing.assert_close(r["trained_top"], r["trained_top_one_process"], rtol=TOL, atol=0)


def test_eigenvectors_are_shards_of_the_true_ones(ranks):
    # <u_sharded, u_true> summed over the two ranks' rows is +-1 for each eigenvector
    overlap = sum((r["top_vectors"] * r["top_vectors_exact"]).sum(0) for r in ranks)
    torch.testing.assert_close(overlap.abs(), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-7)


def test_trace_diagonal_density_and_solve_equal_one_process(ranks):
    for r in ranks:
        # fixed probes (each rank passes its rows): the exact Hessian's Hutchinson estimate
        assert abs(r["trace_fixed"] - r["trace_fixed_exact"]) < TOL * abs(r["trace_fixed_exact"])
        # random probes: the sharded draw is a function of the global vector (the one-process
        # operator drawing per parameter gets the same probes and the same estimate)
        assert abs(r["hutchpp"].estimate - r["hutchpp_one_process"].estimate) < TOL * abs(r["hutchpp_exact"].estimate)
        assert abs(r["hutchpp"].estimate - r["hutchpp_exact"].estimate) < TOL * abs(r["hutchpp_exact"].estimate)
        assert _rel(r["diagonal"], r["diagonal_exact"]) < TOL
        for a, b in zip(r["slq_nodes"], r["slq_nodes_exact"]):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL * float(b.abs().max()))
        for a, b in zip(r["slq_weights"], r["slq_weights_exact"]):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)
        assert r["solve_converged"] and _rel(r["solve"], r["solve_exact"]) < TOL
    assert ranks[0]["hutchpp"].estimate == ranks[1]["hutchpp"].estimate  # every rank reports the same


def test_ggn_by_finite_differences_equals_the_dense_one_process_ggn(ranks):
    for r in ranks:
        assert _rel(r["ggn_product"], r["ggn_product_exact"]) < TOL
        torch.testing.assert_close(r["ggn_top"], r["ggn_top_exact"], rtol=TOL, atol=0)
        assert abs(r["ggn_trace_fixed"] - r["ggn_trace_fixed_exact"]) < TOL * abs(r["ggn_trace_fixed_exact"])


def test_curvature_summary_equals_one_process(ranks):
    for r in ranks:
        got, want = r["summary"], r["summary_exact"]
        torch.testing.assert_close(got["top_eigenvalues"], want["top_eigenvalues"], rtol=TOL, atol=0)
        for key in ("trace", "loss", "gradient_norm", "gradient_concentration"):
            assert abs(got[key] - want[key]) <= TOL * abs(want[key]), key
    assert ranks[1]["refuse_sensitivity"].startswith("TypeError: hessian_sensitivity (per-parameter blocks")


def test_model_left_as_found(ranks):
    for r in ranks:
        assert r["weights_unchanged"] and r["weights_unchanged_after_nan"]
        assert r["versions_unchanged"]  # moved and restored through .data: a graph the user holds stays valid
        assert r["grads_unchanged"]  # the user's .grad of every parameter, bit for bit
        assert r["params_are_the_dtensors"]  # model.parameters() still yields the sharded DTensors


def test_what_needs_double_backward_is_refused_naming_what_works(ranks):
    r = ranks[0]
    for key in ("refuse_reverse", "refuse_ggn", "refuse_fisher"):
        assert r[key].startswith("TypeError: ") and "sharded DTensor parameters (FSDP2's fully_shard)" in r[key]
        assert "HessianOperator(model, loss_fn, data, method='finite_difference')" in r[key]
        assert "GGNOperator(model, loss_fn, data, method='finite_difference')" in r[key]
    assert r["refuse_dense"].startswith("TypeError: to_dense() needs every entry")
    assert "length 45 (this process's shard of the 74 entries)" in r["refuse_wrong_length"]


def test_a_nan_on_one_rank_raises_on_every_rank_and_the_group_goes_on(ranks):
    for r in ranks:
        assert r["nan"].startswith("NonFiniteCurvatureError: HessianOperator produced NaN/Inf")
        assert _rel(r["after_nan"], r["product_exact"]) < TOL


def test_uneven_batch_counts_are_refused_on_every_rank(tmp_path):
    procs, logs = _launch(tmp_path, "uneven_batches", 200)
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    for r in range(2):
        text = (tmp_path / f"error{r}.txt").read_text()
        assert text.startswith("ValueError: HessianOperator on sharded parameters: the processes hold between 1 and 2")


def test_a_failing_loss_on_one_rank_fails_every_rank_without_a_hang(tmp_path):
    procs, logs = _launch(tmp_path, "loss_error", 200)
    assert [p.returncode for p in procs] == [3, 3], "\n".join(logs)
    assert (tmp_path / "error1.txt").read_text() == "RuntimeError: the user's loss failed on this rank"
    assert (tmp_path / "error0.txt").read_text() != "no error"
