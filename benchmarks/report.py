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
    out += _model_lines(model)
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
        if m in ("model", "reference", "reference_ggn", "gradient", "hvp_fresh_graph", "hvp_cached_graph", "hvp_cost") \
                or r.get("side_by_side"):
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
    out.append("")
    if any(r.get("side_by_side") for r in records):
        out += side_by_side_section(records)
    return out + [""]


def _model_lines(model: Dict[str, Any]) -> List[str]:
    trained = (f"trained {model.get('steps')} AdamW steps" if model.get("steps") is not None
               else f"trained {model.get('epochs')} epochs")
    trained = (f"{trained} in {_f(model.get('train_seconds'), '{:.1f}')} s" if model.get("train_seconds") is not None
               else f"checkpoint {model.get('checkpoint')}")
    if model.get("model") == "gpt":
        return [f"- model: GPT (benchmarks/gpt.py) d_model {model.get('d_model')}, {model.get('n_layers')} layers, "
                f"{model.get('n_heads')} heads, context {model.get('seq_len')}, vocabulary {model.get('vocab_size')}, "
                f"{model.get('num_params')} parameters, validation loss {_f(model.get('val_loss'), '{:.4f}')} nats/char; "
                f"{trained}",
                f"- Hessian: {model.get('hessian_of')} ({model.get('batch')} sequences, {model.get('tokens')} tokens), "
                f"float32; attention: {model.get('attention')}"]
    return [f"- model: {model.get('model')} on {model.get('dataset')}, {model.get('num_params')} parameters, "
            f"test accuracy {_f(model.get('test_accuracy'), '{:.4f}')}; {trained}",
            f"- Hessian: mean cross-entropy on a fixed batch of {model.get('batch')} test images, BatchNorm in "
            "eval mode, float32"]


# --------------------------------------------------------------------------------------------------
# side by side: hessopt, hessian-eigenthings 1.0, curvlinops 3.x (benchmarks/peers_diagnostics.py)

TOOLS = ("hessopt", "eigenthings", "curvlinops")
TOOL_NAMES = {"hessopt": "hessopt", "eigenthings": "hessian-eigenthings 1.0", "curvlinops": "curvlinops 3.x"}


def _tool(r: Dict[str, Any]) -> str:
    return r.get("tool") or "hessopt"


def _kernel(r: Dict[str, Any]) -> str:
    return "math" if r["method"].endswith("_math") else "default"


def _crash(r: Dict[str, Any], width: int = 160) -> str:
    e = r.get("error") or ""
    if e.startswith("not installed"):
        return "not installed"
    e = e.replace("|", "\\|")
    return e if len(e) <= width else e[:width] + " ..."


def _spp(r: Dict[str, Any]) -> Optional[float]:
    if r.get("error") or not r.get("matvecs") or r.get("hvp_seconds") is None:
        return None
    return r["hvp_seconds"] / r["matvecs"]


