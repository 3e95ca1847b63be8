"""The diagnostics suite's side-by-side runs: hessopt's GGN, hessian-eigenthings 1.0, curvlinops 3.x.

Called by :mod:`benchmarks.suite_diagnostics` on its trained model and fixed batch. Each peer is
installed into the benchmark environment only (``pip install hessian-eigenthings==1.0.0a5
curvlinops-for-pytorch==3.0.1``), never a dependency of hessopt; a missing peer is recorded as
``error: not installed``, and a peer that crashes is recorded with its error (a crash is a result).

Record names start with ``side_`` (the markdown report's existing sections do not pick them up;
they are in the JSON records). Measured on the same float32 model and batch as hessopt, BatchNorm in eval mode:

* top-5 eigenvalues (largest algebraic) of the Hessian and of the GGN at tolerance 1e-4: products,
  seconds, seconds inside the products, the eigenvalues (true errors are filled in by the suite
  against its float64 references);
* the Hessian trace by Hutch++ at the suite's trace budgets: estimate, reported standard error;
* the SLQ density (hessian-eigenthings; curvlinops has none of the same kind): seconds beyond the
  products.

Peer APIs used (as documented by each project): hessian-eigenthings ``HessianOperator(model,
[batch], supervised_loss(criterion))``, ``GGNOperator(model, [batch], supervised_forward,
supervised_loss_of_output(criterion))``, ``lanczos(op, k=, tol=, which="LA", seed=)``,
``trace(op, num_matvecs=, method="hutch++", seed=)``, ``spectral_density(op, ...)``; curvlinops
``HessianLinearOperator`` / ``GGNLinearOperator(model, criterion, params, [(x, y)])``,
``.to_scipy()`` with ``scipy.sparse.linalg.eigsh``, ``hutchpp_trace(op, num_matvecs)``.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

import hessopt

from .harness import format_error, log

TOP_K = 5
TOP_TOL = 1e-4


class _Counter:
    """Products and seconds spent inside them (device-synchronized by the suite's clock)."""

    def __init__(self, clock):
        self.clock, self.matvecs, self.seconds = clock, 0, 0.0

    def wrap(self, fn: Callable, columns: Callable[[Any], int] = lambda _: 1) -> Callable:
        def counted(*args, **kwargs):
            self.clock.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.clock.sync()
            self.seconds += time.perf_counter() - t0
            self.matvecs += columns(args[0]) if args else 1
            return out

        return counted


def _timed(fn, clock):
    clock.sync()
    t0 = time.perf_counter()
    out = fn()
    clock.sync()
    return out, time.perf_counter() - t0


def _eig_fields(values, seconds, counter) -> Dict[str, Any]:
    vals = sorted((float(v) for v in values), reverse=True)
    return dict(eigenvalues=vals, found=len(vals), matvecs=counter.matvecs, seconds=seconds, step_ms=1000 * seconds,
                hvp_seconds=counter.seconds, other_seconds=seconds - counter.seconds)


def _attention_context(attention: Optional[str]):
    if attention is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def run_side_by_side(model: nn.Module, loss_fn, x, y, clock, args, record, common,
                     attention: Optional[str] = None) -> None:
    """Append the side-by-side records (see the module docstring) through ``record(method, **fields)``.

    ``attention=None``: PyTorch's default attention kernels (what a user's model runs), hessopt and the
    peers. ``attention="math"``: the peers only, each call inside ``sdpa_kernel(SDPBackend.MATH)`` (the
    composite kernel, twice differentiable), records named ``..._math``: for a transformer whose peers
    crashed on the fused kernels, so that their numbers exist too.
    """
    seed = args.seed + 7
    budgets = list(args.trace_budgets)
    suffix = "" if attention is None else f"_{attention}"
    kernel = ("PyTorch default (fused SDPA where available)" if attention is None
              else "sdpa_kernel(SDPBackend.MATH) around the peer's calls")

    def attempt(name: str, matrix: str, fn: Callable[[], Dict[str, Any]], **extra) -> None:
        name = name + suffix
        base = dict(matrix=matrix, side_by_side=True, tool=name.split("_")[1], attention_kernel=kernel)
        try:
            with _attention_context(attention):
                fields = fn()
        except ImportError as err:
            record(name, **base, error=f"not installed: {err}", **extra, **common)
            log(f"[diagnostics] {name}: not installed ({err})")
            return
        except Exception as err:  # noqa: BLE001 - a peer's crash is a result
            record(name, **base, error=format_error(err), **extra, **common)
            log(f"[diagnostics] {name} FAILED: {format_error(err)}")
            return
        if fields.get("matvecs"):
            fields["seconds_per_product"] = fields["hvp_seconds"] / fields["matvecs"]
        record(name, **base, **extra, **fields, **common)
        log(f"[diagnostics] {name}: {fields.get('matvecs')} matvecs, {fields.get('seconds', 0):.2f}s "
            f"({fields.get('hvp_seconds', 0):.2f}s in products), "
            + (f"eigenvalues {[round(v, 3) for v in fields['eigenvalues']]}" if "eigenvalues" in fields
               else f"trace {fields.get('estimate')}"))

    # -- hessopt's own Hessian and GGN (its Hutch++ and SLQ are the suite's hutchpp_trace_m* / slq_*) ------
    def hessopt_top(matrix: str):
        counter = _Counter(clock)
        cls = hessopt.HessianOperator if matrix == "hessian" else hessopt.GGNOperator
        (op, setup) = _timed(lambda: cls(model, loss_fn, (x, y)), clock)
        op._matvec = counter.wrap(op._matvec)
        res, seconds = _timed(lambda: hessopt.top_eigenvalues(op, k=TOP_K, tol=TOP_TOL, generator=seed), clock)
        return dict(_eig_fields(res.eigenvalues, seconds, counter), converged=bool(res.converged),
                    residuals=[float(r) for r in res.residuals], setup_seconds=setup)

    if attention is None:
        for matrix in ("hessian", "ggn"):
            attempt(f"side_hessopt_{matrix}_top5", matrix, lambda m=matrix: hessopt_top(m), k=TOP_K, tol=TOP_TOL)

    # -- hessian-eigenthings 1.0 ---------------------------------------------------------------------
    def eigenthings_op(matrix: str):
        import hessian_eigenthings as he

        data = [(x, y)]
        if matrix == "hessian":
            return he.HessianOperator(model, data, he.supervised_loss(loss_fn))
        return he.GGNOperator(model, data, he.supervised_forward, he.supervised_loss_of_output(loss_fn))

    def counted_eigenthings(matrix: str):
        op, setup = _timed(lambda: eigenthings_op(matrix), clock)
        counter = _Counter(clock)
        op.matvec = counter.wrap(op.matvec)
        return op, counter, setup

    def eigenthings_top(matrix: str):
        import hessian_eigenthings as he

        op, counter, setup = counted_eigenthings(matrix)
        res, seconds = _timed(lambda: he.lanczos(op, k=TOP_K, tol=TOP_TOL, which="LA", seed=seed), clock)
        return dict(_eig_fields(res.eigenvalues, seconds, counter), converged=bool(torch.as_tensor(res.converged).all()),
                    residuals=[float(r) for r in res.residuals], setup_seconds=setup)

    for matrix in ("hessian", "ggn"):
        attempt(f"side_eigenthings_{matrix}_top5", matrix, lambda m=matrix: eigenthings_top(m), k=TOP_K, tol=TOP_TOL)

    def eigenthings_trace(m: int):
        import hessian_eigenthings as he

        op, counter, setup = counted_eigenthings("hessian")
        res, seconds = _timed(lambda: he.trace(op, num_matvecs=m, method="hutch++", seed=seed + m), clock)
        return dict(estimate=float(res.estimate), std_error=float(res.stderr), matvecs=counter.matvecs,
                    seconds=seconds, hvp_seconds=counter.seconds, other_seconds=seconds - counter.seconds,
                    setup_seconds=setup)

    for m in budgets:
        attempt(f"side_eigenthings_hutchpp_m{m}", "hessian", lambda m=m: eigenthings_trace(m), budget=m)

    def eigenthings_density():
        import hessian_eigenthings as he

        op, counter, setup = counted_eigenthings("hessian")
        res, seconds = _timed(lambda: he.spectral_density(op, num_runs=1, lanczos_steps=args.slq_steps, seed=seed), clock)
        nodes = torch.as_tensor(res.raw_eigenvalues)
        return dict(matvecs=counter.matvecs, seconds=seconds, hvp_seconds=counter.seconds,
                    other_seconds=seconds - counter.seconds, setup_seconds=setup,
                    other_fraction=(seconds - counter.seconds) / seconds if seconds > 0 else None,
                    top_node=float(nodes.max()) if nodes.numel() else None)

    attempt(f"side_eigenthings_density_{args.slq_steps}", "hessian", eigenthings_density, steps=args.slq_steps)

    # -- curvlinops 3.x --------------------------------------------------------------------------------
    # The operator's constructor probes determinism (curvlinops' default check_deterministic=True: two
    # products and two gradients); that is outside the counted products and inside setup_seconds.
    def curvlinops_op(matrix: str):
        import curvlinops

        params = [p for p in model.parameters() if p.requires_grad]
        cls = curvlinops.HessianLinearOperator if matrix == "hessian" else curvlinops.GGNLinearOperator
        return _timed(lambda: cls(model, loss_fn, params, [(x, y)]), clock)

    def count_curvlinops(op):
        counter = _Counter(clock)
        op._matmat = counter.wrap(op._matmat, columns=lambda X: int(X[0].shape[-1]) if X[0].dim() > len(op._in_shape[0]) else 1)
        return counter

    def curvlinops_top(matrix: str):
        from scipy.sparse.linalg import LinearOperator, eigsh

        op, setup = curvlinops_op(matrix)
        lin = op.to_scipy()
        counter = _Counter(clock)
        counted = LinearOperator(lin.shape, matvec=counter.wrap(lin.matvec), dtype=lin.dtype)
        v0 = np.random.default_rng(seed).standard_normal(lin.shape[0])
        vals, seconds = _timed(lambda: eigsh(counted, k=TOP_K, which="LA", tol=TOP_TOL, v0=v0,
                                             return_eigenvectors=False), clock)
        return dict(_eig_fields(vals, seconds, counter), setup_seconds=setup,
                    note="scipy.sparse.linalg.eigsh (ARPACK) on op.to_scipy(), which='LA', tol 1e-4")

    for matrix in ("hessian", "ggn"):
        attempt(f"side_curvlinops_{matrix}_top5", matrix, lambda m=matrix: curvlinops_top(m), k=TOP_K, tol=TOP_TOL)

    def curvlinops_trace(m: int):
        from curvlinops import hutchpp_trace

        op, setup = curvlinops_op("hessian")
        counter = count_curvlinops(op)
        torch.manual_seed(seed + m)
        est, seconds = _timed(lambda: hutchpp_trace(op, num_matvecs=m), clock)
        return dict(estimate=float(est), std_error=None, matvecs=counter.matvecs, seconds=seconds,
                    hvp_seconds=counter.seconds, other_seconds=seconds - counter.seconds, setup_seconds=setup,
                    note="curvlinops' hutchpp_trace reports no standard error")

    for m in budgets:
        attempt(f"side_curvlinops_hutchpp_m{m}", "hessian", lambda m=m: curvlinops_trace(m), budget=m)

    def curvlinops_density():
        from curvlinops.papyan2020traces.spectrum import lanczos_approximate_spectrum

        op, setup = curvlinops_op("hessian")
        counter = count_curvlinops(op)
        torch.manual_seed(seed)
        _, seconds = _timed(lambda: lanczos_approximate_spectrum(op, ncv=args.slq_steps), clock)
        return dict(matvecs=counter.matvecs, seconds=seconds, hvp_seconds=counter.seconds,
                    other_seconds=seconds - counter.seconds, setup_seconds=setup,
                    other_fraction=(seconds - counter.seconds) / seconds if seconds > 0 else None,
                    note="lanczos_approximate_spectrum(op, ncv=steps) (Papyan 2020, no reorthogonalization); "
                         "its products include the spectral boundaries it estimates first (eigsh, tol 1e-2)")

    attempt(f"side_curvlinops_density_{args.slq_steps}", "hessian", curvlinops_density, steps=args.slq_steps)


def ggn_reference(model64: nn.Module, x64, y64, quick: bool, ref_tol: float = 1e-9) -> Dict[str, Any]:
    """Float64 GGN eigenvalues: exact (dense ``eigh``) with ``quick``, else converged Lanczos (top 5)."""
    op = hessopt.GGNOperator(model64, nn.CrossEntropyLoss(), (x64, y64))
    if quick:
        vals = torch.linalg.eigvalsh(op.to_dense()).flip(0)[:TOP_K]
        return {"eigenvalues": [float(v) for v in vals], "kind": "dense eigh (float64)"}
    res = hessopt.top_eigenvalues(op, k=TOP_K, tol=ref_tol, generator=0)
    return {"eigenvalues": [float(v) for v in res.eigenvalues], "kind": f"Lanczos float64 tol {ref_tol}",
            "converged": bool(res.converged), "error_bounds": [float(b) for b in res.error_bounds]}


def score_side_by_side(records: List[Dict[str, Any]], hessian_ref: Dict[str, Any], ggn_ref: Dict[str, Any]) -> None:
    """True errors of the side-by-side records against the float64 references (in place)."""
    for rec in records:
        if not rec.get("side_by_side") or rec.get("error"):
            continue
        ref = hessian_ref if rec.get("matrix") == "hessian" else ggn_ref
        if "eigenvalues" in rec and ref and ref.get("eigenvalues"):
            want = ref["eigenvalues"][: len(rec["eigenvalues"])]
            rel = [abs(v - r) / abs(r) for v, r in zip(rec["eigenvalues"], want)]
            rec.update(reference=want, rel_errors=rel, max_rel_error=max(rel) if rel else None)
        elif "estimate" in rec and hessian_ref and hessian_ref.get("trace") is not None:
            ref_tr, ref_se = hessian_ref["trace"], hessian_ref.get("trace_std_error") or 0.0
            se = rec.get("std_error")
            comb = None if se is None else (se ** 2 + ref_se ** 2) ** 0.5
            rec.update(reference=ref_tr, reference_std_error=ref_se,
                       rel_error=abs(rec["estimate"] - ref_tr) / abs(ref_tr),
                       rel_std_error=None if se is None else se / abs(ref_tr),
                       z=None if not comb else (rec["estimate"] - ref_tr) / comb)
        elif rec.get("top_node") is not None and hessian_ref and hessian_ref.get("eigenvalues"):
            top = hessian_ref["eigenvalues"][0]
            rec.update(top_node_rel_error=abs(rec["top_node"] - top) / abs(top))


def per_product(model: nn.Module, loss_fn, x, y, clock, args, record, common, repeats: int = 5,
                attention_for_peers: Optional[str] = None) -> None:
    """Steady-state seconds per product of every tool's Hessian and GGN operator, interleaved.

    Each contender (tool x matrix) is built, applied once untimed (its ``first_product_seconds``
    keeps that cold call: lazy imports, graph building), then ``repeats`` rounds apply every contender
    once to the same random float32 vector, round-robin with the order rotated each round; the record
    (``side_<tool>_<matrix>_per_product``) has the median and the samples. The tools' native products:
    hessopt ``op @ v``, hessian-eigenthings ``op.matvec(v)``, curvlinops ``op @ v`` (torch, no scipy).
    ``attention_for_peers="math"``: the peers' products inside ``sdpa_kernel(SDPBackend.MATH)`` (they
    have no double backward through the fused kernels); hessopt's on the default kernels.
    """
    import statistics

    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(args.seed + 31)).to(x.device)
    kernel = ("PyTorch default (fused SDPA where available)" if attention_for_peers is None
              else "sdpa_kernel(SDPBackend.MATH) around the peer's products")

    def build(tool: str, matrix: str):
        if tool == "hessopt":
            cls = hessopt.HessianOperator if matrix == "hessian" else hessopt.GGNOperator
            op = cls(model, loss_fn, (x, y))
            return lambda: op @ v
        if tool == "eigenthings":
            import hessian_eigenthings as he

            data = [(x, y)]
            op = (he.HessianOperator(model, data, he.supervised_loss(loss_fn)) if matrix == "hessian" else
                  he.GGNOperator(model, data, he.supervised_forward, he.supervised_loss_of_output(loss_fn)))
            return lambda: op.matvec(v)
        import curvlinops

        cls = curvlinops.HessianLinearOperator if matrix == "hessian" else curvlinops.GGNLinearOperator
        op = cls(model, loss_fn, params, [(x, y)])
        return lambda: op @ v

    runs: Dict[str, Callable] = {}
    info: Dict[str, Dict[str, Any]] = {}
    for tool in ("hessopt", "eigenthings", "curvlinops"):
        for matrix in ("hessian", "ggn"):
            name = f"side_{tool}_{matrix}_per_product"
            ctx = (lambda: contextlib.nullcontext()) if tool == "hessopt" else (lambda: _attention_context(attention_for_peers))
            info[name] = dict(tool=tool, matrix=matrix, side_by_side=True, per_product=True,
                              attention_kernel="PyTorch default (fused SDPA where available)" if tool == "hessopt" else kernel)
            try:
                with ctx():
                    fn, setup = _timed(lambda: build(tool, matrix), clock)
                    _, first = _timed(fn, clock)
            except ImportError as err:
                record(name, **info[name], error=f"not installed: {err}", **common)
                continue
            except Exception as err:  # noqa: BLE001 - a crash is a result
                record(name, **info[name], error=format_error(err), **common)
                log(f"[diagnostics] {name} FAILED: {format_error(err)}")
                continue
            info[name].update(setup_seconds=setup, first_product_seconds=first, samples=[])
            runs[name] = (fn, ctx)
    names = list(runs)
    for r in range(repeats):
        for name in names[r % max(1, len(names)):] + names[: r % max(1, len(names))]:
            fn, ctx = runs[name]
            with ctx():
                _, sec = _timed(fn, clock)
            info[name]["samples"].append(sec)
    for name in names:
        s = info[name]["samples"]
        info[name].update(seconds_per_product=statistics.median(s), min_seconds=min(s), max_seconds=max(s),
                          repeats=len(s))
        record(name, **info[name], **common)
        log(f"[diagnostics] {name}: median {info[name]['seconds_per_product']:.4f} s/product "
            f"({min(s):.4f}-{max(s):.4f}; first {info[name]['first_product_seconds']:.3f} s)")
