"""Time-to-quality suite: learning-rate sweeps, seeds, time/steps/compute to a tuned baseline's quality.

Protocol (benchmarks/README.md, "Time to quality", says the same with the sizes):

1. **Sweep.** Every contender gets the same number of learning rates, log-spaced around its usual
   value (:func:`benchmarks.quality_optimizers.lr_grid`), the same schedule family (linear warm-up
   over 10% of the steps, cosine to 0), the same steps, batches and initial weights (seed 0).
   The contenders of one sweep point (the ``j``-th learning rate of every contender) train
   **interleaved in one process**: one step of each contender in turn (the order rotates every
   step), each with its own model and data stream; each step is timed on its own with a
   synchronized clock. Load changes of a shared machine therefore hit all contenders alike.
   Evaluation (every ``eval_every`` steps, untimed) records the curves.
2. **Best point** = best final validation metric (a diverged or crashed run is worst), re-run on
   seeds 1 and 2 (interleaved again, one group per seed); with the sweep's seed 0 that is 3 seeds.
3. **Targets**: the tuned AdamW's final metric, mean over its 3 seeds (and tuned SGD's on the
   vision workload). Time-, step- and compute-to-target are read off each contender's seed-mean
   curve (mean metric, mean cumulative training seconds, mean gradient-equivalents at each
   evaluation), linearly interpolated between the two evaluations around the crossing; per-seed
   values give the spread (``null`` for a seed that never reaches the target).
   ``time_to_target_ratio`` = contender's time / the target optimizer's own time (``null`` where
   not reached).

Outputs in ``--out``: ``quality.json`` (summary records, one per contender and target, plus one
per workload/contender that could not run), ``quality_runs.json`` (every run with its whole curve,
load averages and threads), ``quality.md`` (tables), ``quality_<workload>.png`` (curves).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

from .harness import Clock, base_record, finite_or_none, format_error, log
from .quality_optimizers import Driver, QSpec, lr_grid, quality_specs, QUALITY_OPTIMIZERS, WARMUP_FRACTION
from .quality_workloads import QualityWorkload, get_quality_workloads

__all__ = ["run_suite", "time_to", "summarize"]


# --------------------------------------------------------------------------------------------------
# measurements


def measure_hvp_cost(wl: QualityWorkload, device: torch.device, repeats: int = 5) -> Dict[str, Any]:
    """Time of one ``hessopt.hvp`` (fresh graph: forward, backward with graph, double backward) over
    one plain gradient (forward + backward), interleaved, median of ``repeats``, on a training batch."""
    import hessopt

    clock = Clock(device)
    model = wl.build(0)
    x, y = next(wl.stream(0))
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]

    def loss_fn():
        return wl.loss(model(x), y)

    def grad():
        torch.autograd.grad(loss_fn(), params)

    def hvp():
        with hessopt.second_order_safe():
            hessopt.hvp(loss_fn, params, v)

    grad(), hvp()  # warm-up
    tg, th = [], []
    for _ in range(repeats):
        tg.append(clock.timed(grad))
        th.append(clock.timed(hvp))
    g, h = statistics.median(tg), statistics.median(th)
    return dict(hvp_cost=h / g, gradient_ms=1000 * g, hvp_ms=1000 * h, repeats=repeats,
                method="hessopt.hvp under second_order_safe(), fresh graph, vs torch.autograd.grad")


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_group(wl: QualityWorkload, entries, device: torch.device, hvp_cost: float, label: str,
              grad_clip: Optional[float] = None) -> List[Dict[str, Any]]:
    """Train ``entries`` (``(spec, lr, seed, phase)``) interleaved, step by step; returns run records."""
    clock = Clock(device)
    runs: List[Dict[str, Any]] = []
    live = []
    init_metric: Dict[int, float] = {}
    t_group = time.perf_counter()
    for spec, lr, seed, phase in entries:
        run = dict(workload=wl.name, optimizer=spec.name, lr=lr, seed=seed, phase=phase, steps=wl.steps,
                   curve=[], final_metric=None, train_time_s=0.0, eval_time_s=0.0, grad_equiv=0.0,
                   diverged=False, error=None, info=spec.info(wl), torch_threads=torch.get_num_threads(),
                   loadavg_start=_loadavg(), loadavg_end=None, group=label)
        runs.append(run)
        try:
            model = wl.build(seed)
            if seed not in init_metric:
                init_metric[seed] = wl.evaluate(model)  # same seed, same initial weights for every contender
            driver = Driver(spec, model, lr, wl, hvp_cost, grad_clip=grad_clip)
            run["grad_clip"] = grad_clip
        except Exception as err:  # noqa: BLE001 - a contender that cannot be built is a result
            run["error"] = format_error(err)
            log(f"{label}{spec.name} lr={lr:g}: setup FAILED: {run['error']}")
            continue
        run["curve"].append(dict(step=0, time_s=0.0, grad_equiv=0.0, metric=init_metric[seed], train_loss=None))
        live.append(dict(run=run, model=model, driver=driver, stream=wl.stream(seed), loss_ema=None))
    for i in range(wl.steps):
        k = i % max(1, len(live))
        for c in live[k:] + live[:k]:  # rotate: nobody always runs right after the same contender
            run = c["run"]
            if run["error"] or run["diverged"]:
                continue
            x, y = next(c["stream"])  # data preparation is outside the clock (identical for everyone)
            try:
                clock.sync()
                t0 = time.perf_counter()
                loss = c["driver"].step(x, y)
                clock.sync()
                run["train_time_s"] += time.perf_counter() - t0
                lossf = float(loss)
            except Exception as err:  # noqa: BLE001 - a crashing peer is a result, not a reason to stop
                run["error"] = format_error(err)
                log(f"{label}{run['optimizer']} lr={run['lr']:g}: step {i} FAILED: {run['error']}")
                c["model"] = c["driver"] = None
                continue
            run["grad_equiv"] = c["driver"].grad_equiv
            c["loss_ema"] = lossf if c["loss_ema"] is None else 0.9 * c["loss_ema"] + 0.1 * lossf
            if not math.isfinite(lossf):
                run["diverged"] = True
                run["curve"].append(dict(step=i + 1, time_s=run["train_time_s"], grad_equiv=run["grad_equiv"],
                                         metric=None, train_loss=None))
                log(f"{label}{run['optimizer']} lr={run['lr']:g}: diverged at step {i} (loss {lossf})")
                c["model"] = c["driver"] = None
                continue
            if (i + 1) % wl.eval_every == 0 or i + 1 == wl.steps:
                t0 = time.perf_counter()
                metric = wl.evaluate(c["model"])
                run["eval_time_s"] += time.perf_counter() - t0
                run["curve"].append(dict(step=i + 1, time_s=run["train_time_s"], grad_equiv=run["grad_equiv"],
                                         metric=metric if math.isfinite(metric) else None, train_loss=c["loss_ema"]))
        if (i + 1) % max(1, wl.steps // 4) == 0:
            done = ", ".join(f"{c['run']['optimizer']} {c['run']['curve'][-1]['metric']}" for c in live
                             if not c["run"]["error"] and c["run"]["curve"])
            log(f"{label}step {i + 1}/{wl.steps} ({time.perf_counter() - t_group:.0f}s, load {_loadavg()}): {done}")
    for run in runs:
        run["loadavg_end"] = _loadavg()
        if not run["error"] and not run["diverged"] and run["curve"] and run["curve"][-1]["step"] == wl.steps:
            run["final_metric"] = run["curve"][-1]["metric"]
        run["step_ms"] = 1000 * run["train_time_s"] / max(1, run["curve"][-1]["step"] if run["curve"] else 1)
    live.clear()
    return runs


# --------------------------------------------------------------------------------------------------
# analysis


def time_to(curve: List[Dict[str, Any]], target: float, higher_is_better: bool) -> Optional[Dict[str, float]]:
    """First crossing of ``target`` along ``curve`` (points with ``step``, ``time_s``, ``grad_equiv``,
    ``metric``), linearly interpolated between the two evaluations around it; ``None`` if never."""
    prev = None
    for pt in curve:
        m = pt["metric"]
        if m is None or not math.isfinite(m):
            return None
        reached = m >= target if higher_is_better else m <= target
        if reached:
            if prev is None or prev["metric"] == m:
                return {k: float(pt[k]) for k in ("step", "time_s", "grad_equiv")}
            f = (target - prev["metric"]) / (m - prev["metric"])
            f = min(1.0, max(0.0, f))
            return {k: float(prev[k] + f * (pt[k] - prev[k])) for k in ("step", "time_s", "grad_equiv")}
        prev = pt
    return None


def mean_curve(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Seed-mean curve: at each evaluation step present in every run, the mean of metric, time and
    compute (``metric`` is ``None`` from the first point where any seed has none)."""
    if not runs or any(not r["curve"] for r in runs):
        return []
    steps = [pt["step"] for pt in runs[0]["curve"]]
    out, dead = [], False
    for j, s in enumerate(steps):
        pts = [r["curve"][j] if j < len(r["curve"]) and r["curve"][j]["step"] == s else None for r in runs]
        if any(p is None for p in pts):
            break
        ms = [p["metric"] for p in pts]
        dead = dead or any(m is None for m in ms)
        out.append(dict(step=s, time_s=statistics.fmean(p["time_s"] for p in pts),
                        grad_equiv=statistics.fmean(p["grad_equiv"] for p in pts),
                        metric=None if dead else statistics.fmean(ms)))
    return out


