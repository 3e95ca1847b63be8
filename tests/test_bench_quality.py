"""Smoke test of the time-to-quality suite (``benchmarks/run.py --suite quality --quick``) and unit
tests of its analysis (schedule, learning-rate grid, time-to-target interpolation, seed means,
the flattened Muon). No timing or quality assertions: CPU timings on a shared machine mean nothing,
and a few quick steps say nothing about an optimizer.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import REQUIRED_KEYS  # noqa: E402
from benchmarks.quality_optimizers import (  # noqa: E402
    QUALITY_OPTIMIZERS, FlatMuon, lr_grid, quality_specs, warmup_cosine,
)
from benchmarks.quality_workloads import default_data_root  # noqa: E402
from benchmarks.suite_quality import mean_curve, metric_at_time, time_to  # noqa: E402

SUMMARY_KEYS = ("suite", "workload", "optimizer", "best_lr", "seeds", "final_metric", "target", "time_to_target_s",
                "steps_to_target", "time_to_target_ratio")

needs_multi30k = pytest.mark.skipif(not (default_data_root() / "multi30k" / "train.en.gz").exists(),
                                    reason="../shared/data/multi30k is not on this machine")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--suite", "quality", "--quick", "--device", "cpu",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out


def _load(path: Path):
    with open(path) as f:
        return json.load(f)


@needs_multi30k
def test_quick_suite_files_and_records(quick_run):
    for name in ("quality.json", "quality.md", "quality_meta.json", "all.json",
                 "quality_runs_gpt_multi30k_char_quick.json", "quality_runs_cifar10_resnet_quick.json"):
        assert (quick_run / name).is_file(), name
    records = _load(quick_run / "quality.json")
    assert records == [r for r in _load(quick_run / "all.json") if r["suite"] == "quality"]
    by_wl = {}
    for rec in records:
        for k in REQUIRED_KEYS + SUMMARY_KEYS:
            assert k in rec, (rec["workload"], rec["optimizer"], k)
        assert rec["suite"] == "quality" and rec["device"] == "cpu" and "--suite quality" in rec["command"]
        by_wl.setdefault(rec["workload"], []).append(rec)
    assert set(by_wl) == {"gpt_multi30k_char_quick", "cifar10_resnet_quick"}
    for wl, recs in by_wl.items():
        names = {r["optimizer"] for r in recs}
        expected = set(QUALITY_OPTIMIZERS) - ({"sgd"} if wl.startswith("gpt") else set())
        assert names == expected, wl  # every contender has a record: a crash or a missing peer is a result
        targets = {r["target"] for r in recs if r["target"]}
        assert targets == ({"adamw"} if wl.startswith("gpt") else {"adamw", "sgd"})
        for t in targets:
            ref = next(r for r in recs if r["optimizer"] == t and r["target"] == t)
            assert ref["error"] is None and ref["best_lr"] in ref["lr_grid"] and len(ref["lr_grid"]) == 2
            assert ref["seeds"] == [0]
            # the target is the tuned baseline's own final metric, so it reaches it (ratio 1 by definition)
            assert ref["target_metric"] == pytest.approx(ref["final_metric"])
            assert ref["time_to_target_ratio"] == pytest.approx(1.0)
            assert ref["steps_to_target"] <= ref["mean_curve"][-1]["step"]
        for r in recs:
            if r["optimizer"] in ("adamw", "muon", "hessopt_adahessian", "hessopt_adahessian_k10"):
                assert r["error"] is None, (wl, r["optimizer"], r["error"])  # hessopt runs default SDPA kernels
            if r["time_to_target_ratio"] is not None:
                assert r["time_to_target_ratio"] > 0 and r["steps_to_target"] > 0
            if r["error"] is None and r.get("mean_curve"):
                steps = [p["step"] for p in r["mean_curve"]]
                assert steps[0] == 0 and steps == sorted(steps)
                ge = [p["grad_equiv"] for p in r["mean_curve"]]
                assert ge[-1] >= steps[-1] - 1e-9  # at least one gradient per step
    runs = _load(quick_run / "quality_runs_gpt_multi30k_char_quick.json")
    assert {r["phase"] for r in runs} == {"sweep"}
    for r in runs:
        assert r["torch_threads"] == 1 and "loadavg_start" in r
    meta = _load(quick_run / "quality_meta.json")
    assert {m["name"] for m in meta["workloads"]} == set(by_wl)
    assert all(m["hvp_cost"] > 0 for m in meta["workloads"])
    text = (quick_run / "quality.md").read_text()
    assert "Speed-to-quality targets" in text and "gpt_multi30k_char_quick" in text


def test_warmup_cosine_schedule():
    total = 100
    f = [warmup_cosine(i, total) for i in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # 10 warm-up steps
    assert max(f) == pytest.approx(1.0) and f[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # monotone decay after the warm-up


def test_lr_grid_is_log_spaced_and_same_size_for_everyone():
    assert lr_grid(1e-3, quick=False) == pytest.approx([2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3])
    assert lr_grid(0.1, quick=True) == pytest.approx([0.05, 0.1])
    sizes = {len(lr_grid(c, quick=False)) for s in quality_specs() for c in s.centers.values()}
    assert sizes == {5}


def test_time_to_target_interpolates_and_reports_misses():
    curve = [dict(step=0, time_s=0.0, grad_equiv=0.0, metric=4.0), dict(step=10, time_s=2.0, grad_equiv=10.0, metric=3.0),
             dict(step=20, time_s=4.0, grad_equiv=20.0, metric=2.0)]
    hit = time_to(curve, 2.5, higher_is_better=False)
    assert hit == pytest.approx(dict(step=15.0, time_s=3.0, grad_equiv=15.0))
    assert time_to(curve, 1.0, higher_is_better=False) is None
    acc = [dict(c, metric=1.0 - c["metric"] / 4) for c in curve]  # 0, 0.25, 0.5
    assert time_to(acc, 0.375, higher_is_better=True)["step"] == pytest.approx(15.0)
    broken = curve[:2] + [dict(step=20, time_s=4.0, grad_equiv=20.0, metric=None)]
    assert time_to(broken, 2.5, higher_is_better=False) is None  # diverged before the target
    assert metric_at_time(curve, 3.0) == pytest.approx(2.5)
    assert metric_at_time(curve, 9.0) == pytest.approx(2.0)  # ended earlier: its final value


def test_mean_curve_over_seeds():
    def run(ms, ts):
        return dict(curve=[dict(step=10 * i, time_s=t, grad_equiv=float(10 * i), metric=m) for i, (m, t) in
                           enumerate(zip(ms, ts))])

    mc = mean_curve([run([4.0, 3.0, 2.0], [0, 1, 2]), run([4.0, 2.0, 1.0], [0, 3, 6])])
    assert [p["metric"] for p in mc] == pytest.approx([4.0, 2.5, 1.5])
    assert [p["time_s"] for p in mc] == pytest.approx([0.0, 2.0, 4.0])
    mc = mean_curve([run([4.0, 3.0, 2.0], [0, 1, 2]), run([4.0, None, None], [0, 3, 6])])
    assert mc[1]["metric"] is None and mc[2]["metric"] is None


def test_flat_muon_steps_conv_weights_like_muon_on_the_flattened_matrix():
    torch.manual_seed(0)
    w4 = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
    w2 = torch.nn.Parameter(w4.detach().reshape(8, -1).clone())
    g = torch.randn(8, 3, 3, 3)
    opt4 = FlatMuon([w4], lr=0.02, momentum=0.95, weight_decay=0.01)
    opt2 = torch.optim.Muon([w2], lr=0.02, momentum=0.95, weight_decay=0.01)
    for _ in range(3):
        w4.grad, w2.grad = g.clone(), g.reshape(8, -1).clone()
        opt4.step()
        opt2.step()
    assert w4.shape == (8, 3, 3, 3) and w4.grad.shape == (8, 3, 3, 3)
    torch.testing.assert_close(w4.detach().reshape(8, -1), w2.detach())


@needs_multi30k
def test_report_only_rebuilds_the_same_summaries_from_the_runs_files(quick_run):
    before = {(r["workload"], r["optimizer"], r["target"]): r for r in _load(quick_run / "quality.json")}
    (quick_run / "quality.md").unlink()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--report-only", "--out", str(quick_run)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {(r["workload"], r["optimizer"], r["target"]): r for r in _load(quick_run / "quality.json")}
    assert set(after) == set(before) and (quick_run / "quality.md").is_file()
    for key, rec in after.items():
        for field in ("best_lr", "final_metric", "time_to_target_s", "steps_to_target", "time_to_target_ratio", "error"):
            assert rec[field] == before[key][field], (key, field)
