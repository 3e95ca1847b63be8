"""Smoke test of the benchmark suite (benchmarks/run.py) on CPU with the smallest settings.

Runs every suite once in ``--quick`` mode (two invocations into one folder, which also checks that
all.json and results.md combine the suite files of both), then checks the files, the required keys
of every record and the ratios. No timing assertions: CPU timings on a shared machine mean nothing.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import REQUIRED_KEYS  # noqa: E402
from benchmarks.optimizers import OPTIMIZER_NAMES, get_optimizers  # noqa: E402
from benchmarks.run import parse_args  # noqa: E402
from benchmarks.workloads import get_workloads  # noqa: E402

COMMON = ["--device", "cpu", "--quick", "--repeats", "1", "--warmup", "0", "--threads", "1"]


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), *COMMON, "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # resnet50 is left out of the optimizer suite here (8 copies x 25M parameters on 2 cores);
    # the HVP suite runs all three workloads.
    _run(out, "--suite", "optimizer", "--workloads", "cifar_resnet20_b128,gpt_6l512_t256_b16")
    _run(out, "--suite", "hvp,diagnostics", "--trace-budgets", "12,30", "--slq-steps", "20", "--diag-epochs", "5",
         "--power-max-matvecs", "60")
    return out


def _load(path: Path):
    with open(path) as f:
        return json.load(f)


def test_files_and_required_keys(quick_run):
    for name in ("optimizer.json", "hvp.json", "diagnostics.json", "all.json", "results.md"):
        assert (quick_run / name).is_file(), name
    per_suite = sum((_load(quick_run / f"{s}.json") for s in ("optimizer", "hvp", "diagnostics")), [])
    records = _load(quick_run / "all.json")
    assert records == per_suite  # all.json combines the suite files of both invocations
    for rec in records:
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        assert not missing, (rec.get("suite"), rec.get("optimizer", rec.get("method")), missing)
        assert ("optimizer" in rec) != ("method" in rec)
        assert rec["device"] == "cpu"
        assert rec["torch"] == torch.__version__
        assert "benchmarks/run.py" in rec["command"] and rec["date"]
        assert rec["peak_mem_gib"] is None  # not measured on CPU: null, never a made-up number


def test_optimizer_suite_records_and_ratios(quick_run):
    records = _load(quick_run / "optimizer.json")
    workloads = {r["workload"] for r in records}
    assert workloads == {"cifar_resnet20_b128_quick", "gpt_6l512_t256_b16_quick"}
    for wl in workloads:
        by = {r["optimizer"]: r for r in records if r["workload"] == wl}
        assert set(by) == set(OPTIMIZER_NAMES)  # crashed or missing peers are recorded, not dropped
        adamw = by["adamw"]["step_ms"]
        assert adamw > 0 and by["adamw"]["ratio_to_adamw"] == pytest.approx(1.0)
        for name in ("sgd", "hessopt_adahessian", "hessopt_adahessian_k10"):
            assert by[name]["error"] is None, by[name]["error"]  # hessopt runs the GPT with default kernels
        for name, rec in by.items():
            if rec["error"] is None:
                assert rec["ratio_to_adamw"] == pytest.approx(rec["step_ms"] / adamw)
                assert math.isfinite(rec["last_loss"])
            else:
                assert rec["step_ms"] is None and rec["ratio_to_adamw"] is None and rec["error"]
        assert by["hessopt_adahessian_k10"]["window_steps"] == 10
    md = (quick_run / "results.md").read_text()
    assert "Optimizer suite" in md and "hessopt_adahessian_k10" in md and "x AdamW" in md
    assert "measured by the hessopt authors with the peers' own code" in md  # peer figures with their source


def test_hvp_suite_records_and_ratios(quick_run):
    records = _load(quick_run / "hvp.json")
    assert len({r["workload"] for r in records}) == 3
    for wl in {r["workload"] for r in records}:
        by = {r["method"]: r for r in records if r["workload"] == wl}
        assert {"gradient", "adamw_step", "plain_double_backward", "hessopt_hvp", "hessopt_operator_cached"} <= set(by)
        grad, adamw = by["gradient"]["step_ms"], by["adamw_step"]["step_ms"]
        assert by["gradient"]["ratio_to_grad"] == pytest.approx(1.0)
        assert by["hessopt_hvp"]["error"] is None and by["hessopt_operator_cached"]["error"] is None
        for rec in by.values():
            if rec["error"] is None:
                assert rec["ratio_to_grad"] == pytest.approx(rec["step_ms"] / grad)
                assert rec["ratio_to_adamw"] == pytest.approx(rec["step_ms"] / adamw)
    assert "HVP suite" in (quick_run / "results.md").read_text()


def test_diagnostics_suite_against_exact_reference(quick_run):
    records = _load(quick_run / "diagnostics.json")
    by = {r["method"]: r for r in records}
    expected = {"model", "reference", "gradient", "hvp_fresh_graph", "hvp_cached_graph", "lanczos_top1", "power_top1",
                "lanczos_top5", "power_top5", "hutchinson_trace_m12", "hutchpp_trace_m12", "hutchinson_trace_m30",
                "hutchpp_trace_m30", "slq_20"}
    assert expected <= set(by)
    for name in expected:
        assert by[name]["error"] is None, (name, by[name]["error"])
    ref = by["reference"]
    assert len(ref["eigenvalues"]) == 5 and ref["trace"] > 0
    for name in ("lanczos_top1", "power_top1", "lanczos_top5", "power_top5"):
        rec = by[name]
        assert rec["matvecs"] > 0 and rec["seconds"] >= rec["hvp_seconds"] >= 0
        assert len(rec["rel_errors"]) == rec["k"] and all(math.isfinite(e) for e in rec["rel_errors"])
    # wiring check (not a timing): Lanczos at tol 1e-4 agrees with the exact dense Hessian
    assert max(by["lanczos_top5"]["rel_errors"]) < 1e-2
    for name in ("hutchinson_trace_m30", "hutchpp_trace_m30"):
        assert by[name]["matvecs"] == 30 and by[name]["std_error"] > 0 and by[name]["rel_error"] is not None
    slq = by["slq_20"]
    assert slq["hvp_seconds"] + slq["other_seconds"] == pytest.approx(slq["seconds"])
    md = (quick_run / "results.md").read_text()
    assert "Diagnostics suite" in md and "PyHessian" in md and "hessian-eigenthings" in md


def test_report_only_rebuilds_from_suite_files(quick_run, tmp_path):
    for name in ("optimizer.json", "hvp.json"):
        (tmp_path / name).write_text((quick_run / name).read_text())
    from benchmarks.run import main

    assert main(["--report-only", "--out", str(tmp_path)]) == 0
    records = _load(tmp_path / "all.json")
    assert {r["suite"] for r in records} == {"optimizer", "hvp"}
    assert "Diagnostics suite" not in (tmp_path / "results.md").read_text()


def test_filters_reject_unknown_names():
    with pytest.raises(ValueError, match="unknown workload"):
        get_workloads(True, ["resnet9000"])
    with pytest.raises(ValueError, match="unknown optimizer"):
        get_optimizers(["adamw", "lion"])
    with pytest.raises(SystemExit):
        parse_args(["--suite", "speed"])
    args = parse_args(["--suite", "hvp,optimizer", "--device", "cpu"])
    assert args.suite == ["optimizer", "hvp"] and args.repeats == 10 and args.warmup == 3


def test_missing_peer_is_reported_not_dropped():
    from benchmarks.optimizers import OptimizerSpec, missing_package

    spec = OptimizerSpec("ghost", "hessopt_no_such_package", lambda p: None, "first_order")
    assert missing_package(spec).startswith("not installed: hessopt_no_such_package")
    assert missing_package(get_optimizers(["adamw"])[0]) is None