def metric_at_time(curve: List[Dict[str, Any]], t: float) -> Optional[float]:
    """Metric of ``curve`` interpolated at training time ``t`` (its final value if it ends earlier)."""
    prev = None
    for pt in curve:
        if pt["metric"] is None:
            return None
        if pt["time_s"] >= t:
            if prev is None or pt["time_s"] == prev["time_s"]:
                return pt["metric"]
            f = (t - prev["time_s"]) / (pt["time_s"] - prev["time_s"])
            return prev["metric"] + f * (pt["metric"] - prev["metric"])
        prev = pt
    return prev["metric"] if prev else None


def _best_lr(runs: List[Dict[str, Any]], higher: bool) -> Optional[float]:
    ok = [r for r in runs if r["final_metric"] is not None]
    if not ok:
        return None
    best = max(ok, key=lambda r: r["final_metric"]) if higher else min(ok, key=lambda r: r["final_metric"])
    return best["lr"]


def _stats(xs: List[Optional[float]]) -> Dict[str, Any]:
    vals = [x for x in xs if x is not None]
    return dict(mean=statistics.fmean(vals) if vals and len(vals) == len(xs) else None,
                std=statistics.stdev(vals) if len(vals) > 1 and len(vals) == len(xs) else None,
                min=min(vals) if vals else None, max=max(vals) if vals else None, n=len(vals), of=len(xs))


