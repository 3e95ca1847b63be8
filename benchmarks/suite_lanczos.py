r"""Lanczos suite: where ``top_eigenvalues`` spends its time at model scale.

On a model of 10M-30M parameters, ``hessopt.top_eigenvalues(op, k=5)`` is run twice on the same
float32 Hessian, interleaved: once with the current kernel (``hessopt.spectrum``), once with the
kernel of an earlier revision (``--before-rev``, default the last commit before the rewrite),
loaded from git into a private module (``git show REV:hessopt/spectrum/{lanczos,eigen}.py``) so that
both run in one process on one operator. The operator is wrapped to time its products
(device-synchronized); the rest of the wall time is the solver's bookkeeping (reorthogonalization,
residuals, the small eigenproblems, allocations, copies). Per variant: products' seconds,
bookkeeping seconds, their ratio (target <= 10%), matvecs, the eigenvalues and error bounds (the
two variants must agree to their bounds), and on CUDA the peak memory beyond the model's.

Workloads (``--model``): a timm model (default ``resnet18``, 11.2M parameters) on random images at
low resolution (``--image-size``, ``--batch``), BatchNorm in eval mode, or ``linear``: a stack of
``nn.Linear`` layers (``--width``, ``--depth``; 5 x 1536 is 11.8M parameters). ``--quick`` alone is
a smoke run (``linear``, 3 x 512, 0.8M parameters); ``--max-matvecs`` gives both kernels the same
number of products. Every record carries ``os.getloadavg()`` before and after each run: CPU
figures taken while other processes run are not timing results, and the markdown says so.

Usage:
    python benchmarks/run.py --suite lanczos --device cuda --out runs/bench-gpu
    python benchmarks/suite_lanczos.py --device cpu --quick --out runs/lanczos-quick
    python benchmarks/suite_lanczos.py --device cpu --model resnet18 --batch 16 --image-size 64 --out runs/lanczos
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types
import warnings
from typing import Any, Dict, List, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hessopt  # noqa: E402
from hessopt.operators import CurvatureOperator  # noqa: E402

from benchmarks.harness import GIB, Clock, base_record, environment, finite_or_none, format_error, log  # noqa: E402

SUITE = "lanczos"
#: the last commit with the kernel that copied vectors to float64 every step and kept residual columns
BEFORE_REV = "897b794"


class TimedOperator(CurvatureOperator):
    """Wraps an operator; accumulates the synchronized time and number of its products."""

    def __init__(self, op: CurvatureOperator, clock: Clock):
        self.op, self.clock = op, clock
        self.num_params, self.dtype, self.device, self.shapes = op.num_params, op.dtype, op.device, op.shapes
        self.seconds, self.matvecs = 0.0, 0

    def broadcast_seed(self, seed: int) -> int:
        return self.op.broadcast_seed(seed)

    def __matmul__(self, v):
        # the whole product, the wrapped operator's own input and finiteness checks included; not
        # CurvatureOperator.__matmul__, whose second finiteness check would count as bookkeeping
        self.clock.sync()
        t0 = time.perf_counter()
        out = self.op @ v
        self.clock.sync()
        self.seconds += time.perf_counter() - t0
        self.matvecs += 1
        return out

    matvec = __matmul__


def load_old_kernel(rev: str):
    """``top_eigenvalues`` of revision ``rev``, from git, as a private module (None if unavailable)."""
    name = f"_hessopt_spectrum_{rev}"
    if name in sys.modules:
        return sys.modules[name + ".eigen"].top_eigenvalues
    pkg = types.ModuleType(name)
    pkg.__path__ = []  # a package, so that the files' relative imports resolve
    sys.modules[name] = pkg
    for mod in ("lanczos", "eigen"):
        src = subprocess.run(["git", "show", f"{rev}:hessopt/spectrum/{mod}.py"], cwd=_ROOT, check=True,
                             capture_output=True, text=True).stdout
        src = src.replace("from ..", "from hessopt.").replace("from .lanczos", f"from {name}.lanczos")
        spec = importlib.util.spec_from_loader(f"{name}.{mod}", loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"{name}.{mod}"] = module
        exec(compile(src, f"{rev}:hessopt/spectrum/{mod}.py", "exec"), module.__dict__)
    return sys.modules[name + ".eigen"].top_eigenvalues


# --------------------------------------------------------------------------------------------------
# workloads


def _linear_stack(width: int, depth: int, classes: int) -> nn.Module:
    layers: List[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def build_operator(setting: Dict[str, Any], device: torch.device, seed: int):
    """The model's float32 Hessian over one random batch (BatchNorm in eval mode)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if setting["model"] == "linear":
        model = _linear_stack(setting["width"], setting["depth"], 10)
        x = torch.randn(setting["batch"], setting["width"], generator=g)
    else:
        try:
            import timm
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("the lanczos suite's timm workloads need timm: pip install hessopt[timm]") from err
        model = timm.create_model(setting["model"], num_classes=10, pretrained=False)
        s = setting["image_size"]
        x = torch.randn(setting["batch"], 3, s, s, generator=g)
    y = torch.randint(0, 10, (setting["batch"],), generator=g)
    model = model.to(device).eval()
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x.to(device), y.to(device)), bn_mode="eval")
    return model, op


