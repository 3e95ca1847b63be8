"""Markdown report (results.md) from the JSON records, with the peer figures (measured by the hessopt authors
with the peers' own code on one H100) beside them."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from .optimizers import OPTIMIZER_NAMES

PEER_SOURCE = (
    "measured by the hessopt authors with the peers' own code on one NVIDIA H100, torch 2.11, "
    "timm 1.0.29; not re-run by this suite"
)

# the peers' optimizer table (peer step time as a multiple of AdamW's, peak memory)
PEER_OPTIMIZER_FIGURES = [
    ("CIFAR ResNet20, batch 128, 32x32", "10.4 ms", "timm 6.26x, torch-optimizer 6.19x, pytorch-optimizer 5.24x",
     "1.61x", "0.27 → 0.54-0.69"),
    ("timm resnet50, batch 64, 224x224", "38.3 ms", "timm 7.40x, torch-optimizer 7.66x, pytorch-optimizer 7.19x",
     "1.63x", "5.9 → 13.4-16.7"),
    ("GPT 6 layers, d=512, T=256, batch 16", "18.6 ms",
     "all crash with PyTorch's default attention kernel; forced to the math kernel: timm 4.41x, pytorch-optimizer "
     "4.20x; torch-optimizer crashes (UnboundLocalError on 3-D params)", "1.59x", "12.7 → 17.2-24.8"),
]

PEER_HVP_FIGURES = (
    "HVP by double backward, relative to one gradient (forward+backward): ResNet20 4.9x, resnet50 7.3x, GPT 3.5x. "
    "Forward-over-reverse (`torch.func.jvp(grad)`) fails on BatchNorm in train mode and was 5.5x on the GPT."
)

# the peers' diagnostics on a CIFAR ResNet20 trained 10 epochs (82% test accuracy), 1024 test images,
# BatchNorm in eval mode, H100: one HVP = 3.7 gradients (111 ms)
PEER_DIAGNOSTICS_FIGURES = [
    ("PyHessian power iteration, top-1 (tol 1e-3)", "7", "0.6", "rel. error 1.9e-3 (stops on a relative change)"),
    ("PyHessian power iteration, top-5", "59", "6.0", "rel. errors 2e-4 to 2.9e-3"),
    ("PyHessian trace (tol 1e-3)", "33", "3.0", "4.6% off (stops after a few samples, no error bar)"),
    ("PyHessian density, 100 Lanczos steps", "100", "29.1",
     "top node 2e-5; 18 s of the 29 s are its Python reorthogonalization, not HVPs"),
    ("hessian-eigenthings Lanczos k=1 (tol 1e-4)", "2", "0.4", "17% off, reported as converged"),
    ("hessian-eigenthings Lanczos k=5", "10", "1.1", "4th and 5th eigenvalues 6% off"),
    ("hessian-eigenthings deflated power, k=1 / k=5", "28 / 122", "3.1 / 13.8", "rel. errors <= 2e-5"),
    ("hessian-eigenthings Hutchinson 100 / Hutch++ 99", "100 / 99", "11 / 12", "0.6% / 0.6% off"),
]
PEER_DIAGNOSTICS_CONTEXT = (
    "CIFAR ResNet20 trained 10 epochs on the CIFAR-10 JPEGs (82% test accuracy, 272k parameters), 1024 test "
    "images, BatchNorm in eval mode, H100: one HVP = 3.7 gradients (111 ms). Reference (150-step Lanczos, full "
    "reorthogonalization, float64): top-5 eigenvalues 243.36, 189.03, 95.07, 68.95, 51.53; smallest -16.16; "
    "trace 1199 +- 31 (300 Hutchinson samples)."
)


def _f(x: Optional[float], fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _sci(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.1e}"


def _err(rec: Dict[str, Any]) -> str:
    e = rec.get("error") or ""
    return e.replace("|", "\\|")


def _short_err(rec: Dict[str, Any]) -> str:
    if rec.get("skipped"):
        return "not installed"
    e = rec.get("error") or ""
    return "crash" if e else ""


def _header(records: List[Dict[str, Any]]) -> List[str]:
    first = records[0]
    lines = [f"- device: {first['device']}; torch {first['torch']}; date {first['date']}",
             f"- command: `{first['command']}`"]
    return lines


def optimizer_section(records: List[Dict[str, Any]]) -> List[str]:
    out = ["## Optimizer suite: forward + backward + step", ""]
    out += _header(records)
    out += ["- time: median over repeats of timed windows (synchronized on CUDA), all optimizers interleaved round-robin; "
            "`_k10` and SophiaH per step over 10-step windows (one Hessian step each)",
            "- memory: peak GiB this optimizer would use alone (see README); `–` on CPU (not measured)", ""]
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    names = [n for n in OPTIMIZER_NAMES if any(r["optimizer"] == n for r in records)]
    by = {(r["workload"], r["optimizer"]): r for r in records}
    out.append("Step time as a multiple of AdamW's (same run), peak memory in GiB:")
    out.append("")
    out.append("| workload | adamw ms | adamw GiB | " + " | ".join(n for n in names if n != "adamw") + " |")
    out.append("|---|---|---|" + "---|" * (len(names) - ("adamw" in names)))
    for wl in workloads:
        a = by.get((wl, "adamw"), {})
        cells = []
        for n in names:
            if n == "adamw":
                continue
            r = by.get((wl, n))
            if r is None:
                cells.append("–")
            elif r.get("error"):
                cells.append(_short_err(r))
            else:
                mem = "" if r.get("peak_mem_gib") is None else f" / {r['peak_mem_gib']:.2f} GiB"
                cells.append(f"{_f(r.get('ratio_to_adamw'))}x{mem}")
        out.append(f"| {wl} | {_f(a.get('step_ms'))} | {_f(a.get('peak_mem_gib'))} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Details:")
    out.append("")
    out.append("| workload | optimizer | step ms (min-max) | x AdamW | peak GiB | mem x AdamW | last loss | error |")
    out.append("|---|---|---|---|---|---|---|---|")
    for wl in workloads:
        for n in names:
            r = by.get((wl, n))
            if r is None:
                continue
            span = "" if r.get("step_ms_min") is None else f" ({r['step_ms_min']:.2f}-{r['step_ms_max']:.2f})"
            out.append(f"| {wl} | {n} | {_f(r.get('step_ms'))}{span} | {_f(r.get('ratio_to_adamw'))} | "
                       f"{_f(r.get('peak_mem_gib'))} | {_f(r.get('mem_ratio_to_adamw'))} | "
                       f"{_f(r.get('last_loss'), '{:.3g}')} | {_err(r)} |")
    out += ["", f"Peer figures ({PEER_SOURCE}):", "",
            "| workload | AdamW step | peer AdaHessian step (x AdamW) | peer SophiaH (x AdamW, Hessian every 10) | peak GiB AdamW → AdaHessian |",
            "|---|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in PEER_OPTIMIZER_FIGURES]
    return out + [""]


def hvp_section(records: List[Dict[str, Any]]) -> List[str]:
    out = ["## HVP suite: one Hessian-vector product relative to one gradient", ""]
    out += _header(records)
    bn = next((r.get("bn_mode") for r in records if r.get("bn_mode")), None)
    out += [f"- BatchNorm mode: {bn or 'n/a'}; all methods interleaved round-robin, median (synchronized on CUDA)",
            ""]
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    by = {(r["workload"], r["method"]): r for r in records}
    out.append("| workload | gradient ms | " + " | ".join(f"{m} (x grad)" for m in methods if m != "gradient") + " |")
    out.append("|---|---|" + "---|" * (len(methods) - 1))
    for wl in workloads:
        g = by.get((wl, "gradient"), {})
        cells = []
        for m in methods:
            if m == "gradient":
                continue
            r = by.get((wl, m))
            cells.append("–" if r is None else "crash" if r.get("error") else f"{_f(r.get('ratio_to_grad'))}x")
        out.append(f"| {wl} | {_f(g.get('step_ms'))} | " + " | ".join(cells) + " |")
    out += ["", "Details:", "", "| workload | method | ms (min-max) | x gradient | x AdamW step | peak GiB | error |",
            "|---|---|---|---|---|---|---|"]
    for wl in workloads:
        for m in methods:
            r = by.get((wl, m))
            if r is None:
                continue
            span = "" if r.get("step_ms_min") is None else f" ({r['step_ms_min']:.2f}-{r['step_ms_max']:.2f})"
            out.append(f"| {wl} | {m} | {_f(r.get('step_ms'))}{span} | {_f(r.get('ratio_to_grad'))} | "
                       f"{_f(r.get('ratio_to_adamw'))} | {_f(r.get('peak_mem_gib'))} | {_err(r)} |")
    out += ["", f"Peer figures ({PEER_SOURCE}): {PEER_HVP_FIGURES}", ""]
    return out


def _eig_result(r: Dict[str, Any]) -> str:
    if r.get("error"):
        return f"error: {_err(r)}"
    vals = ", ".join("–" if v is None else f"{v:.4g}" for v in r.get("eigenvalues") or [])
    errs = [e for e in (r.get("rel_errors") or []) if e is not None]
    err_txt = "–" if not errs else (_sci(errs[0]) if len(errs) == 1 else f"{_sci(min(errs))} to {_sci(max(errs))}")
    k = r.get("k") or 0
    if r.get("found") is not None and r["found"] < k:
        err_txt += f" (only {r['found']} of {k} found within the budget)"
    rres = [x for x in (r.get("rel_residuals") or []) if x is not None]
    conv = "converged" if r.get("converged") else "NOT converged"
    return f"[{vals}]; rel. error {err_txt}; max residual/lambda {_sci(max(rres) if rres else None)}; {conv}"


def diagnostics_section(records: List[Dict[str, Any]]) -> List[str]:
    out = ["## Diagnostics suite: eigenvalues, trace, density on a trained network", ""]
    out += _header(records)
    by = {r["method"]: r for r in records}
    model = by.get("model", {})
    ref = by.get("reference", {})
    out.append(f"- model: {model.get('model')} on {model.get('dataset')}, {model.get('num_params')} parameters, "
               f"test accuracy {_f(model.get('test_accuracy'), '{:.4f}')}; "
               + (f"trained {model.get('epochs')} epochs in {_f(model.get('train_seconds'), '{:.1f}')} s"
                  if model.get("train_seconds") is not None else f"checkpoint {model.get('checkpoint')}"))
    out.append(f"- Hessian: mean cross-entropy on a fixed batch of {model.get('batch')} test images, BatchNorm in "
               "eval mode, float32")
    if ref.get("error"):
        out.append(f"- reference FAILED: {_err(ref)}")
    else:
        eig = ", ".join(f"{v:.4g}" for v in ref.get("eigenvalues") or [])
        res = ", ".join(_sci(v) for v in ref.get("residuals") or [])
        out.append(f"- reference ({ref.get('kind')}): top-5 [{eig}] (residuals [{res}]); smallest "
                   f"{_f(ref.get('smallest'), '{:.4g}')}; trace {_f(ref.get('trace'), '{:.4g}')} +- "
                   f"{_f(ref.get('trace_std_error'), '{:.3g}')}; {_f(ref.get('seconds'), '{:.1f}')} s")
    cost = [by.get(k) for k in ("gradient", "hvp_fresh_graph", "hvp_cached_graph")]
    if all(cost) and not any(c.get("error") for c in cost):
        out.append(f"- one gradient {cost[0]['step_ms']:.1f} ms; one HVP = {cost[1]['ratio_to_grad']:.2f} gradients "
                   f"(fresh graph, {cost[1]['step_ms']:.1f} ms), {cost[2]['ratio_to_grad']:.2f} gradients (cached graph, "
                   f"{cost[2]['step_ms']:.1f} ms)")
    out += ["", "hessopt (this run; seconds include building the operator's graph once):", "",
            "| method | matvecs | seconds (in HVPs) | result |", "|---|---|---|---|"]
    for r in records:
        m = r["method"]
        if m in ("model", "reference", "gradient", "hvp_fresh_graph", "hvp_cached_graph", "hvp_cost"):
            continue
        secs = "–" if r.get("seconds") is None else f"{r['seconds']:.2f} ({r['hvp_seconds']:.2f})"
        if m.startswith(("lanczos_", "power_")):
            variant = m.rsplit("_top", 1)[0].replace("lanczos_nocheck", "lanczos, check_multiplicity=False,")
            label = f"{variant} top-{r.get('k')} (tol {r.get('tol'):g})"
            result = _eig_result(r)
        elif "_trace_" in m:
            label = f"{'Hutch++' if m.startswith('hutchpp') else 'Hutchinson'} trace, budget {r.get('budget')}"
            result = (f"error: {_err(r)}" if r.get("error") else
                      f"{r['estimate']:.4g} +- {r['std_error']:.3g}; rel. error {_pct(r.get('rel_error'))} "
                      f"(std. error {_pct(r.get('rel_std_error'))}); z = {_f(r.get('z'))}")
        elif m.startswith("slq_"):
            label = f"SLQ density, {r.get('steps')} Lanczos steps"
            result = (f"error: {_err(r)}" if r.get("error") else
                      f"top node rel. error {_sci(r.get('top_node_rel_error'))}; trace from density ({r.get('runs')} probe) rel. error "
                      f"{_pct(r.get('trace_from_esd_rel_error'))}; {r['other_seconds']:.2f} s of {r['seconds']:.2f} s "
                      "outside HVPs")
        else:
            label, result = m, _err(r)
        out.append(f"| {label} | {r.get('matvecs', '–')} | {secs} | {result} |")
    out += ["", f"Peers ({PEER_SOURCE}; {PEER_DIAGNOSTICS_CONTEXT}):", "",
            "| tool / method | matvecs | seconds | result |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in PEER_DIAGNOSTICS_FIGURES]
    return out + [""]


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


SECTIONS = {"optimizer": optimizer_section, "hvp": hvp_section, "diagnostics": diagnostics_section}


def render(records: Iterable[Dict[str, Any]]) -> str:
    records = list(records)
    lines = ["# hessopt benchmark results", ""]
    if any(r["device"] == "cpu" for r in records):
        lines += ["CPU results show that the harness runs; they say little about GPU speed.", ""]
    for suite, section in SECTIONS.items():
        recs = [r for r in records if r["suite"] == suite]
        if recs:
            lines += section(recs)
    return "\n".join(lines) + "\n"
