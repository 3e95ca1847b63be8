#!/usr/bin/env python
"""AdaHessian vs Adam on a prepared corpus: same number of updates, then BLEU; JSON + markdown summary.

Two modes:

* ``--max-update N``: both optimizers train exactly N updates.
* ``--budget-seconds B``: fit as many updates as the budget allows (measured from this script's
  start, evaluation included). Each optimizer first runs ``--calibrate-updates`` updates to measure
  its start-up cost and seconds per update; N is chosen so that both runs and both evaluations end
  inside the budget. AdaHessian (the slower one) trains first, with fairseq's ``--stop-time-hours``
  as a safety net; Adam then trains exactly as many updates as AdaHessian completed.

Both runs use the warm-up lengths computed from the planned N (train.py: 10% Adam, 20% AdaHessian).
Writes to ``--out``: ``summary.json``, ``summary.md``, ``train_<opt>.log``, ``generate_<opt>.txt``
(at most 8 files, so the folder can be fetched from a remote run); checkpoints go to ``--work-dir``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from evaluate import evaluate  # noqa: E402
from train import PRESETS, default_warmup  # noqa: E402

ORDER = ("adahessian", "adam")  # the slower one first: the other then matches its update count


def run_train(a, optimizer: str, max_update: int, save_dir: Path, log: Path, timing: Path,
              warmup: Optional[int], extra: List[str]) -> Dict:
    cmd = [sys.executable, str(HERE / "train.py"), "--data", a.data, "--optimizer", optimizer,
           "--max-update", str(max_update), "--save-dir", str(save_dir), "--device", a.device,
           "--seed", str(a.seed), "--log-interval", str(a.log_interval), "--timing-out", str(timing),
           "--tf32" if a.tf32 else "--no-tf32"]
    if warmup is not None:
        cmd += ["--warmup-updates", str(warmup)]
    cmd += ["--"] + extra
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"training {optimizer} failed (exit {result.returncode}); {log}:\n{tail}")
    record = json.loads(timing.read_text())
    record["wall_seconds"] = seconds
    record["losses"] = read_losses(log)
    return record


_STATS_LINE = re.compile(r"(?:^|[\s|:])(train_inner|train|valid)(?: \| |:)(\{.*\})\s*$")


def read_losses(log: Path) -> Dict:
    """Last train and valid losses from fairseq's json log lines (``... | valid | {...}`` or ``INFO:valid:{...}``)."""
    out: Dict = {}
    for line in log.read_text().splitlines():
        match = _STATS_LINE.search(line)
        if not match:
            continue
        tag, payload = match.groups()
        try:
            stats = json.loads(payload)
        except ValueError:
            continue
        key = "train" if tag == "train_inner" else tag
        prefix = "" if tag == "train_inner" else f"{tag}_"
        out[key] = {k: stats.get(prefix + k, stats.get(k)) for k in ("loss", "nll_loss", "ppl", "num_updates")}
    return out


def plan_updates(a, calib: Dict[str, Dict], started: float) -> int:
    """Updates per optimizer that fit in the budget given the calibration runs."""
    remaining = a.budget_seconds - (time.perf_counter() - started)
    per_update = sum(c["seconds_per_update"] for c in calib.values())
    fixed = sum(c["startup_seconds"] for c in calib.values()) + 2 * (a.eval_seconds + a.save_seconds) + a.margin_seconds
    n = math.floor((remaining - fixed) / per_update)
    return max(n, a.calibrate_updates)


def markdown(summary: Dict) -> str:
    rows = []
    for opt in summary["optimizers"]:
        r = summary["results"][opt]
        spu = "-" if r["seconds_per_update"] is None else f"{1000 * r['seconds_per_update']:.1f}"
        mem = "-" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.2f}"
        train_loss = _fmt(r["losses"].get("train", {}).get("loss"))
        valid_loss = _fmt(r["losses"].get("valid", {}).get("loss"))
        rows.append(
            f"| {opt} | {r['num_updates']} | {r['warmup_updates']} | {spu} | {mem} | {train_loss} | "
            f"{valid_loss} | {r['bleu']['bleu']:.2f} | {r['bleu']['bleu_lowercase']:.2f} |"
        )
    ratio = summary.get("time_ratio_adahessian_over_adam")
    lines = [
        f"# AdaHessian vs Adam: {summary['arch']} on {summary['data']}",
        "",
        f"device: {summary['device']} ({summary.get('gpu') or 'cpu'}), TF32: {summary['tf32']}, "
        f"mode: {summary['mode']}, total wall {summary['total_seconds']:.0f} s",
        "",
        "| optimizer | updates | warm-up | ms / update | peak GPU GiB | train loss | valid loss | test BLEU | BLEU (lc) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"AdaHessian / Adam time per update: {'-' if ratio is None else f'{ratio:.2f}x'}",
        f"BLEU: sacrebleu on detokenized output ({summary['results'][summary['optimizers'][0]]['bleu']['signature']}), "
        f"beam {summary['beam']}, test subset `{summary['subset']}` ({summary['results'][summary['optimizers'][0]]['bleu']['sentences']} sentences).",
        "",
    ]
    if summary.get("calibration"):
        lines.append("Calibration (updates, s/update, start-up s): " + ", ".join(
            f"{k}: {v['num_updates']}, {v['seconds_per_update']:.3f}, {v['startup_seconds']:.1f}"
            for k, v in summary["calibration"].items()))
        lines.append("")
    return "\n".join(lines)