def summarize(wl: QualityWorkload, specs: List[QSpec], all_runs: List[Dict[str, Any]], env, grids) -> List[Dict]:
    """Summary records of one workload (see the module docstring)."""
    higher = wl.higher_is_better
    per: Dict[str, Dict[str, Any]] = {}
    for spec in specs:
        mine = [r for r in all_runs if r["optimizer"] == spec.name]
        sweep = [r for r in mine if r["phase"] == "sweep"]
        best = _best_lr(sweep, higher)
        seeds = sorted({r["seed"] for r in mine if r["lr"] == best}) if best is not None else []
        best_runs = sorted([r for r in mine if r["lr"] == best], key=lambda r: r["seed"]) if best is not None else []
        errors = sorted({r["error"] for r in mine if r["error"]})
        per[spec.name] = dict(best=best, seeds=seeds, runs=best_runs, curve=mean_curve(best_runs), sweep=sweep,
                              errors=errors)
    targets = ["adamw"] + (["sgd"] if wl.kind == "vision" else [])
    records = []
    for tname in targets:
        t = per.get(tname)
        tvalue = None
        if t and t["runs"] and all(r["final_metric"] is not None for r in t["runs"]):
            tvalue = statistics.fmean(r["final_metric"] for r in t["runs"])
        t_reach = time_to(t["curve"], tvalue, higher) if tvalue is not None else None
        t_total = t["curve"][-1]["time_s"] if t and t["curve"] else None
        adamw_step_ms = None
        if per.get("adamw") and per["adamw"]["runs"]:
            adamw_step_ms = statistics.fmean(r["step_ms"] for r in per["adamw"]["runs"])
        for spec in specs:
            s = per[spec.name]
            rec = base_record(env, "quality", wl.name, "optimizer", spec.name)
            finals = [r["final_metric"] for r in s["runs"]]
            reach = time_to(s["curve"], tvalue, higher) if tvalue is not None and s["curve"] else None
            seed_reach = [time_to(r["curve"], tvalue, higher) if tvalue is not None else None for r in s["runs"]]
            step_ms = statistics.fmean(r["step_ms"] for r in s["runs"]) if s["runs"] else None
            grid = grids.get(spec.name, [])
            rec.update(
                target=tname, target_metric=tvalue, metric=wl.metric, higher_is_better=higher,
                best_lr=s["best"], lr_grid=grid,
                best_at_grid_edge=(s["best"] is not None and len(grid) > 2 and s["best"] in (grid[0], grid[-1])),
                sweep_final_metric={f"{r['lr']:g}": r["final_metric"] for r in s["sweep"]},
                seeds=s["seeds"], final_metric=_stats(finals)["mean"], final_metric_per_seed=finals,
                final_metric_std=_stats(finals)["std"],
                time_to_target_s=reach["time_s"] if reach else None,
                steps_to_target=reach["step"] if reach else None,
                grad_equiv_to_target=reach["grad_equiv"] if reach else None,
                time_to_target_s_per_seed=[x["time_s"] if x else None for x in seed_reach],
                steps_to_target_per_seed=[x["step"] if x else None for x in seed_reach],
                time_to_target_ratio=(reach["time_s"] / t_reach["time_s"]
                                      if reach and t_reach and t_reach["time_s"] > 0 else None),
                steps_to_target_ratio=(reach["step"] / t_reach["step"] if reach and t_reach and t_reach["step"] else None),
                grad_equiv_to_target_ratio=(reach["grad_equiv"] / t_reach["grad_equiv"]
                                            if reach and t_reach and t_reach["grad_equiv"] else None),
                metric_at_target_total_time=metric_at_time(s["curve"], t_total) if t_total and s["curve"] else None,
                target_total_time_s=t_total,
                total_train_time_s=s["curve"][-1]["time_s"] if s["curve"] else None,
                total_grad_equiv=s["curve"][-1]["grad_equiv"] if s["curve"] else None,
                step_ms=step_ms, ratio_to_adamw=(step_ms / adamw_step_ms if step_ms and adamw_step_ms else None),
                mean_curve=s["curve"], config=wl.config, driven=spec.info(wl),
                error=("; ".join(s["errors"]) if s["errors"] else None) if s["best"] is None else None,
                run_errors=s["errors"] or None,
            )
            if s["best"] is None and not s["errors"]:
                rec["error"] = "diverged at every learning rate of the sweep"
            records.append(rec)
    return records


