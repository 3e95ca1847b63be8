#!/usr/bin/env python
"""hessopt benchmarks: optimizer step cost, HVP cost, and diagnostics accuracy/cost.

Usage (from the repository root):

    python benchmarks/run.py --suite all --device cuda --out runs/bench-gpu
    python benchmarks/run.py --suite all --device cpu --quick --out runs/bench-quick

Writes ``OUT/<suite>.json`` (a list of records) for each suite run, ``OUT/all.json`` (the records of
every suite file in OUT, so two invocations with the same ``--out`` combine) and ``OUT/results.md``.
See benchmarks/README.md for what each suite measures and how.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script: make `hessopt` and `benchmarks` importable
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.harness import base_record, environment, finite_or_none, format_error, log  # noqa: E402
from benchmarks.optimizers import OPTIMIZER_NAMES  # noqa: E402
from benchmarks.workloads import WORKLOAD_NAMES  # noqa: E402

SUITES = ("optimizer", "hvp", "diagnostics", "quality", "lanczos")


def _names(text):
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _suites(text):
    names = _names(text)
    if names == ["all"]:
        return list(SUITES)
    bad = [n for n in names if n not in SUITES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}, all")
    return [n for n in SUITES if n in names]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", type=_suites, default=list(SUITES),
                   help="optimizer, hvp, diagnostics, all (default), or a comma-separated list (e.g. optimizer,hvp)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild OUT/all.json and OUT/results.md from the suite files in OUT "
                        "(e.g. after copying the files of two runs into one folder)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes that run on 2 CPU cores in a few minutes")
    p.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up windows per contender (default 3; quick 1)")
    p.add_argument("--workloads", type=_names, default=None, help=f"comma-separated subset of {','.join(WORKLOAD_NAMES)}")
    p.add_argument("--optimizers", type=_names, default=None, help=f"comma-separated subset of {','.join(OPTIMIZER_NAMES)}")
    p.add_argument("--methods", type=_names, default=None,
                   help="HVP suite: subset of methods (gradient and adamw_step always run, they are the references)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("HVP suite")
    g.add_argument("--hvp-bn-mode", choices=("train", "eval"), default="train",
                   help="BatchNorm mode of the HVP suite (train: the optimizer's view; default)")
    g = p.add_argument_group("diagnostics suite")
    g.add_argument("--data-dir", default=None,
                   help="CIFAR-10 source for recipes.common.load_dataset (e.g. .gpu/data/cifar10-jpeg.tar.xz); default "
                        "../shared/data/cifar10-jpeg.tar.xz")
    g.add_argument("--checkpoint", default=None,
                   help="state dict of the trained ResNet20: loaded if it exists, else written after training")
    g.add_argument("--reference-only", action="store_true",
                   help="compute only the float64 reference for the records already in OUT/diagnostics.json (a run "
                        "stopped before its reference finished) and score them; needs --checkpoint")
    g.add_argument("--products-only", action="store_true",
                   help="add only the interleaved steady-state seconds per product of every tool (hessopt, "
                        "hessian-eigenthings, curvlinops; Hessian and GGN) to the records already in "
                        "OUT/diagnostics.json; needs --checkpoint and the run's workload options")
    g.add_argument("--no-save-checkpoint", dest="save_checkpoint", action="store_false",
                   help="do not write OUT/diagnostics_model.pt after training")
    g.add_argument("--diag-epochs", type=int, default=None, help="training epochs (default 10; quick 30)")
    g.add_argument("--diag-batch", type=int, default=None, help="test images in the fixed batch (default 1024; quick 256)")
    g.add_argument("--ref-steps", type=int, default=150, help="float64 reference Lanczos steps (default 150)")
    g.add_argument("--ref-trace-matvecs", type=int, default=300, help="float64 reference Hutch++ budget (default 300)")
    g.add_argument("--trace-budgets", type=lambda s: [int(t) for t in s.split(",")], default=[30, 99, 300],
                   help="matvec budgets for Hutchinson vs Hutch++ (default 30,99,300)")
    g.add_argument("--power-max-matvecs", type=int, default=200,
                   help="power-iteration budget for top-1 (top-5 gets 2.5x; default 200)")
    g.add_argument("--slq-steps", type=int, default=100, help="SLQ Lanczos steps (default 100, as PyHessian's figure)")
    g.add_argument("--diag-workload", choices=("resnet20", "gpt"), default="resnet20",
                   help="resnet20 (CIFAR ResNet20; --quick: the digits CNN) or gpt (the character-level GPT of "
                        "benchmarks/gpt.py on Multi30k, trained with AdamW; --diag-batch = validation sequences)")
    g.add_argument("--side-by-side-only", action="store_true",
                   help="of hessopt's own methods run only those the side-by-side compares (top-5 Lanczos, "
                        "Hutch++ at --trace-budgets, SLQ), beside hessian-eigenthings and curvlinops")
    g.add_argument("--gpt-d-model", type=int, default=None, help="GPT width (default 64; quick 4)")
    g.add_argument("--gpt-layers", type=int, default=None, help="GPT blocks (default 2; quick 1)")
    g.add_argument("--gpt-heads", type=int, default=None, help="GPT attention heads (default 4; quick 2)")
    g.add_argument("--gpt-context", type=int, default=None, help="GPT context in characters (default 64; quick 8)")
    g.add_argument("--gpt-train-steps", type=int, default=None, help="GPT AdamW training steps (default 300; quick 20)")
    g = p.add_argument_group("quality suite (time to a tuned baseline's quality; benchmarks/README.md, \"Time to quality\")")
    g.add_argument("--quality-workloads", type=_names, default=None, help="subset of gpt_multi30k_char,cifar10_resnet")
    g.add_argument("--quality-optimizers", type=_names, default=None,
                   help="subset of the contenders (benchmarks/quality_optimizers.py QUALITY_OPTIMIZERS)")
    g.add_argument("--quality-seeds", type=int, default=None, help="seeds of the best point (default 3; quick 1)")
    g.add_argument("--quality-steps", type=int, default=None, help="training steps of every workload (default: sizes table)")
    g.add_argument("--quality-data-dir", default=None,
                   help="folder holding multi30k/ and cifar10-jpeg.tar.xz (default ../shared/data)")
    g.add_argument("--quality-max-minutes", type=float, default=None,
                   help="per workload: start no sweep point / seed group that would end past this budget (the "
                        "summaries say where it stopped); default: no limit")
    g.add_argument("--quality-grad-clip", type=float, default=None,
                   help="clip every contender's gradient norm to this value (default: no clipping)")
    g.add_argument("--quality-append", action="store_true",
                   help="keep the runs already in OUT/quality_runs.json (other contenders; e.g. a second pass for "
                        "contenders that landed later) and summarize everything together")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use --device cpu)")
    return args


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(finite_or_none(obj), f, indent=1, default=str, allow_nan=False)
    os.replace(tmp, path)


def _run_suite(name: str, args, env, records, flush):
    if name == "optimizer":
        from benchmarks.suite_optimizer import run_suite
    elif name == "hvp":
        from benchmarks.suite_hvp import run_suite
    elif name == "quality":
        from benchmarks.suite_quality import run_suite
    elif name == "lanczos":  # benchmarks/suite_lanczos.py (also runnable alone, with its own options)
        from benchmarks.suite_lanczos import run_suite
    else:
        from benchmarks.suite_diagnostics import run_suite
    return run_suite(args, env, records, flush)


def write_report(out: str) -> list:
    """Combine every suite file in ``out`` into all.json and results.md; returns the records."""
    all_records = []
    for name in SUITES:
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                all_records.extend(json.load(f))
    _write_json(os.path.join(out, "all.json"), all_records)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report.render(all_records))
    return all_records


def _amend(args, env, option: str, fill, what: str) -> int:
    """Add to the diagnostics records already in ``OUT/diagnostics.json`` with ``fill(args, env,
    records, flush)`` (``--reference-only``, ``--products-only``) and rewrite the report."""
    path = os.path.join(args.out, "diagnostics.json")
    if not os.path.exists(path):
        log(f"{option}: {path} does not exist; run the diagnostics suite into {args.out} first")
        return 2
    with open(path) as f:
        records = json.load(f)
    fill(args, env, records, flush=lambda: (_write_json(path, records), write_report(args.out)))
    log(f"{what} added to {path}; report rewritten")
    return 0


def _reference_only(args, env) -> int:
    from benchmarks.suite_diagnostics import fill_reference

    return _amend(args, env, "--reference-only", fill_reference, "reference")


def _products_only(args, env) -> int:
    from benchmarks.suite_diagnostics import products_only

    return _amend(args, env, "--products-only", products_only, "per-product records")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.report_only:
        if any(f.startswith("quality_runs_") for f in os.listdir(args.out)):
            from benchmarks.suite_quality import rebuild  # quality summaries again from the runs files

            rebuild(args.out, environment(torch.device("cpu")))
        records = write_report(args.out)
        log(f"wrote {os.path.join(args.out, 'all.json')} ({len(records)} records) and "
            f"{os.path.join(args.out, 'results.md')}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    if args.reference_only:
        return _reference_only(args, env)
    if args.products_only:
        return _products_only(args, env)
    log(f"hessopt benchmarks: suites={','.join(args.suite)} device={env['device']} torch={env['torch']} "
        f"quick={args.quick} repeats={args.repeats} warmup={args.warmup} out={args.out}")
    status = 0
    for name in args.suite:
        t0 = time.perf_counter()
        log(f"=== suite {name} ===")
        path = os.path.join(args.out, f"{name}.json")
        records: list = []

        def flush(records=records, path=path):  # partial results survive a time limit or a crash
            for rec in records:
                rec["quick"] = args.quick
            _write_json(path, records)
            write_report(args.out)

        try:
            _run_suite(name, args, env, records, flush)
        except Exception as err:  # a suite that cannot run at all is recorded, and the run exits non-zero
            traceback.print_exc()
            rec = base_record(env, name, "-", "method", "suite")
            rec["error"] = format_error(err)
            records.append(rec)
            status = 1
        flush()
        log(f"=== suite {name} done in {time.perf_counter() - t0:.1f}s: {len(records)} records -> {path}")
    all_records = write_report(args.out)
    log(f"wrote {os.path.join(args.out, 'all.json')} ({len(all_records)} records, every suite file in "
        f"{args.out}) and {os.path.join(args.out, 'results.md')}")
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read(), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
