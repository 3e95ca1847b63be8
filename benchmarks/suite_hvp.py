"""HVP suite: the time of one Hessian-vector product relative to one gradient, hessopt vs plain autograd.

Methods, all on the same workload, batch and random vector ``v`` (fixed seed), interleaved and timed
like the optimizer suite (:func:`benchmarks.harness.interleaved`):

============================  =====================================================================
``gradient``                  the reference: forward + backward, ``torch.autograd.grad(loss, params)``
``adamw_step``                forward + backward + ``torch.optim.AdamW`` step (own model copy)
``plain_double_backward``     written inline, no hessopt: forward, ``g = autograd.grad(loss, params,
                              create_graph=True)``, ``autograd.grad(g, params, grad_outputs=v)``
``hessopt_hvp``               ``hessopt.hvp(loss_fn, params, v)``: forward, graph, product (a fresh
                              graph every call, what an optimizer step pays)
``hessopt_operator_fresh``    ``HessianOperator(..., cache_graph=False) @ v``: the same through the
                              operator (mode switching, flattening, finiteness check), the path of
                              diagnostics over a data loader
``hessopt_operator_cached``   ``HessianOperator(...) @ v`` on one batch with the gradient graph
                              cached (built once during set-up): the marginal cost of one more
                              product, what Lanczos/Hutchinson pay per matvec on a fixed batch
``plain_double_backward_``    GPT only: the plain path with attention forced to PyTorch's math
``math_sdpa``                 kernel (``sdpa_kernel(SDPBackend.MATH)``), the workaround users
                              apply by hand; for comparison, not the workload's default
============================  =====================================================================

``ratio_to_grad`` divides by the ``gradient`` median and ``ratio_to_adamw`` by the ``adamw_step``
median of the same run. Models are in train mode (BatchNorm with batch statistics, as an optimizer
sees them; the operators use ``bn_mode="train"``) unless ``--hvp-bn-mode eval``. With PyTorch's
default attention kernels the plain path crashes on the GPT (the fused kernels have no double
backward): the record keeps the error.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List

import torch

import hessopt
from hessopt.operators import flatten

from .harness import Clock, Contender, base_record, free_memory, interleaved, log, ratio, timing_fields
from .workloads import get_workloads

SUITE = "hvp"

METHODS = (
    "gradient",
    "adamw_step",
    "plain_double_backward",
    "hessopt_hvp",
    "hessopt_operator_fresh",
    "hessopt_operator_cached",
    "plain_double_backward_math_sdpa",
)

_WHAT = {
    "gradient": "forward + backward (torch.autograd.grad)",
    "adamw_step": "forward + backward + AdamW step",
    "plain_double_backward": "inline: autograd.grad(create_graph=True) then autograd.grad(g, params, grad_outputs=v)",
    "hessopt_hvp": "hessopt.hvp(loss_fn, params, v): fresh graph each call",
    "hessopt_operator_fresh": "HessianOperator(cache_graph=False) @ v: fresh graph each call",
    "hessopt_operator_cached": "HessianOperator(cache_graph=True) @ v: graph built once, one extra backward per call",
    "plain_double_backward_math_sdpa": "the inline double backward with attention forced to the math kernel "
                                       "(sdpa_kernel(SDPBackend.MATH))",
}


def run_suite(args, env: Dict[str, Any], records: List[Dict[str, Any]], flush=lambda: None) -> List[Dict[str, Any]]:
    """Append this suite's records to ``records`` (``flush()`` after each batch of them: partial results survive)."""
    device = torch.device(args.device)
    clock = Clock(device)
    bn_mode = args.hvp_bn_mode
    for wl in get_workloads(args.quick, args.workloads):
        log(f"[hvp] workload {wl.name} (BatchNorm {bn_mode} mode)")
        free_memory(device)
        gen = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        base_alloc = clock.allocated()
        x, y = wl.batch(device, gen)
        model = wl.build().to(device)
        model.train(bn_mode == "train")
        params = [p for p in model.parameters() if p.requires_grad]
        v = [torch.randn(p.shape, generator=gen).to(device, p.dtype) for p in params]
        shared = (clock.allocated() - base_alloc) if clock.cuda else 0
        loss_fn = wl.loss_fn

        def loss_closure():
            return loss_fn(model(x), y)

        def setup_gradient():
            return lambda: torch.autograd.grad(loss_closure(), params)

        def setup_adamw():
            m = copy.deepcopy(model)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)

            def run():
                opt.zero_grad()
                loss_fn(m(x), y).backward()
                opt.step()
            return run

        def setup_plain():
            def run():
                loss = loss_closure()
                g = torch.autograd.grad(loss, params, create_graph=True)
                return torch.autograd.grad(g, params, grad_outputs=v)
            return run

        def setup_hessopt_hvp():
            return lambda: hessopt.hvp(loss_closure, params, v)

        def setup_operator(cached: bool):
            def setup():
                target = copy.deepcopy(model) if cached else model  # a cached graph must see fixed params
                op = hessopt.HessianOperator(target, loss_fn, (x, y), bn_mode=bn_mode, cache_graph=cached)
                flat = flatten(v)
                if cached:
                    op @ flat  # builds and caches the gradient graph outside the timed windows
                return lambda: op @ flat
            return setup

        def setup_plain_math():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            plain = setup_plain()

            def run():
                with sdpa_kernel(SDPBackend.MATH):
                    return plain()
            return run

        setups = {
            "gradient": setup_gradient,
            "adamw_step": setup_adamw,
            "plain_double_backward": setup_plain,
            "hessopt_hvp": setup_hessopt_hvp,
            "hessopt_operator_fresh": setup_operator(False),
            "hessopt_operator_cached": setup_operator(True),
            "plain_double_backward_math_sdpa": setup_plain_math,
        }
        has_attention = wl.config.get("model") == "gpt"
        chosen = [m for m in METHODS if args.methods is None or m in args.methods or m in ("gradient", "adamw_step")]
        chosen = [m for m in chosen if has_attention or m != "plain_double_backward_math_sdpa"]
        contenders = [Contender(m, setups[m], info={"what": _WHAT[m]}) for m in chosen]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*create_graph=True.*")
            results = interleaved(contenders, clock, args.repeats, args.warmup, shared_bytes=shared,
                                  label=f"[hvp] {wl.name}/")
        grad_ms = results["gradient"]["step_ms"]
        adamw_ms = results["adamw_step"]["step_ms"]
        for m in chosen:
            res = results[m]
            rec = base_record(env, SUITE, wl.name, "method", m)
            rec.update(
                workload_config=wl.config,
                num_params=sum(p.numel() for p in params),
                bn_mode=bn_mode if any(isinstance(mod, torch.nn.modules.batchnorm._NormBase) for mod in model.modules()) else None,
                what=_WHAT[m],
                **timing_fields(res, clock, args.warmup),
                ratio_to_grad=ratio(res["step_ms"], grad_ms),
                ratio_to_adamw=ratio(res["step_ms"], adamw_ms),
            )
            records.append(rec)
        flush()
        del model, params, v, x, y
        free_memory(device)
    return records
