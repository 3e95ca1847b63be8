"""Optimizer suite: forward + backward + step time and peak memory, all optimizers interleaved.

For each workload, every optimizer gets its own deep copy of one initial model (same weights), all
copies train on the same fixed synthetic batch, in train mode (BatchNorm with batch statistics), and
are timed round-robin by :func:`benchmarks.harness.interleaved` (warm-up, CUDA synchronization,
median of repeats, fresh peak-memory statistics per measurement). Lazy-Hessian optimizers
(``update_each=10``, SophiaH) are timed over 10-step windows, each holding exactly one Hessian step,
and reported per step. ``ratio_to_adamw`` divides by AdamW's median from the same run.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List

import torch

from .harness import Clock, Contender, base_record, free_memory, interleaved, log, ratio, timing_fields
from .optimizers import get_optimizers, make_driver, missing_package
from .workloads import get_workloads

SUITE = "optimizer"


def run_suite(args, env: Dict[str, Any], records: List[Dict[str, Any]], flush=lambda: None) -> List[Dict[str, Any]]:
    """Append this suite's records to ``records`` (``flush()`` after each batch of them: partial results survive)."""
    device = torch.device(args.device)
    clock = Clock(device)
    specs = get_optimizers(args.optimizers)
    for wl in get_workloads(args.quick, args.workloads):
        log(f"[optimizer] workload {wl.name} {wl.config}")
        free_memory(device)
        gen = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        base_alloc = clock.allocated()
        batch = wl.batch(device, gen)
        base_model = wl.build().to(device).train()
        shared = (clock.allocated() - base_alloc) if clock.cuda else 0
        num_params = sum(p.numel() for p in base_model.parameters())
        contenders, skipped = [], {}
        for spec in specs:
            missing = missing_package(spec)
            if missing:
                skipped[spec.name] = missing
                log(f"[optimizer] {wl.name}/{spec.name}: skipped ({missing})")
                continue

            def setup(spec=spec):
                model = copy.deepcopy(base_model)
                opt = spec.factory(list(model.parameters()))
                return make_driver(spec, model, opt, batch, wl.loss_fn)

            contenders.append(Contender(spec.name, setup, window=spec.window, info=spec.info))
        # the base model is the shared template: kept (counted in `shared`) so every copy starts equal
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*create_graph=True.*")
            results = interleaved(contenders, clock, args.repeats, args.warmup, shared_bytes=shared,
                                  label=f"[optimizer] {wl.name}/")
        adamw_ms = results.get("adamw", {}).get("step_ms")
        adamw_mem = results.get("adamw", {}).get("peak_mem_gib")
        for spec in specs:
            rec = base_record(env, SUITE, wl.name, "optimizer", spec.name)
            rec.update(workload_config=wl.config, num_params=num_params)
            if spec.name in skipped:
                rec.update(error=skipped[spec.name], skipped=True, **spec.info)
                records.append(rec)
                continue
            res = results[spec.name]
            rec.update(spec.info)
            rec.update(
                **timing_fields(res, clock, args.warmup),
                ratio_to_adamw=ratio(res["step_ms"], adamw_ms),
                mem_ratio_to_adamw=ratio(res["peak_mem_gib"], adamw_mem),
                last_loss=res["last_loss"],
            )
            records.append(rec)
        flush()
        del base_model, batch
        free_memory(device)
    return records