def _setting(args) -> Dict[str, Any]:
    model = getattr(args, "lanczos_model", None) or ("linear" if args.quick else "resnet18")
    setting: Dict[str, Any] = {"model": model, "k": 5, "tol": getattr(args, "lanczos_tol", None) or 1e-4,
                               "max_matvecs": getattr(args, "lanczos_max_matvecs", None)}
    if model == "linear":
        quick = args.quick and getattr(args, "width", None) is None
        setting.update(width=getattr(args, "width", None) or (512 if quick else 1536),
                       depth=getattr(args, "depth", None) or (3 if quick else 5),
                       batch=getattr(args, "lanczos_batch", None) or (16 if quick else 64))
        setting["workload"] = f"linear_{setting['depth']}x{setting['width']}_b{setting['batch']}"
    else:
        setting.update(image_size=getattr(args, "image_size", None) or (32 if args.quick else 64),
                       batch=getattr(args, "lanczos_batch", None) or (4 if args.quick else 16))
        setting["workload"] = f"{model}_{setting['image_size']}px_b{setting['batch']}"
    return setting


# --------------------------------------------------------------------------------------------------
# the suite


def _one_run(solver, op: CurvatureOperator, clock: Clock, setting, seed: int) -> Dict[str, Any]:
    timed = TimedOperator(op, clock)
    base = clock.allocated()
    clock.reset_peak()
    load_before = os.getloadavg()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        clock.sync()
        r = solver(timed, k=setting["k"], tol=setting["tol"], generator=seed, max_matvecs=setting["max_matvecs"])
        clock.sync()
        total = time.perf_counter() - t0
    peak = clock.peak()
    out = dict(
        total_s=total, products_s=timed.seconds, bookkeeping_s=total - timed.seconds,
        bookkeeping_ratio=(total - timed.seconds) / timed.seconds if timed.seconds > 0 else None,
        matvecs=timed.matvecs, ms_per_product=1000 * timed.seconds / max(timed.matvecs, 1),
        bookkeeping_ms_per_step=1000 * (total - timed.seconds) / max(timed.matvecs, 1),
        eigenvalues=[float(v) for v in r.eigenvalues], error_bounds=[float(b) for b in r.error_bounds],
        residuals=[float(v) for v in r.residuals], converged=bool(r.converged),
        eigenvectors_dtype=str(r.eigenvectors.dtype).replace("torch.", ""),
        warnings=[str(w.message)[:300] for w in caught],
        loadavg_before=list(load_before), loadavg_after=list(os.getloadavg()),
        peak_extra_gib=None if peak is None else (peak - base) / GIB,
    )
    del r
    return out


