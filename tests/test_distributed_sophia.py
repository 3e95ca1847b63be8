"""Sophia and the first-order curvature sources under DistributedDataParallel: 2 real gloo processes.

* Sophia-H and AdaHessian with central finite differences: the 2-rank run on half batches equals one
  process on the whole batches (DDP averages every gradient, including those at perturbed weights;
  the optimizer averages the Hessian estimate), to 1e-10 in float64.
* Sophia-G: labels are sampled per rank from each rank's own logits, so the estimate is another
  draw of the same estimator than one process's (the expectation, the Gauss-Newton diagonal of the
  global mean loss, is the same); the ranks agree bit for bit and the run trains.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKERS = Path(__file__).resolve().parent / "dist_workers"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load("hessopt_dist_common", WORKERS / "common.py")
cases = _load("hessopt_sophia_cases", Path(__file__).resolve().parent / "sophia_cases.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sophia_dist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKERS / "sophia_worker.py"), str(out), str(r), "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for r in range(2)]
    logs = []
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the 2-process job did not finish within 240 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _single(name):
    model = common.build_model()
    opt = cases.make(name, model.parameters())
    common.train(model, opt, common.make_batches(), "closure")
    return common.params_of(model)


@pytest.mark.parametrize("name", ["sophia_h", "adahessian_fd"])
def test_two_ranks_equal_one_process_on_the_full_batch(ranks, name):
    want = _single(name)
    for r in ranks:
        for a, b in zip(r[name], want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sophia_g_ranks_agree_and_train(ranks):
    start = common.params_of(common.build_model())
    a, b = ranks[0]["sophia_g"], ranks[1]["sophia_g"]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, s) for x, s in zip(a, start))