def _fmt(x) -> str:
    try:
        return f"{float(x):.3f}"
    except (TypeError, ValueError):
        return "-"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="prepare_data.py's OUT/bin")
    p.add_argument("--ref", required=True, help="reference sentences of the test subset (OUT/ref/test.en)")
    p.add_argument("--out", required=True, help="folder for summary.json, summary.md and logs")
    p.add_argument("--work-dir", default=None, help="checkpoints and scratch (default: OUT/work)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--max-update", type=int, help="updates per optimizer")
    mode.add_argument("--budget-seconds", type=float, help="wall-clock budget for everything")
    p.add_argument("--optimizers", default="adahessian,adam")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--subset", default="test")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--gen-batch-size", type=int, default=128)
    p.add_argument("--max-len-a", type=float, default=1.2, help="generation length limit a*src_len+b (1.2)")
    p.add_argument("--max-len-b", type=int, default=10, help="generation length limit a*src_len+b (10)")
    p.add_argument("--calibrate-updates", type=int, default=30)
    p.add_argument("--eval-seconds", type=float, default=45.0, help="budget mode: time set aside per evaluation")
    p.add_argument("--save-seconds", type=float, default=5.0, help="budget mode: time set aside per checkpoint save")
    p.add_argument("--margin-seconds", type=float, default=20.0, help="budget mode: safety margin")
    p.add_argument("--train-args", default="", help="extra fairseq-train arguments for both runs (one string)")
    return p


def main(argv=None) -> Dict:
    started = time.perf_counter()
    a = parser().parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work_dir or out / "work")
    work.mkdir(parents=True, exist_ok=True)
    optimizers = [o for o in ORDER if o in a.optimizers.split(",")]
    unknown = set(a.optimizers.split(",")) - set(PRESETS)
    if unknown or not optimizers:
        raise SystemExit(f"--optimizers must name some of {sorted(PRESETS)}, got {a.optimizers!r}")
    extra = a.train_args.split()
    if a.device == "cpu":
        a.tf32 = False

    calibration: Dict[str, Dict] = {}
    if a.budget_seconds is not None:
        for opt in optimizers:
            rec = run_train(a, opt, a.calibrate_updates, work / f"calib_{opt}", work / f"calibrate_{opt}.log",
                            work / f"calibrate_{opt}.json", warmup=None,
                            extra=extra + ["--no-save", "--disable-validation"])
            if rec["seconds_per_update"] is None:
                raise SystemExit(f"calibration of {opt} measured no time per update; raise --calibrate-updates")
            calibration[opt] = {k: rec[k] for k in ("num_updates", "seconds_per_update", "startup_seconds")}
        planned = plan_updates(a, calibration, started)
    else:
        planned = a.max_update
    warmups = {opt: default_warmup(opt, planned) for opt in optimizers}

    results: Dict[str, Dict] = {}
    target = planned
    for opt in optimizers:
        run_extra = list(extra)
        if a.budget_seconds is not None and opt == optimizers[0]:
            c = calibration[opt]
            allowed = (c["startup_seconds"] + planned * c["seconds_per_update"]) * 1.25
            run_extra += ["--stop-time-hours", f"{allowed / 3600:.6f}"]
        save_dir = work / f"ckpt_{opt}"
        if save_dir.exists():
            shutil.rmtree(save_dir)
        rec = run_train(a, opt, target, save_dir, out / f"train_{opt}.log", work / f"timing_{opt}.json",
                        warmups[opt], run_extra)
        target = rec["num_updates"]  # the next optimizer matches the updates actually done
        results[opt] = {
            "num_updates": rec["num_updates"], "warmup_updates": warmups[opt],
            "seconds_per_update": rec["seconds_per_update"], "timed_updates": rec["timed_updates"],
            "startup_seconds": rec["startup_seconds"], "train_wall_seconds": rec["wall_seconds"],
            "peak_gpu_memory_gib": rec["peak_gpu_memory_gib"], "losses": rec["losses"],
            "hyperparameters": PRESETS[opt]["args"] + ["--warmup-updates", str(warmups[opt])],
        }
    counts = {opt: results[opt]["num_updates"] for opt in optimizers}
    if len(set(counts.values())) != 1:
        raise SystemExit(f"the optimizers trained different numbers of updates: {counts}")

    for opt in optimizers:
        ckpt = work / f"ckpt_{opt}" / "checkpoint_last.pt"
        results[opt]["bleu"] = evaluate(
            a.data, str(ckpt), a.ref, str(work / f"generate_{opt}"), a.subset, a.beam, a.gen_batch_size,
            a.device, max_len_a=a.max_len_a, max_len_b=a.max_len_b)
        shutil.copy(results[opt]["bleu"]["generate_output"], out / f"generate_{opt}.txt")

    gpu = None
    if a.device == "cuda":
        try:
            import torch
            gpu = torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - informational only
            gpu = None
    spu = {opt: results[opt]["seconds_per_update"] for opt in optimizers}
    summary = {
        "data": a.data, "arch": "transformer_iwslt_de_en", "device": a.device, "gpu": gpu, "tf32": a.tf32,
        "mode": f"budget {a.budget_seconds:.0f} s" if a.budget_seconds is not None else f"max-update {a.max_update}",
        "optimizers": optimizers, "planned_updates": planned, "subset": a.subset, "beam": a.beam,
        "calibration": calibration, "results": results,
        "time_ratio_adahessian_over_adam": (spu["adahessian"] / spu["adam"])
        if {"adahessian", "adam"} <= set(spu) and spu.get("adam") and spu.get("adahessian") else None,
        "paper_iwslt14_bleu": {"adahessian": 35.79, "adamw": 35.66, "source": "Yao et al. 2021, AAAI"},
        "total_seconds": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print((out / "summary.md").read_text())
    return summary


if __name__ == "__main__":
    main()