def run_suite(args, env: Dict[str, Any], records: List[Dict[str, Any]], flush=lambda: None) -> List[Dict[str, Any]]:
    """Append this suite's records to ``records``; writes OUT/lanczos.md beside the JSON."""
    device = torch.device(args.device)
    clock = Clock(device)
    setting = _setting(args)
    rev = getattr(args, "before_rev", None) or BEFORE_REV
    solvers = {"after": hessopt.top_eigenvalues}
    try:
        solvers["before"] = load_old_kernel(rev)
    except Exception as err:  # no git, or the revision is not in this clone: measure the current one only
        log(f"[lanczos] cannot load the kernel of {rev}: {format_error(err)}; measuring the current one only")
    log(f"[lanczos] building {setting['workload']}")
    model, op = build_operator(setting, device, args.seed)
    n = op.num_params
    log(f"[lanczos] {setting['model']}: {n / 1e6:.2f}M parameters; variants {sorted(solvers)}")
    # one untimed product first (allocator, kernels, lazily built state)
    op @ torch.zeros(n, dtype=op.dtype, device=device)
    order = ["before", "after"] if "before" in solvers else ["after"]
    results: Dict[str, List[Dict[str, Any]]] = {name: [] for name in order}
    for rep in range(min(args.repeats, 3)):  # at most 3 rounds (run.py defaults to 10)
        for name in (order if rep % 2 == 0 else order[::-1]):
            try:
                res = _one_run(solvers[name], op, clock, setting, args.seed)
            except Exception as err:
                log(f"[lanczos] {name} FAILED: {format_error(err)}")
                res = {"error": format_error(err)}
            results[name].append(res)
            log(f"[lanczos] {name} repeat {rep + 1}: " + (
                res.get("error") or f"{res['matvecs']} products {res['products_s']:.2f}s, bookkeeping "
                f"{res['bookkeeping_s']:.2f}s ({100 * res['bookkeeping_ratio']:.1f}%), load {res['loadavg_before'][0]:.2f}"))
    for name in order:
        runs = [r for r in results[name] if "error" not in r]
        rec = base_record(env, SUITE, setting["workload"], "method", f"top_eigenvalues_k5_{name}")
        rec.update(variant=name, kernel=("hessopt.spectrum (working tree)" if name == "after"
                                         else f"hessopt/spectrum at {rev} (git show)"),
                   num_params=n, model=setting["model"], setting=setting, repeats=len(runs), runs=results[name],
                   cpu_threads=torch.get_num_threads(), peak_mem_note=None if clock.cuda else "not measured on CPU",
                   loadavg_note=("CPU timings on a machine with load average above its core count are not "
                                 "timing results" if device.type == "cpu" else None), cpu_count=os.cpu_count())
        if runs:
            best = min(runs, key=lambda r: r["total_s"])  # least disturbed run
            rec.update({k: best[k] for k in ("total_s", "products_s", "bookkeeping_s", "bookkeeping_ratio", "matvecs",
                                             "ms_per_product", "bookkeeping_ms_per_step", "eigenvalues", "error_bounds",
                                             "converged", "peak_extra_gib", "loadavg_before", "loadavg_after")})
            rec["step_ms"] = 1000 * best["total_s"] / max(best["matvecs"], 1)
        else:
            rec["error"] = results[name][0].get("error") if results[name] else "no run"
        records.append(rec)
    if len(order) == 2 and all(r.get("eigenvalues") for r in records[-2:]):
        b, a = records[-2], records[-1]
        diff = [abs(x - y) for x, y in zip(b["eigenvalues"], a["eigenvalues"])]
        # the bounds are those of each run's own float32 products; two runs' products differ by rounding
        rounding = 2 * torch.finfo(op.dtype).eps * max(abs(v) for v in a["eigenvalues"])
        allowed = [eb + ea + rounding for eb, ea in zip(b["error_bounds"], a["error_bounds"])]
        a["eigenvalue_diff_to_before"] = diff
        a["agree_within_bounds"] = all(d <= m for d, m in zip(diff, allowed))
        a["agreement_note"] = "within the two runs' error bounds plus 2 eps(dtype) * max|lambda| (product rounding)"
    flush()
    _write_markdown(os.path.join(args.out, "lanczos.md"), records[-len(order):], env)
    return records