def side_by_side_rows(records: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """The side-by-side records by quantity: ``eig`` (top-5, Hessian and GGN), ``trace`` (Hutch++ per
    budget), ``density`` (SLQ); hessopt's Hutch++ and SLQ are the suite's own records."""
    out: Dict[str, List[Dict[str, Any]]] = {"eig": [], "trace": [], "density": []}
    for r in records:
        m = r.get("method", "")
        if r.get("side_by_side") and "_top" in m:
            out["eig"].append(r)
        elif (r.get("side_by_side") and "_hutchpp_m" in m) or m.startswith("hutchpp_trace_m"):
            out["trace"].append(r)
        elif (r.get("side_by_side") and "_density_" in m) or m.startswith("slq_"):
            out["density"].append(r)
    order = {t: i for i, t in enumerate(TOOLS)}
    out["eig"].sort(key=lambda r: (r.get("matrix") != "hessian", _kernel(r) == "math", order.get(_tool(r), 9)))
    out["trace"].sort(key=lambda r: (r.get("budget") or 0, _kernel(r) == "math", order.get(_tool(r), 9)))
    out["density"].sort(key=lambda r: (_kernel(r) == "math", order.get(_tool(r), 9)))
    return out


def per_product_seconds(records: List[Dict[str, Any]]) -> Dict[tuple, Dict[str, Any]]:
    """(tool, matrix, kernel) -> seconds inside the products / products, over all its records."""
    acc: Dict[tuple, Dict[str, Any]] = {}
    rows = side_by_side_rows(records)
    for r in rows["eig"] + rows["trace"] + rows["density"]:
        if r.get("error") or not r.get("matvecs"):
            continue
        key = (_tool(r), r.get("matrix") or "hessian", _kernel(r))
        a = acc.setdefault(key, {"seconds": 0.0, "matvecs": 0})
        a["seconds"] += r["hvp_seconds"]
        a["matvecs"] += r["matvecs"]
    for a in acc.values():
        a["per_product"] = a["seconds"] / a["matvecs"]
    return acc


def side_by_side_section(records: List[Dict[str, Any]]) -> List[str]:
    by = {r["method"]: r for r in records}
    model, ref, ggn = by.get("model", {}), by.get("reference", {}), by.get("reference_ggn", {})
    rows = side_by_side_rows(records)
    measured = [r for r in records if r.get("load_avg_start") is not None and r["method"] != "model"]
    loads = [r["load_avg_start"][0] for r in measured] + [r["load_avg_end"][0] for r in measured]
    first = records[0]
    threads = model.get("torch_threads") or (first.get("host") or {}).get("cpu_threads")
    out = ["### Side by side: hessopt, hessian-eigenthings 1.0, curvlinops 3.x", "",
           f"- command: `{first['command']}`; date {first['date']}",
           f"- machine: {first['device']}" + (f" ({model.get('cpu_model')}, {model.get('cpu_count')} cores)"
                                               if model.get("cpu_model") else "")
           + f", torch threads {threads}; torch {first['torch']}",
           "- load average (1 min) over the measured records: "
           + (f"{min(loads):.2f} to {max(loads):.2f} (at the start of the first {measured[0]['load_avg_start'][0]:.2f}, "
              f"at the end of the last {measured[-1]['load_avg_end'][0]:.2f}); this run itself is 1.0 of it"
              if loads else "not recorded"),
           "- same float32 model, batch, tolerance (1e-4, top-5 largest algebraic) and Hutch++ budgets for every tool; "
           "seconds are wall time of the call, 'in products' the time inside the tool's own matvec (timed by a wrapper), "
           "s/product = seconds in products / products; operator construction is outside both (setup_seconds in the JSON)",
           ]
    if ref:
        out.append(f"- float64 Hessian reference ({ref.get('kind')}): top-5 ["
                   + ", ".join(f"{v:.6g}" for v in ref.get("eigenvalues") or []) + f"]; trace "
                   f"{_f(ref.get('trace'), '{:.6g}')} +- {_f(ref.get('trace_std_error'), '{:.3g}')}")
    if ggn:
        out.append(f"- float64 GGN reference ({ggn.get('kind')}): top-5 ["
                   + ", ".join(f"{v:.6g}" for v in ggn.get("eigenvalues") or []) + "]"
                   + (f"; FAILED: {_crash(ggn)}" if ggn.get("error") else ""))
    if any(_kernel(r) == "math" for r in records if r.get("side_by_side")):
        out.append("- attention: 'default' = PyTorch's default kernels (the fused CPU flash kernel here), what a user's "
                   "model runs; 'math' = the same peer call again inside `sdpa_kernel(SDPBackend.MATH)`, so that its "
                   "numbers exist. hessopt routes attention itself (second_order_safe) and runs once, on the default.")
    out += ["", "Top-5 eigenvalues (tol 1e-4):", "",
            "| tool | matrix | attention | matvecs | seconds | in products | s/product | max true rel. error | "
            "converged | crash |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows["eig"]:
        conv = r.get("converged")
        out.append(f"| {TOOL_NAMES.get(_tool(r), _tool(r))} | {r.get('matrix')} | {_kernel(r)} | {r.get('matvecs', '–')} | "
                   f"{_f(r.get('seconds'))} | {_f(r.get('hvp_seconds'))} | {_f(_spp(r), '{:.4f}')} | "
                   f"{_sci(r.get('max_rel_error'))} | {'–' if conv is None else ('yes' if conv else 'no')} | {_crash(r)} |")
    out += ["", "Hessian trace by Hutch++ at equal products (true error against the float64 reference; z = error / "
            "combined standard error, where the tool reports one):", "",
            "| tool | attention | budget | matvecs | estimate | reported std. error | true rel. error | z | s/product | "
            "crash |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows["trace"]:
        se = r.get("std_error")
        out.append(f"| {TOOL_NAMES.get(_tool(r), _tool(r))} | {_kernel(r)} | {r.get('budget')} | {r.get('matvecs', '–')} | "
                   f"{_f(r.get('estimate'), '{:.6g}')} | {'none reported' if se is None and not r.get('error') else _f(se, '{:.3g}')} | "
                   f"{_pct(r.get('rel_error'))} | {_f(r.get('z'))} | {_f(_spp(r), '{:.4f}')} | {_crash(r)} |")
    out += ["", "SLQ spectral density (overhead = seconds beyond the products):", "",
            "| tool | attention | Lanczos steps | matvecs | seconds | in products | overhead s (share) | top node rel. error | "
            "crash |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows["density"]:
        other = r.get("other_seconds")
        share = None if other is None or not r.get("seconds") else other / r["seconds"]
        out.append(f"| {TOOL_NAMES.get(_tool(r), _tool(r))} | {_kernel(r)} | {r.get('steps')} | {r.get('matvecs', '–')} | "
                   f"{_f(r.get('seconds'))} | {_f(r.get('hvp_seconds'))} | "
                   f"{'–' if other is None else f'{other:.2f} ({_pct(share)})'} | {_sci(r.get('top_node_rel_error'))} | "
                   f"{_crash(r)} |")
    steady = steady_per_product(records)
    if steady:
        out += ["", "Steady-state seconds per product (each tool's native product on the same vector; every "
                "contender built and applied once untimed, then interleaved round-robin; median, min-max; the "
                "cold first product, which includes one-off imports and graph building, apart):", "",
                "| tool | matrix | attention | s/product (median) | min-max | rounds | first product s | crash |",
                "|---|---|---|---|---|---|---|---|"]
        if steady[0].get("command") != first.get("command"):
            sl = [v for r in steady for v in (r.get("load_avg_start") or [None])[:1] + (r.get("load_avg_end") or [None])[:1]
                  if v is not None]
            out[-3:-2] = [f"(measured afterwards: `{steady[0]['command']}`, {steady[0]['date']}"
                          + (f", load average {min(sl):.2f} to {max(sl):.2f}" if sl else "") + ")", ""]
        for r in steady:
            kern = "default" if _tool(r) == "hessopt" or "default" in (r.get("attention_kernel") or "") else "math"
            out.append(f"| {TOOL_NAMES.get(_tool(r), _tool(r))} | {r.get('matrix')} | {kern} | "
                       f"{_f(r.get('seconds_per_product'), '{:.4f}')} | "
                       + ("–" if r.get("min_seconds") is None else f"{r['min_seconds']:.4f}-{r['max_seconds']:.4f}")
                       + f" | {r.get('repeats', '–')} | {_f(r.get('first_product_seconds'), '{:.3f}')} | {_crash(r)} |")
    pp = per_product_seconds(records)
    if pp:
        out += ["", "Seconds per product, over all of a tool's records on that operator (eigenvalues, trace, density):",
                "", "| tool | attention | Hessian s/product (products) | GGN s/product (products) |", "|---|---|---|---|"]
        for tool in TOOLS:
            for kern in ("default", "math"):
                h, g = pp.get((tool, "hessian", kern)), pp.get((tool, "ggn", kern))
                if h is None and g is None:
                    continue
                cell = lambda a: "–" if a is None else f"{a['per_product']:.4f} ({a['matvecs']})"  # noqa: E731
                out.append(f"| {TOOL_NAMES[tool]} | {kern} | {cell(h)} | {cell(g)} |")
    return out + [""]


def steady_per_product(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The interleaved per-product records (peers_diagnostics.per_product), hessopt first."""
    order = {t: i for i, t in enumerate(TOOLS)}
    rows = [r for r in records if r.get("per_product")]
    return sorted(rows, key=lambda r: (r.get("matrix") != "hessian", order.get(_tool(r), 9)))


def side_by_side_plot(records: List[Dict[str, Any]], path: str) -> Optional[str]:
    """Three panels: s/product per tool and operator, top-5 max true error, Hutch++ error per budget.
    Returns ``path`` (or None when there is nothing to plot)."""
    rows = side_by_side_rows([r for r in records if r.get("suite") == "diagnostics"])
    if not rows["eig"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pp = per_product_seconds(records)
    steady = {(_tool(r), r.get("matrix")): r for r in steady_per_product(records) if r.get("seconds_per_product")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels, hs, gs = [], [], []
    if steady:  # the interleaved steady-state measurement where it exists
        for tool in TOOLS:
            h, g = steady.get((tool, "hessian")), steady.get((tool, "ggn"))
            if h is None and g is None:
                continue
            math_attn = tool != "hessopt" and "MATH" in ((h or g).get("attention_kernel") or "")
            labels.append(TOOL_NAMES[tool].split()[0] + ("\n(math attn)" if math_attn else ""))
            hs.append(float("nan") if h is None else h["seconds_per_product"])
            gs.append(float("nan") if g is None else g["seconds_per_product"])
    for tool in TOOLS if not steady else ():
        for kern in ("default", "math"):
            h, g = pp.get((tool, "hessian", kern)), pp.get((tool, "ggn", kern))
            if h is None and g is None:
                continue
            labels.append(TOOL_NAMES[tool].split()[0] + ("" if kern == "default" else "\n(math attn)"))
            hs.append(float("nan") if h is None else h["per_product"])
            gs.append(float("nan") if g is None else g["per_product"])
    xs = range(len(labels))
    axes[0].bar([x - 0.2 for x in xs], hs, 0.4, label="Hessian")
    axes[0].bar([x + 0.2 for x in xs], gs, 0.4, label="GGN")
    axes[0].set_xticks(list(xs), labels, fontsize=8)
    axes[0].set_ylabel("seconds per product")
    axes[0].set_title("per-product time" + (", interleaved steady state" if steady else ", inside the runs")
                      + " (lower is better)", fontsize=10)
    axes[0].legend()
    for i, matrix in enumerate(("hessian", "ggn")):
        pts = [r for r in rows["eig"] if r.get("matrix") == matrix and r.get("max_rel_error")]
        for r in pts:
            axes[1].scatter(r["matvecs"], r["max_rel_error"], marker="o" if matrix == "hessian" else "s")
            axes[1].annotate(f"{_tool(r)}{'' if _kernel(r) == 'default' else ' (math)'} {matrix}",
                             (r["matvecs"], r["max_rel_error"]), fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("products")
    axes[1].set_ylabel("max true rel. error, top-5")
    axes[1].set_title("top-5 eigenvalues: error vs products")
    for tool in TOOLS:
        for kern in ("default", "math"):
            pts = sorted((r["budget"], r["rel_error"]) for r in rows["trace"]
                         if _tool(r) == tool and _kernel(r) == kern and r.get("rel_error") is not None)
            if pts:
                axes[2].plot(*zip(*pts), marker="o", label=TOOL_NAMES[tool] + ("" if kern == "default" else " (math)"))
    axes[2].set_xlabel("Hutch++ products")
    axes[2].set_ylabel("true rel. error of the trace")
    axes[2].set_yscale("log")
    axes[2].set_title("Hutch++ at equal products")
    axes[2].legend(fontsize=7)
    wl = rows["eig"][0].get("workload", "")
    fig.suptitle(f"side by side, {wl}: {records[0].get('device')}, {records[0].get('date')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
