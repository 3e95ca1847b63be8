"""Where the time of an HVP and of an AdaHessian step goes, with hessopt's fast paths on and off.

Run on the GPU machine (about a minute on an H100; everything is written to ``--out``)::

    python benchmarks/profile_hvp.py --device cuda --out "$OUT/profile_hvp"

and as a smoke test on CPU (toy sizes)::

    python benchmarks/profile_hvp.py --device cpu --quick --out runs/profile_hvp_quick

For each workload of :mod:`benchmarks.workloads` (CIFAR ResNet20 b128, timm resnet50 224 b64, the
6-layer GPT d512 T256 b16 with PyTorch's default attention kernels), model in train mode:

* **times** (synchronized, median of ``--repeats`` interleaved rounds after ``--warmup`` rounds) of
  one gradient; a plain double-backward HVP written inline (no hessopt; for the GPT also under the
  composite "math" attention kernel, since the default kernels have no double backward);
  ``hessopt.hvp`` with every fast path on, all off, and each one alone (BatchNorm, convolution,
  ReLU; see ``hessopt.hvp.fast_paths``); ``HessianOperator`` products: a fresh graph per product
  by reverse-over-reverse and by forward-over-reverse (``method="forward_over_reverse"``), and
  the marginal cost of one product on a cached graph; AdamW steps and AdaHessian steps (closure,
  Hessian every step, fast paths on/off; and ``update_each=10``, timed over 10-step windows);
* **peak memory** (CUDA: ``torch.cuda.max_memory_allocated``), each contender measured alone, as
  the footprint of a standalone run (its model copy, optimizer state, gradients, graph, the batch);
* **exactness on the device**: relative difference of the fast-path HVP and of the
  forward-over-reverse product from the plain double backward (TF32 off for the check);
* **profiles** (``torch.profiler``, top kernels by device time) of one hessopt HVP with the fast
  paths on and off and of one AdaHessian step, plus device time grouped by kernel family.

Outputs: ``profile_hvp.json`` (everything), ``profile_hvp.txt`` (summary and the tables), one
``profile_<workload>_<what>.txt`` per profiler table. The summary compares against the project's GPU
targets: AdaHessian step <= 3.0x AdamW, Hessian every 10 steps <= 1.3x, peak memory <= 1.5x AdamW,
one HVP <= 3x one gradient.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script: make `hessopt` and `benchmarks` importable
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

import hessopt  # noqa: E402
from hessopt.hvp import fast_paths  # noqa: E402
from hessopt.operators import flatten  # noqa: E402
from benchmarks.harness import GIB, Clock, format_error, free_memory, log  # noqa: E402

TARGETS = {"adahessian_step": 3.0, "adahessian_k10": 1.3, "memory": 1.5, "hvp": 3.0}


class Device(Clock):
    """The benchmarks' :class:`~benchmarks.harness.Clock`, built from a device name, with the two
    conveniences this script uses: ``free()`` and ``allocated()`` as a number (0 on CPU)."""

    def __init__(self, name: str):
        super().__init__(torch.device(name))

    def free(self) -> None:
        free_memory(self.device)

    def allocated(self) -> int:
        return super().allocated() or 0


# --------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------

ALL_OFF = dict(batchnorm=False, conv=False, relu=False)


def _with_paths(fn: Callable[[], Any], **paths) -> Callable[[], Any]:
    def run():
        with fast_paths(**paths):
            return fn()
    return run


def make_contenders(wl, model, x, y, params, v, has_bn: bool, is_gpt: bool) -> Dict[str, Dict[str, Any]]:
    """name -> {"setup": () -> run, "window": steps per sample, "kind": "hvp"|"step"|"grad", "what": text}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    loss_fn = wl.loss_fn

    def loss_closure():
        return loss_fn(model(x), y)

    def plain_hvp():
        g = torch.autograd.grad(loss_closure(), params, create_graph=True)
        return torch.autograd.grad(g, params, grad_outputs=v)

    def plain_hvp_math():
        with sdpa_kernel([SDPBackend.MATH]):
            return plain_hvp()

    def hvp():
        return hessopt.hvp(loss_closure, params, v)

    out: Dict[str, Dict[str, Any]] = {}

    def add(name, setup, kind="hvp", window=1, what=""):
        out[name] = dict(setup=setup, kind=kind, window=window, what=what)

    add("gradient", lambda: (lambda: torch.autograd.grad(loss_closure(), params)), "grad",
        what="forward + backward, torch.autograd.grad")
    add("plain_double_backward", lambda: plain_hvp,
        what="inline: autograd.grad(create_graph=True), then autograd.grad(g, params, grad_outputs=v)")
    if is_gpt:
        add("plain_double_backward_math_sdpa", lambda: plain_hvp_math,
            what="the same under sdpa_kernel(MATH) (the default attention kernels have no double backward)")
    add("hessopt_hvp", lambda: hvp, what="hessopt.hvp, every fast path on (default)")
    add("hessopt_hvp_no_fast_paths", lambda: _with_paths(hvp, **ALL_OFF),
        what="hessopt.hvp with fast_paths(batchnorm=False, conv=False, relu=False)")
    if not is_gpt:
        for path in ("batchnorm", "conv", "relu"):
            only = dict(ALL_OFF, **{path: True})
            add(f"hessopt_hvp_only_{path}", lambda only=only: _with_paths(hvp, **only),
                what=f"hessopt.hvp with only the {path} fast path on")
    bn_mode = "train"

    def operator(method: str, cached: bool):
        def setup():
            target = copy.deepcopy(model) if cached else model  # a cached graph must see fixed parameters
            op = hessopt.HessianOperator(target, loss_fn, (x, y), bn_mode=bn_mode, cache_graph=cached, method=method)
            flat = flatten(v)
            if cached:
                op @ flat  # builds and caches the gradient graph outside the timed windows
            return lambda: op @ flat
        return setup

    add("operator_reverse_fresh", operator("reverse", False),
        what="HessianOperator(bn_mode='train', cache_graph=False) @ v: forward, graph, product")
    add("operator_forward_over_reverse", operator("forward_over_reverse", False),
        what="HessianOperator(bn_mode='train', method='forward_over_reverse') @ v: jvp of grad")
    add("operator_reverse_cached", operator("reverse", True),
        what="HessianOperator(bn_mode='train', cache_graph=True) @ v: one extra backward per product")

    ah = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0)

    def step_setup(kind: str, paths: Optional[dict] = None, update_each: int = 1, window: int = 1):
        def setup():
            m = copy.deepcopy(model)
            if kind == "adamw":
                opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
            else:
                opt = hessopt.AdaHessian(m.parameters(), update_each=update_each, **ah)

            def one_step():
                if kind == "adamw":
                    opt.zero_grad()
                    loss_fn(m(x), y).backward()
                    opt.step()
                    return

                def closure():
                    opt.zero_grad()
                    loss = loss_fn(m(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)

            def run():
                for _ in range(window):
                    one_step()
                opt.zero_grad(set_to_none=True)  # frees what the window built (as the benchmark harness does)

            return _with_paths(run, **paths) if paths else run
        return setup

    add("adamw_step", step_setup("adamw"), "step", what="zero_grad; loss.backward(); AdamW.step()")
    add("adahessian_step", step_setup("ah"), "step",
        what="AdaHessian.step(closure), Hessian every step, fast paths on")
    add("adahessian_step_no_fast_paths", step_setup("ah", ALL_OFF), "step",
        what="the same with every fast path off")
    add("adamw_step_x10", step_setup("adamw", window=10), "step", window=10,
        what="AdamW timed over 10-step windows (the reference of adahessian_k10)")
    add("adahessian_k10", step_setup("ah", update_each=10, window=10), "step", window=10,
        what="AdaHessian(update_each=10), 10-step windows holding one Hessian step, per step")
    for name, c in out.items():  # contenders that hold a model copy of their own
        c["own_model"] = c["kind"] == "step" or name == "operator_reverse_cached"
    return out


def interleaved(contenders: Dict[str, Dict[str, Any]], dev: Device, repeats: int, warmup: int) -> Dict[str, Dict[str, Any]]:
    """Build every contender, warm it up, then time round-robin (rotating start); median per step."""
    runs, results = {}, {}
    for name, c in contenders.items():
        results[name] = dict(samples_ms=[], error=None, window=c["window"], what=c["what"], kind=c["kind"])
        try:
            run = c["setup"]()
            for _ in range(warmup):
                run()
            dev.sync()
            runs[name] = run
        except Exception as err:  # a crash is a result
            results[name]["error"] = format_error(err)
            log(f"  {name}: FAILED in set-up/warm-up: {results[name]['error']}")
            traceback.print_exc(limit=3)
    names = list(runs)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        for name in order:
            if name not in runs:
                continue
            try:
                dt = dev.timed(runs[name])
                results[name]["samples_ms"].append(1e3 * dt / results[name]["window"])
            except Exception as err:
                results[name]["error"] = format_error(err)
                runs.pop(name)
                log(f"  {name}: FAILED: {results[name]['error']}")
    for res in results.values():
        s = res["samples_ms"]
        res.update(median_ms=statistics.median(s) if s else None, min_ms=min(s) if s else None,
                   max_ms=max(s) if s else None)
    runs.clear()
    dev.free()
    return results


def measure_memory(contenders, names, dev: Device, batch_bytes: int, model_bytes: int) -> Dict[str, Dict[str, Any]]:
    """Each contender alone: the peak allocated during one run (after a warm-up run that creates the
    optimizer state), as the footprint of a standalone run: growth of the peak over the memory in
    use before the contender was built, plus the batch, plus the model for contenders that use the
    shared model instead of a copy of their own."""
    out: Dict[str, Dict[str, Any]] = {}
    for name in names:
        c = contenders[name]
        dev.free()
        start = dev.allocated()
        run = None
        try:
            run = c["setup"]()
            run()
            dev.sync()
            torch.cuda.reset_peak_memory_stats(dev.device)
            run()
            dev.sync()
            peak = torch.cuda.max_memory_allocated(dev.device)
            footprint = peak - start + batch_bytes + (0 if c["own_model"] else model_bytes)
            out[name] = dict(peak_gib=footprint / GIB, raw_peak_gib=peak / GIB)
        except Exception as err:
            out[name] = dict(peak_gib=None, error=format_error(err))
        finally:
            run = None
            dev.free()
    return out


# --------------------------------------------------------------------------------------------------
# Exactness on the device, profiles
# --------------------------------------------------------------------------------------------------

def check_exactness(wl, model, x, y, params, v, is_gpt: bool) -> Dict[str, Any]:
    """Relative differences (max-abs over max-abs) from the plain double backward, TF32 off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    out: Dict[str, Any] = {}
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            state = copy.deepcopy(model.state_dict())

            def reset():
                model.load_state_dict(state)  # train-mode forwards update running statistics

            def rel(a, b):
                a = a if isinstance(a, torch.Tensor) else flatten(a)
                b = b if isinstance(b, torch.Tensor) else flatten(b)
                return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

            with sdpa_kernel([SDPBackend.MATH]):
                reset()
                g = torch.autograd.grad(wl.loss_fn(model(x), y), params, create_graph=True)
                ref = [t.detach() for t in torch.autograd.grad(g, params, grad_outputs=v)]
                del g
            reset()
            out["hessopt_hvp_vs_plain"] = rel(hessopt.hvp(lambda: wl.loss_fn(model(x), y), params, v), ref)
            reset()
            with fast_paths(**ALL_OFF):
                out["hessopt_hvp_no_fast_paths_vs_plain"] = rel(hessopt.hvp(lambda: wl.loss_fn(model(x), y), params, v), ref)
            flat = flatten(v)
            for method in ("reverse", "forward_over_reverse"):
                try:
                    op = hessopt.HessianOperator(model, wl.loss_fn, (x, y), bn_mode="train", cache_graph=False, method=method)
                    out[f"operator_{method}"] = op @ flat
                except Exception as err:
                    out[f"operator_{method}"] = format_error(err)
            a, b = out.pop("operator_forward_over_reverse"), out.pop("operator_reverse")
            out["forward_over_reverse_vs_reverse_operator"] = (
                rel(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else f"{a} / {b}")
            reset()
    except Exception as err:
        out["error"] = format_error(err)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return out


FAMILIES = [  # (family, substrings of kernel names, lower case); first match wins
    ("convolution (cuDNN/implicit GEMM)", ("conv", "cudnn", "xmma", "implicit_gemm", "winograd", "fft", "dgrad", "wgrad", "fprop")),
    ("matmul (GEMM)", ("gemm", "cutlass", "cublas", "matmul", "addmm", "bmm", "mm_")),
    ("batch norm kernels", ("batch_norm", "batchnorm", "bn_")),
    ("reductions", ("reduce", "sum", "mean", "norm")),
    ("copies/transposes", ("copy", "transpose", "permute", "cat", "contiguous", "flip")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "foreach", "threshold", "mul", "add", "fill")),
    ("softmax/attention", ("softmax", "attention", "flash", "fmha")),
]


def profile(fn: Callable[[], Any], dev: Device, rows: int) -> Dict[str, Any]:
    """One profiled call after a warm-up: table of the top kernels by device time, family totals."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    dev.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
    with torch_profile(activities=activities) as prof:
        fn()
        dev.sync()
    events = prof.key_averages()
    table, sort = None, None
    for sort in (("self_device_time_total", "self_cuda_time_total") if dev.cuda else ("self_cpu_time_total",)):
        try:
            table = events.table(sort_by=sort, row_limit=rows, max_name_column_width=90)
            break
        except Exception:  # the column was renamed across torch versions
            continue
    families: Dict[str, float] = {}
    total = 0.0
    launches = 0
    if dev.cuda:
        for e in events:  # kernels only (CPU-side ops carry the device time of their kernels too)
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            self_us = getattr(e, "self_device_time_total", None)
            if self_us is None:
                self_us = getattr(e, "self_cuda_time_total", 0.0)
            if not self_us:
                continue
            name = e.key.lower()
            fam = next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")
            families[fam] = families.get(fam, 0.0) + self_us / 1e3
            total += self_us / 1e3
            launches += e.count
    return dict(table=table, sort_by=sort, device_ms_by_family=families, device_ms_total=total,
                kernel_launches=launches)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def run_workload(wl, args, dev: Device) -> Dict[str, Any]:
    log(f"workload {wl.name} {wl.config}")
    dev.free()
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    start = dev.allocated()
    x, y = wl.batch(dev.device, gen)
    batch_bytes = dev.allocated() - start
    model = wl.build().to(dev.device).train()
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn(p.shape, generator=gen).to(dev.device, p.dtype) for p in params]
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in model.modules())
    is_gpt = wl.name.startswith("gpt")
    contenders = make_contenders(wl, model, x, y, params, v, has_bn, is_gpt)
    if args.methods:
        keep = set(args.methods) | {"gradient", "adamw_step", "adamw_step_x10"}
        contenders = {k: c for k, c in contenders.items() if k in keep}
    rec: Dict[str, Any] = dict(config=wl.config, num_params=sum(p.numel() for p in params), has_batchnorm=has_bn)

    log("  exactness on the device")
    rec["exactness"] = check_exactness(wl, model, x, y, params, v, is_gpt)
    log(f"  {rec['exactness']}")

    log(f"  timing {len(contenders)} contenders x {args.repeats} rounds")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*create_graph=True.*")
        times = interleaved(contenders, dev, args.repeats, args.warmup)
        grad_ms = times["gradient"]["median_ms"]
        adamw_ms = times.get("adamw_step", {}).get("median_ms")
        adamw10_ms = times.get("adamw_step_x10", {}).get("median_ms")
        for name, res in times.items():
            res["ratio_to_gradient"] = _ratio(res["median_ms"], grad_ms)
            ref = adamw10_ms if res["window"] > 1 else adamw_ms
            res["ratio_to_adamw"] = _ratio(res["median_ms"], ref) if res["kind"] == "step" else None
        rec["times"] = times
        for name, res in times.items():
            log(f"  {name:34s} {res['median_ms'] if res['median_ms'] is not None else float('nan'):9.2f} ms"
                f"  x grad {res['ratio_to_gradient'] or float('nan'):5.2f}"
                f"  x adamw {res['ratio_to_adamw'] or float('nan'):5.2f}  {res['error'] or ''}")

        if dev.cuda:
            log("  peak memory, each contender alone")
            mem_names = [n for n in ("adamw_step", "adahessian_step", "adahessian_step_no_fast_paths", "gradient",
                                     "plain_double_backward", "hessopt_hvp", "hessopt_hvp_no_fast_paths",
                                     "operator_reverse_fresh", "operator_forward_over_reverse") if n in contenders]
            memory = measure_memory(contenders, mem_names, dev, batch_bytes, model_bytes)
            base = memory.get("adamw_step", {}).get("peak_gib")
            for name, m in memory.items():
                m["ratio_to_adamw"] = _ratio(m.get("peak_gib"), base)
                log(f"  {name:34s} peak {m.get('peak_gib') or float('nan'):7.3f} GiB  x adamw "
                    f"{m['ratio_to_adamw'] or float('nan'):5.2f} {m.get('error', '')}")
            rec["memory"] = memory

        if not args.no_profile:
            log("  profiles")
            loss = lambda: wl.loss_fn(model(x), y)  # noqa: E731
            prof_targets = {
                "hessopt_hvp": lambda: hessopt.hvp(loss, params, v),
                "hessopt_hvp_no_fast_paths": _with_paths(lambda: hessopt.hvp(loss, params, v), **ALL_OFF),
                "gradient": lambda: torch.autograd.grad(loss(), params),
            }
            if "adahessian_step" in contenders:
                prof_targets["adahessian_step"] = contenders["adahessian_step"]["setup"]()
            rec["profiles"] = {}
            for what, fn in prof_targets.items():
                try:
                    p = profile(fn, dev, args.profile_rows)
                    path = os.path.join(args.out, f"profile_{wl.name}_{what}.txt")
                    with open(path, "w") as fh:
                        fh.write(f"{wl.name} / {what}: sorted by {p['sort_by']}\n{p['table']}\n")
                    rec["profiles"][what] = {k: p[k] for k in ("device_ms_by_family", "device_ms_total",
                                                               "kernel_launches", "sort_by")}
                    rec["profiles"][what]["table_file"] = os.path.basename(path)
                    rec["profiles"][what]["table"] = p["table"]
                except Exception as err:
                    rec["profiles"][what] = dict(error=format_error(err))
            prof_targets.clear()
    del model, params, v, x, y, contenders
    dev.free()
    return rec