# --------------------------------------------------------------------------------------------------
# report


def _fmt(x, fmt="{:.3f}"):
    return "–" if x is None else fmt.format(x)


def render_markdown(records: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = ["# Time to quality", "",
             f"Machine: {meta.get('machine')}; torch {meta.get('torch')}. Last command: `{meta.get('command')}` "
             f"({meta.get('date')})", ""]
    for wl in meta.get("workloads", []):
        name = wl["name"]
        recs = [r for r in records if r["workload"] == name]
        lines += [f"## {name}", "", f"Command: `{wl.get('command')}` (date {wl.get('date')}, torch threads "
                                     f"{wl.get('torch_threads')})  ", f"Config: `{json.dumps(wl['config'])}`  ",
                  f"HVP cost (one `hessopt.hvp` / one gradient, this machine): {_fmt(wl.get('hvp_cost'), '{:.2f}')}  ",
                  f"Wall time of the workload: {_fmt(wl.get('wall_s'), '{:.0f}')} s; load average "
                  f"{wl.get('loadavg_start')} -> {wl.get('loadavg_end')}", ""]
        for target in sorted({r.get("target") for r in recs if r.get("target")}):
            rs = [r for r in recs if r.get("target") == target]
            tv = rs[0].get("target_metric") if rs else None
            lines += [f"### Target: tuned {target} ({wl['metric']} {_fmt(tv, '{:.4f}')}, mean of its seeds)", "",
                      "| optimizer | best lr | final (mean ± std) | time to target s (seeds) | ratio | steps to target "
                      "(seeds) | steps ratio | grad-eq ratio | metric at target's total time | step ms (x AdamW) | error |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in rs:
                seeds_t = ", ".join(_fmt(x, "{:.0f}") for x in r["time_to_target_s_per_seed"])
                seeds_s = ", ".join(_fmt(x, "{:.0f}") for x in r["steps_to_target_per_seed"])
                edge = " (edge)" if r.get("best_at_grid_edge") else ""
                fin = (f"{_fmt(r['final_metric'], '{:.4f}')} ± {_fmt(r['final_metric_std'], '{:.4f}')}"
                       if r["final_metric"] is not None else "–")
                err = (r.get("error") or "")[:120]
                lines.append(
                    f"| {r['optimizer']} | {_fmt(r['best_lr'], '{:g}')}{edge} | {fin} | "
                    f"{_fmt(r['time_to_target_s'], '{:.1f}')} ({seeds_t}) | {_fmt(r['time_to_target_ratio'], '{:.2f}')} | "
                    f"{_fmt(r['steps_to_target'], '{:.0f}')} ({seeds_s}) | {_fmt(r['steps_to_target_ratio'], '{:.2f}')} | "
                    f"{_fmt(r['grad_equiv_to_target_ratio'], '{:.2f}')} | {_fmt(r['metric_at_target_total_time'], '{:.4f}')} | "
                    f"{_fmt(r['step_ms'], '{:.0f}')} ({_fmt(r['ratio_to_adamw'], '{:.2f}')}) | {err} |")
            lines.append("")
        first = [r for r in recs if r.get("target") == "adamw"]
        if first:
            grid_lines = ["### Sweep (final metric at each lr, seed 0)", "", "| optimizer | lr: final metric |", "|---|---|"]
            for r in first:
                cells = ", ".join(f"{lr}: {_fmt(v, '{:.4f}')}" for lr, v in (r.get("sweep_final_metric") or {}).items())
                grid_lines.append(f"| {r['optimizer']} | {cells} |")
            lines += grid_lines + [""]
    lines += issue_targets(records)
    return "\n".join(lines) + "\n"


def issue_targets(records: List[Dict[str, Any]]) -> List[str]:
    """The project's speed-to-quality targets, read off the summary records: hit or miss, measured figure."""
    out = ["## Speed-to-quality targets", "", "| target | measured | hit? |", "|---|---|---|"]

    def hessopt_best(wl_prefix, target, key="time_to_target_ratio"):
        rs = [r for r in records if r["workload"].startswith(wl_prefix) and r.get("target") == target
              and r["optimizer"].startswith("hessopt") and r.get(key) is not None]
        return min(rs, key=lambda r: r[key]) if rs else None

    def get(wl_prefix, target, opt):
        for r in records:
            if r["workload"].startswith(wl_prefix) and r.get("target") == target and r["optimizer"] == opt:
                return r
        return None

    have = {w for w in ("gpt", "cifar") if any(r["workload"].startswith(w) for r in records)}
    b = hessopt_best("gpt", "adamw")
    muon = get("gpt", "adamw", "muon")
    if "gpt" not in have:
        pass
    elif b:
        out.append(f"| LM: hessopt best reaches AdamW's final val loss in <= 0.70x AdamW's time | "
                   f"{b['optimizer']}: {b['time_to_target_ratio']:.2f}x | {'hit' if b['time_to_target_ratio'] <= 0.70 else 'miss'} |")
        mt = muon.get("time_to_target_s") if muon else None
        out.append(f"| LM: ... and beats Muon's time to target | {b['optimizer']} {b['time_to_target_s']:.1f} s vs Muon "
                   f"{_fmt(mt, '{:.1f}')} s | {'hit' if mt is None or b['time_to_target_s'] < mt else 'miss'} |")
    else:
        out.append("| LM: hessopt best <= 0.70x AdamW's time | no hessopt configuration reached AdamW's final loss | miss |")
    b = hessopt_best("cifar", "sgd")
    sgd = get("cifar", "sgd", "sgd")
    if "cifar" not in have:
        pass
    elif b:
        out.append(f"| CIFAR: hessopt best reaches SGD's final accuracy in <= 1.0x SGD's time | "
                   f"{b['optimizer']}: {b['time_to_target_ratio']:.2f}x | {'hit' if b['time_to_target_ratio'] <= 1.0 else 'miss'} |")
    else:
        out.append("| CIFAR: hessopt best <= 1.0x SGD's time | no hessopt configuration reached SGD's final accuracy | miss |")
    rs = [r for r in records if r["workload"].startswith("cifar") and r.get("target") == "sgd"
          and r["optimizer"].startswith("hessopt") and r.get("metric_at_target_total_time") is not None]
    if rs and sgd and sgd.get("final_metric") is not None:
        bb = max(rs, key=lambda r: r["metric_at_target_total_time"])
        d = 100 * (bb["metric_at_target_total_time"] - sgd["final_metric"])
        out.append(f"| CIFAR: >= 0.3 points above SGD at equal time (SGD's total time) | {bb['optimizer']}: "
                   f"{d:+.2f} points | {'hit' if d >= 0.3 else 'miss'} |")
    for wl_prefix in sorted(have, reverse=True):
        rs = [r for r in records if r["workload"].startswith(wl_prefix) and r.get("target") == "adamw"
              and r["optimizer"].startswith("hessopt") and r.get("steps_to_target_ratio") is not None]
        if rs:
            bb = min(rs, key=lambda r: r["steps_to_target_ratio"])
            out.append(f"| {wl_prefix}: AdaHessian/Sophia >= 2x fewer steps than AdamW to its target | {bb['optimizer']}: "
                       f"{bb['steps_to_target_ratio']:.2f}x AdamW's steps | {'hit' if bb['steps_to_target_ratio'] <= 0.5 else 'miss'} |")
        else:
            out.append(f"| {wl_prefix}: AdaHessian/Sophia >= 2x fewer steps than AdamW | none reached the target | miss |")
    return out + [""]


def plot(records: List[Dict[str, Any]], runs: List[Dict[str, Any]], out: str, wl_name: str, metric: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        log(f"quality: no plots ({err}); pip install matplotlib")
        return None
    recs = [r for r in records if r["workload"] == wl_name and r.get("target") == "adamw" and r.get("mean_curve")]
    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    colors = plt.get_cmap("tab20").colors  # 12 contenders: tab10 would repeat colours
    for n, r in enumerate(recs):
        c = [p for p in r["mean_curve"] if p["metric"] is not None]
        if not c:
            continue
        label = f"{r['optimizer']} (lr {r['best_lr']:g})"
        style = dict(color=colors[(2 * n) % 20 if n < 10 else (2 * n + 1) % 20], ls="-" if n < 10 else "--")
        for ax, key in zip(axes[:3], ("step", "time_s", "grad_equiv")):
            ax.plot([p[key] for p in c], [p["metric"] for p in c], label=label, marker=".", **style)
        sweep = r.get("sweep_final_metric") or {}
        xs = [float(k) for k, v in sweep.items() if v is not None]
        ys = [v for v in sweep.values() if v is not None]
        axes[3].plot(xs, ys, marker="o", label=r["optimizer"], **style)
    tv = recs[0]["target_metric"] if recs else None
    for ax, xl in zip(axes, ("steps", "training seconds (interleaved, this machine)", "gradient-equivalents",
                             "learning rate (sweep, seed 0)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(metric + (" (seed mean)" if xl != axes[3] else ""))
        if tv is not None:
            ax.axhline(tv, color="k", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[3].set_xscale("log")
    if metric == "val_loss" and recs:
        finals = [r["final_metric"] for r in recs if r["final_metric"] is not None]
        if finals:
            lo = min(finals)
            for ax in axes:
                ax.set_ylim(lo - 0.05, lo + 1.0)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{wl_name}: best lr per optimizer, mean of seeds (dashed: tuned AdamW's final {metric})")
    fig.tight_layout()
    path = os.path.join(out, f"quality_{wl_name}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# the suite


def _write(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(finite_or_none(obj), f, indent=1, default=str, allow_nan=False)
    os.replace(tmp, path)


def run_suite(args, env, records, flush):
    device = torch.device(args.device)
    quick = args.quick
    n_seeds = args.quality_seeds if args.quality_seeds is not None else (1 if quick else 3)
    wanted = args.quality_optimizers
    if wanted:
        unknown = set(wanted) - set(QUALITY_OPTIMIZERS)
        if unknown:
            raise ValueError(f"unknown quality optimizer(s) {sorted(unknown)}; choose from {list(QUALITY_OPTIMIZERS)}")
    specs_all = [s for s in quality_specs() if not wanted or s.name in wanted]
    overrides = {}
    if args.quality_steps:
        for name in ("gpt_multi30k_char", "cifar10_resnet"):
            overrides[name] = dict(steps=args.quality_steps)
    workloads = get_quality_workloads(quick, args.quality_workloads, device, args.quality_data_dir, overrides=overrides)
    meta = dict(command=env["command"], date=env["date"], machine=_machine(), torch=env["torch"],
                threads=torch.get_num_threads(), workloads=[], protocol=dict(
                    grid="center * 2**k, k in " + ("-1..0" if quick else "-2..2"), seeds=n_seeds,
                    schedule=f"linear warm-up {WARMUP_FRACTION:.0%} of the steps, cosine to 0",
                    gradient_clipping=args.quality_grad_clip,
                    interleaved="one step of each contender in turn, order rotated every step; each step timed alone"))
    meta_path = os.path.join(args.out, "quality_meta.json")
    for wl in workloads:
        # every workload has its own runs file, so two invocations (one per workload, e.g. one per
        # core) can share OUT; --quality-append keeps the runs of contenders not run now
        runs_path = os.path.join(args.out, f"quality_runs_{wl.name}.json")
        all_runs: List[Dict[str, Any]] = []
        if args.quality_append and os.path.exists(runs_path):
            with open(runs_path) as f:
                all_runs = json.load(f)
        t_wl = time.perf_counter()
        la0 = _loadavg()
        specs, skipped = [], []
        for s in specs_all:
            if wl.kind not in s.kinds:
                continue
            why = s.unavailable()
            (skipped if why else specs).append((s, why))
        specs = [s for s, _ in specs]
        log(f"quality {wl.name}: {wl.steps} steps, eval every {wl.eval_every}; contenders "
            f"{[s.name for s in specs]}; unavailable {[(s.name, w) for s, w in skipped]}; threads "
            f"{torch.get_num_threads()}, load {la0}")
        try:
            cost = measure_hvp_cost(wl, device, repeats=2 if quick else 5)
        except Exception as err:  # noqa: BLE001 - fall back to a stated convention
            cost = dict(hvp_cost=3.0, error=format_error(err), method="convention (measurement failed)")
        log(f"quality {wl.name}: HVP cost {cost['hvp_cost']:.2f} gradients ({cost.get('method')})")
        grids = {s.name: lr_grid(s.centers[wl.kind], quick) for s in specs}
        n_points = len(next(iter(grids.values()))) if grids else 0
        # --quality-append: runs of other contenders from an earlier invocation stay (and give the
        # targets); a contender run again now replaces its old runs
        all_runs = [r for r in all_runs if not (r["workload"] == wl.name and r["optimizer"] in grids)]
        wl_runs: List[Dict[str, Any]] = []

        def publish(wl_runs, status, wl=wl, all_runs=all_runs, grids=grids, specs=specs, skipped=skipped, cost=cost,
                    runs_path=runs_path, t_wl=t_wl, la0=la0):
            """Summaries, files, plots and markdown from the runs so far (after every group, so a run
            stopped by a time limit keeps summaries of what it finished)."""
            for r in wl_runs:
                r.setdefault("invocation", env["date"])
            mine = [r for r in all_runs + wl_runs if r["workload"] == wl.name]
            ran = {r["optimizer"] for r in mine}
            sum_specs = [q for q in quality_specs() if q.name in ran]  # incl. earlier invocations' contenders
            for q in sum_specs:
                grids.setdefault(q.name, lr_grid(q.centers[wl.kind], quick))
            summary = summarize(wl, sum_specs, mine, env, grids)
            for rec in summary:
                rec["hvp_cost"] = cost
                rec["status"] = status
                rec["grad_clip"] = args.quality_grad_clip
            for q, why in skipped:
                rec = base_record(env, "quality", wl.name, "optimizer", q.name)
                rec.update(target=None, best_lr=None, seeds=[], final_metric=None, time_to_target_s=None,
                           steps_to_target=None, time_to_target_ratio=None, error=why, driven=q.info(wl))
                summary.append(rec)
            # the summaries in OUT/quality.json of other workloads (another invocation's) are kept; of
            # this workload, with --quality-append, those of contenders neither run nor skipped now
            on_disk = _read_list(os.path.join(args.out, "quality.json"))
            now = {r["optimizer"] for r in summary}
            kept = ([r for r in on_disk if r["workload"] == wl.name and r["optimizer"] not in now]
                    if args.quality_append else [])
            others = [r for r in records + on_disk if r["workload"] != wl.name]  # on disk is newer: it wins
            uniq = {(r["workload"], r["optimizer"], r.get("target")): r for r in others}
            records[:] = list(uniq.values()) + summary + kept
            wl_meta = dict(name=wl.name, metric=wl.metric, config=wl.config, hvp_cost=cost["hvp_cost"],
                           hvp_measurement=cost, wall_s=time.perf_counter() - t_wl, loadavg_start=la0,
                           loadavg_end=_loadavg(), contenders=[q.name for q in specs],
                           unavailable={q.name: w for q, w in skipped}, command=env["command"], date=env["date"],
                           torch_threads=torch.get_num_threads(), status=status)
            old_meta = _read_list(meta_path, key="workloads")
            prev = [m for m in old_meta if m["name"] == wl.name]
            if args.quality_append and prev:
                older = prev[0].get("previous_invocations", [])
                if prev[0].get("date") != env["date"]:
                    older = older + [{k: prev[0].get(k) for k in ("command", "date", "contenders", "wall_s",
                                                                  "loadavg_start", "loadavg_end")}]
                wl_meta["previous_invocations"] = older
            meta["workloads"] = [m for m in old_meta if m["name"] != wl.name] + [wl_meta]
            _write(runs_path, all_runs + wl_runs)
            _write(meta_path, meta)
            flush()
            plot(records, wl_runs, args.out, wl.name, wl.metric)
            with open(os.path.join(args.out, "quality.md"), "w") as f:
                f.write(render_markdown(records, meta))

        budget = args.quality_max_minutes * 60 if args.quality_max_minutes else None
        durations: List[float] = []

        def out_of_time() -> bool:
            if budget is None or not durations:
                return False
            return time.perf_counter() - t_wl + statistics.fmean(durations) > budget

        status = "complete"
        for j in range(n_points):
            if out_of_time():
                status = f"stopped by --quality-max-minutes before sweep point {j + 1}/{n_points}"
                break
            t_g = time.perf_counter()
            entries = [(q, grids[q.name][j], 0, "sweep") for q in specs]
            wl_runs += run_group(wl, entries, device, cost["hvp_cost"], f"[{wl.name} sweep {j + 1}/{n_points}] ",
                                grad_clip=args.quality_grad_clip)
            durations.append(time.perf_counter() - t_g)
            publish(wl_runs, "sweep in progress" if j + 1 < n_points else "sweep done")
        best = {q.name: _best_lr([r for r in wl_runs if r["optimizer"] == q.name], wl.higher_is_better) for q in specs}
        log(f"quality {wl.name}: best lr {best}")
        for seed in range(1, n_seeds):
            if status != "complete":
                break
            if out_of_time():
                status = f"stopped by --quality-max-minutes before seed {seed} (seeds 0..{seed - 1} done)"
                break
            entries = [(q, best[q.name], seed, "seed") for q in specs if best[q.name] is not None]
            if entries:
                t_g = time.perf_counter()
                wl_runs += run_group(wl, entries, device, cost["hvp_cost"], f"[{wl.name} seed {seed}] ",
                                    grad_clip=args.quality_grad_clip)
                durations.append(time.perf_counter() - t_g)
                publish(wl_runs, "seeds in progress")
        publish(wl_runs, status)
        if status != "complete":
            log(f"quality {wl.name}: {status}")
        log(f"quality {wl.name}: done in {time.perf_counter() - t_wl:.0f}s")


def _read_list(path: str, key: Optional[str] = None) -> List[Dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        obj = json.load(f)
    return obj.get(key, []) if key else obj


def _machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def rebuild(out: str, env) -> List[Dict[str, Any]]:
    """Summaries, ``quality.json``, ``quality.md`` and plots again from the runs files in ``out``
    (``run.py --report-only``): e.g. after combining the folders of two invocations."""
    import glob

    meta = {"workloads": _read_list(os.path.join(out, "quality_meta.json"), key="workloads")}
    meta.update(command=env["command"], date=env["date"], machine=_machine(), torch=env["torch"])
    old = _read_list(os.path.join(out, "quality.json"))
    records: List[Dict[str, Any]] = []
    for path in sorted(glob.glob(os.path.join(out, "quality_runs_*.json"))):
        runs = _read_list(path)
        if not runs:
            continue
        name = runs[0]["workload"]
        quick = name.endswith("_quick")
        wl_meta = next((m for m in meta["workloads"] if m["name"] == name), {})
        wl = get_quality_workloads(quick, [name], data_root=None, overrides=None,
                                   device=torch.device("cpu"))[0] if wl_meta.get("config") is None else _Shell(name, wl_meta)
        ran = {r["optimizer"] for r in runs}
        specs = [q for q in quality_specs() if q.name in ran]
        grids = {q.name: lr_grid(q.centers[wl.kind], quick) for q in specs}
        run_env = dict(env, command=wl_meta.get("command", env["command"]), date=wl_meta.get("date", env["date"]))
        summary = summarize(wl, specs, runs, run_env, grids)
        first = next((r for r in old if r["workload"] == name and r.get("hvp_cost")), None)
        for rec in summary:
            rec["hvp_cost"] = first["hvp_cost"] if first else {"hvp_cost": wl_meta.get("hvp_cost")}
            rec["status"] = wl_meta.get("status")
        records += summary + [r for r in old if r["workload"] == name and r["optimizer"] not in ran]
        plot(records, runs, out, name, wl.metric)
    _write(os.path.join(out, "quality.json"), records)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(render_markdown(records, meta))
    return records


class _Shell:
    """What :func:`summarize` needs of a workload, from its recorded metadata (no data loaded)."""

    def __init__(self, name: str, meta: Dict[str, Any]):
        self.name, self.metric, self.config = name, meta["metric"], meta["config"]
        self.higher_is_better = self.metric == "test_acc"
        self.kind = "vision" if name.startswith("cifar") else "lm"
