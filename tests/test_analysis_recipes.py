"""The reproduction scripts in recipes/analysis run end to end (tiny scale: digits, a few steps, CPU)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "analysis"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"hessopt_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module




def test_pyhessian_bn_residual_smoke(tmp_path):
    res = _load("pyhessian_bn_residual").main([
        "--device", "cpu", "--dataset", "digits", "--depths", "8", "--epochs", "1", "--max-steps-per-epoch", "2",
        "--batch-size", "32", "--hessian-samples", "32", "--hessian-batch", "32", "--trace-matvecs", "4",
        "--density-steps", "5", "--out", str(tmp_path)])
    assert [r["name"] for r in res["runs"]] == ["resnet8", "resnet8_plain", "resnet8_noBN", "resnet8_noBN_plain"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert all("top_eigenvalue" in r and "trace_std_error" in r for r in saved["runs"])
    assert (tmp_path / "pyhessian_density.png").exists() and (tmp_path / "summary.md").exists()
    assert (tmp_path / "pyhessian_esd_grid.png").exists()
    merged = _load("pyhessian_bn_residual").main(["--merge", str(tmp_path), "--out", str(tmp_path / "m"), "--no-plots"])
    assert [r["name"] for r in merged["runs"]] == [r["name"] for r in res["runs"]]


def test_ghorbani_outliers_smoke(tmp_path):
    res = _load("ghorbani_outliers").main([
        "--device", "cpu", "--dataset", "digits", "--model", "cifar_resnet8", "--epochs", "1",
        "--max-steps-per-epoch", "2", "--batch-size", "32", "--every", "2", "--k", "2", "--max-matvecs", "12",
        "--hessian-samples", "32", "--hessian-batch", "32", "--density-steps", "5", "--out", str(tmp_path)])
    for run in res["runs"].values():
        assert [r["step"] for r in run["records"]] == [0, 2]
        assert all(0.0 <= r["concentration"] <= 1.0 for r in run["records"])
    assert (tmp_path / "ghorbani.png").exists()


def test_dissecting_hessian_smoke(tmp_path):
    res = _load("dissecting_hessian").main([
        "--archs", "cnn", "--seeds", "0", "1", "--epochs", "1", "--num-samples", "32", "--k", "2",
        "--out", str(tmp_path)])
    ov = res["overlaps"]["cnn"]["conv2"]
    assert 0.0 <= ov["full"] <= 1.0 and ov["chance_full"] == pytest.approx(2 / (32 * 16 * 9))
    layer = res["models"]["cnn_bn"][0]["layers"]["conv2"]
    assert "kron_reduce_exact_overlap" in layer and layer["top_eigvec_stable_rank"] >= 1.0
    assert (tmp_path / "dissecting_summary.png").exists()


def test_prune_by_sensitivity_smoke(tmp_path):
    res = _load("prune_by_sensitivity").main([
        "--seeds", "0", "--epochs", "1", "--num-probes", "3", "--sparsities", "0.3", "0.9", "--out", str(tmp_path)])
    pruning = res["models"][0]["pruning"]
    assert set(pruning) == {"magnitude", "obd", "channel-trace", "avg-trace", "channel-norm", "channel-hessian",
                            "channel-quadratic"}
    assert all(len(r["accuracy"]) == 2 for r in pruning.values())
    # equal sparsity: every unstructured method removes the same number of weights
    assert len({tuple(pruning[m]["params_removed"]) for m in ("magnitude", "obd", "channel-trace", "avg-trace")}) == 1
    assert pruning["magnitude"]["params_removed"][0] == round(0.3 * (144 + 4608 + 320))
    assert [b["name"] for b in res["models"][0]["sensitivity"]["blocks"]] == ["conv1", "conv2", "fc"]
    assert (tmp_path / "prune_by_sensitivity.png").exists() and (tmp_path / "summary.md").exists()
    merged = _load("prune_by_sensitivity").main(["--merge", str(tmp_path), "--out", str(tmp_path / "m"), "--no-plots"])
    assert merged["config"]["seeds"] == [0] and "unstructured" in (tmp_path / "m" / "summary.md").read_text()
