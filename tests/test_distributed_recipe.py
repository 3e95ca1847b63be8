"""The image-classification recipe under ``torchrun --nproc_per_node=2`` (gloo, CPU) on digits.

* Without BatchNorm, in float64 (tests/dist_workers/recipe_float64.py runs the recipe's own ``main``
  with float64 parameters and batches), one short epoch on 2 processes equals 1 process with the
  same global batch: parameters, training loss and the curvature monitor's eigenvalues and trace
  to ~1e-13 (not bit for bit: the ranks' gradients are summed in another order). In float32 the
  same runs differ by rounding that AdaHessian amplifies where a curvature estimate is a small
  difference of large terms (measured after one step: 9e-4 on a conv bias; 1 vs 2 OpenMP threads
  in one process: 6e-5), so the sharp comparison is made in float64.
* With BatchNorm (float32, the recipe's default), the runs are *not* expected to agree (each rank
  normalizes with its own shard's batch statistics); what must hold is that the logged validation
  metrics are those of the checkpoint (rank 0's model, whose running statistics every rank uses
  for evaluation).
* Only rank 0 logs and writes files.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "image_classification" / "train.py"
FLOAT64 = ROOT / "tests" / "dist_workers" / "recipe_float64.py"
COMMON = ["--dataset", "digits", "--model", "digits_cnn", "--epochs", "1", "--batch-size", "64",
          "--max-steps-per-epoch", "3", "--device", "cpu", "--no-progress", "--no-plots", "--no-tensorboard"]


def _run(script: Path, args, out: Path, nproc: int) -> str:
    """``torchrun --standalone`` (a free rendezvous port of its own) for nproc > 1, plain python for 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run(launcher + [str(script), *args, "--output-dir", str(out)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _records(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    args = COMMON + ["--no-batchnorm", "--curvature-every", "3", "--curvature-k", "2",
                     "--curvature-trace-matvecs", "8", "--curvature-batch-size", "64"]
    two_log = _run(FLOAT64, args, tmp_path / "two", nproc=2)
    _run(FLOAT64, args, tmp_path / "one", nproc=1)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    for name, want in one["model"].items():
        torch.testing.assert_close(two["model"][name], want, rtol=1e-10, atol=1e-12, msg=name)
    (m2,), (m1,) = _records(tmp_path / "two" / "metrics.jsonl"), _records(tmp_path / "one" / "metrics.jsonl")
    assert m2["step"] == m1["step"] == 3
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-12)
    assert m2["train_acc"] == m1["train_acc"] and m2["val_acc"] == m1["val_acc"]
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-6)  # evaluation sums float32 losses
    # the curvature monitor on the held-out images, split over the ranks, during AdaHessian training
    c2, c1 = _records(tmp_path / "two" / "curvature.jsonl"), _records(tmp_path / "one" / "curvature.jsonl")
    assert [r["step"] for r in c2] == [r["step"] for r in c1] == [0, 3]
    for r2, r1 in zip(c2, c1):
        assert r2["top_eigenvalues"] == pytest.approx(r1["top_eigenvalues"], rel=1e-9)
        assert r2["trace"] == pytest.approx(r1["trace"], rel=1e-9)
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-12)
    # rank 0 alone logs and writes
    assert two_log.count("epoch 1/1") == 1 and "2 process(es)" in two_log
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        ["checkpoint.pt", "config.json", "curvature.jsonl", "metrics.jsonl"]


def test_with_batchnorm_the_logged_validation_is_the_checkpoints(tmp_path):
    _run(RECIPE, COMMON, tmp_path / "bn", nproc=2)
    (record,) = _records(tmp_path / "bn" / "metrics.jsonl")
    checkpoint = torch.load(tmp_path / "bn" / "checkpoint.pt", weights_only=False)

    spec = importlib.util.spec_from_file_location("image_recipe_for_test", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    spec.loader.exec_module(recipe)
    data = recipe.load_dataset("digits")
    net = recipe.build_model(**checkpoint["model_args"])
    net.load_state_dict(checkpoint["model"])
    loader = recipe.DeviceLoader(data.test_x, data.test_y, 1000, data.mean, data.std)
    val_loss, val_acc = recipe.evaluate(net, loader, torch.nn.CrossEntropyLoss(), recipe.contextlib.nullcontext,
                                        recipe.Dist(), torch.device("cpu"))
    assert record["val_acc"] == val_acc
    assert record["val_loss"] == pytest.approx(val_loss, rel=1e-6)