def summary(results: Dict[str, Any], env: Dict[str, Any]) -> str:
    lines = [f"hessopt HVP / AdaHessian profile  {env['device']}  torch {env['torch']}  {env['date']}",
             f"command: {env['command']}", ""]
    for name, rec in results["workloads"].items():
        if "error" in rec and "times" not in rec:
            lines += [f"== {name}: FAILED {rec['error']}", ""]
            continue
        t, mem = rec["times"], rec.get("memory", {})
        lines.append(f"== {name}  ({rec['num_params']:,} parameters)")
        lines.append(f"{'contender':36s} {'ms':>9s} {'x grad':>7s} {'x AdamW':>8s} {'peak GiB':>9s} {'x AdamW':>8s}  error")
        for cname, res in t.items():
            m = mem.get(cname, {})

            def f(val, fmt):
                return format(val, fmt) if isinstance(val, (int, float)) else "-"
            lines.append(f"{cname:36s} {f(res['median_ms'], '9.2f')} {f(res['ratio_to_gradient'], '7.2f')} "
                         f"{f(res['ratio_to_adamw'], '8.2f')} {f(m.get('peak_gib'), '9.3f')} "
                         f"{f(m.get('ratio_to_adamw'), '8.2f')}  {res['error'] or ''}")
        checks = []

        def target(label, value, limit):
            if isinstance(value, (int, float)):
                checks.append(f"{label} {value:.2f} (target <= {limit}: {'MET' if value <= limit else 'not met'})")
            else:
                checks.append(f"{label} n/a")
        target("AdaHessian step / AdamW", t.get("adahessian_step", {}).get("ratio_to_adamw"), TARGETS["adahessian_step"])
        target("AdaHessian k10 / AdamW", t.get("adahessian_k10", {}).get("ratio_to_adamw"), TARGETS["adahessian_k10"])
        target("peak memory AdaHessian / AdamW", mem.get("adahessian_step", {}).get("ratio_to_adamw"), TARGETS["memory"])
        target("HVP / gradient", t.get("hessopt_hvp", {}).get("ratio_to_gradient"), TARGETS["hvp"])
        lines += ["targets: " + "; ".join(checks), f"exactness: {rec.get('exactness')}"]
        for what, p in rec.get("profiles", {}).items():
            if "device_ms_by_family" in p:
                fam = ", ".join(f"{k} {v:.1f}" for k, v in sorted(p["device_ms_by_family"].items(), key=lambda kv: -kv[1]))
                lines.append(f"profile {what}: device {p['device_ms_total']:.1f} ms in {p['kernel_launches']} "
                             f"kernels; by family (ms): {fam}")
        lines.append("")
    legend = {}
    for rec in results["workloads"].values():
        for cname, res in rec.get("times", {}).items():
            legend.setdefault(cname, res.get("what", ""))
    if legend:
        lines += ["contenders:"] + [f"  {k:34s} {v}" for k, v in legend.items()] + [""]
    for name, rec in results["workloads"].items():
        for what, p in rec.get("profiles", {}).items():
            if "table" in p:
                lines += [f"---- {name} / {what} (top kernels, sorted by {p['sort_by']})", p["table"], ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="runs/profile_hvp")
    ap.add_argument("--quick", action="store_true", help="toy sizes (CPU smoke test)")
    ap.add_argument("--workloads", type=lambda s: s.split(","), default=None)
    ap.add_argument("--methods", type=lambda s: s.split(","), default=None, help="only these contenders (+ references)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds per contender (default 2; quick 1)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    os.makedirs(args.out, exist_ok=True)
    dev = Device(args.device)
    from benchmarks.workloads import get_workloads

    env = dict(
        device=torch.cuda.get_device_name(dev.device) if dev.cuda else "cpu",
        torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if dev.cuda else None,
        cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_tf32=torch.backends.cudnn.allow_tf32,
        matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join(["python", os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "benchmarks/profile_hvp.py"]
                           + list(sys.argv[1:] if argv is None else argv)),
        repeats=args.repeats, warmup=args.warmup, targets=TARGETS,
    )
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    results: Dict[str, Any] = dict(env=env, workloads={})

    def write():
        def clean(obj):
            if isinstance(obj, float) and not math.isfinite(obj):
                return None
            if isinstance(obj, dict):
                return {k: clean(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [clean(v) for v in obj]
            return obj
        with open(os.path.join(args.out, "profile_hvp.json"), "w") as fh:
            json.dump(clean(results), fh, indent=1)
        with open(os.path.join(args.out, "profile_hvp.txt"), "w") as fh:
            fh.write(summary(results, env))

    for wl in get_workloads(args.quick, args.workloads):
        try:
            results["workloads"][wl.name] = run_workload(wl, args, dev)
        except Exception as err:
            traceback.print_exc()
            results["workloads"][wl.name] = dict(error=format_error(err))
        write()  # partial results survive a time limit
    print(summary(results, env))
    log(f"wrote {args.out}/profile_hvp.json and profile_hvp.txt")
    return results


if __name__ == "__main__":
    main()