def _write_markdown(path: str, recs: List[Dict[str, Any]], env: Dict[str, Any]) -> None:
    lines = ["# Lanczos at model scale: products vs bookkeeping in top_eigenvalues(k=5)", "",
             f"Command: `{env['command']}`; device {env['device']}, torch {env['torch']}, {env['date']}.", ""]
    if any(r.get("device") == "cpu" for r in recs):
        lines += [f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads). Load average before/after "
                  "each run is in the table: a load above the core count means other processes ran, and the "
                  "times are then not timing results.", ""]
    lines += ["| workload | kernel | params | matvecs | products s | bookkeeping s | bookkeeping / products | "
              "ms per product | bookkeeping ms per step | peak extra GiB | converged | load avg (1 min) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r.get("error"):
            lines.append(f"| {r['workload']} | {r['variant']} | {r.get('num_params')} | – | – | – | – | – | – | – | "
                         f"{r['error']} | – |")
            continue
        peak = "–" if r.get("peak_extra_gib") is None else f"{r['peak_extra_gib']:.2f}"
        lines.append(
            f"| {r['workload']} | {r['variant']} ({r['kernel']}) | {r['num_params'] / 1e6:.1f}M | {r['matvecs']} | "
            f"{r['products_s']:.2f} | {r['bookkeeping_s']:.2f} | {100 * r['bookkeeping_ratio']:.1f}% | "
            f"{r['ms_per_product']:.1f} | {r['bookkeeping_ms_per_step']:.1f} | {peak} | {r['converged']} | "
            f"{r['loadavg_before'][0]:.2f} / {r['loadavg_after'][0]:.2f} |")
    after = recs[-1]
    if "eigenvalue_diff_to_before" in after:
        lines += ["", f"Eigenvalues (after): {', '.join(f'{v:.6g}' for v in after['eigenvalues'])}; largest difference "
                  f"to before {max(after['eigenvalue_diff_to_before']):.3g}; within the two runs' error bounds plus "
                  f"2 eps(float32) max|lambda|: "
                  f"{after['agree_within_bounds']}."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the nn.Linear stack (cheap products), one repeat")
    p.add_argument("--out", default="runs/lanczos")
    p.add_argument("--model", dest="lanczos_model", default=None,
                   help="timm model name (default resnet18) or 'linear' (default with --quick)")
    p.add_argument("--batch", dest="lanczos_batch", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--width", type=int, default=None, help="linear: layer width (default 1536)")
    p.add_argument("--depth", type=int, default=None, help="linear: hidden layers (default 5: 11.8M parameters)")
    p.add_argument("--tol", dest="lanczos_tol", type=float, default=None, help="top_eigenvalues tol (default 1e-4)")
    p.add_argument("--max-matvecs", dest="lanczos_max_matvecs", type=int, default=None,
                   help="products per run (default: top_eigenvalues' own budget and stopping rule); a fixed number "
                        "gives both kernels the same work")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    p.add_argument("--before-rev", default=BEFORE_REV, help=f"git revision of the 'before' kernel (default {BEFORE_REV})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    env = environment(torch.device(args.device))
    records: List[Dict[str, Any]] = []
    path = os.path.join(args.out, "lanczos.json")

    def flush():
        for rec in records:
            rec["quick"] = args.quick
        with open(path + ".tmp", "w") as f:
            json.dump(finite_or_none(records), f, indent=1, default=str, allow_nan=False)
        os.replace(path + ".tmp", path)

    run_suite(args, env, records, flush)
    flush()
    with open(os.path.join(args.out, "lanczos.md")) as f:
        print(f.read())
    return 0 if all(not r.get("error") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
