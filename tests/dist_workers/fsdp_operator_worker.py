"""One rank of the 2-process gloo jobs behind tests/test_fsdp_diagnostics.py (diagnostics on FSDP2).

Usage: ``python fsdp_operator_worker.py OUT_DIR RANK WORLD_SIZE [MODE]``. The model is
fsdp_worker's tiny float64 net (74 parameters; every dim 0 odd, so the chunks are uneven and rank
1's chunk of the one-row scale is empty), ``fully_shard``ed. The data set is two batches of 10 and 6
samples; rank 0 holds 7 + 2 of them, rank 1 the other 3 + 4, so the ranks' shards of the data are
uneven too.

MODE ``diagnostics`` (default): ``HessianOperator(method="finite_difference")`` on the sharded model
and, on every rank, a one-process reference on an unsharded copy with all 16 samples (the exact
double-backward Hessian, its dense matrix, and the same estimators with the probes drawn by the
sharded rule: each parameter's full block in turn). Saves this rank's results (local chunks and the
scalars) to ``OUT/rank{RANK}.pt``. MODE ``uneven_batches``: rank 1 passes one batch, rank 0 two.
MODE ``loss_error``: rank 1's loss function raises in the first product.
"""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import hessopt  # noqa: E402
from fsdp_worker import BATCH, build_model, make_batches, make_opt, train  # noqa: E402
from hessopt._sharded import shard_of  # noqa: E402
from hessopt.probes import probe  # noqa: E402

CUTS = [[(0, 7), (0, 2)], [(7, 10), (2, 6)]]  # rank r's samples of the two batches


def data():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for n in (10, 6)]


def local_data(rank):
    return [(x[a:b], y[a:b]) for (x, y), (a, b) in zip(data(), CUTS[rank])]


def per_parameter_probes(op):
    """Make a one-process operator draw probes as a sharded one does: each parameter's block in turn."""
    def draw(generator, dtype=None, distribution="rademacher"):
        return torch.cat([probe(tuple(p.shape), generator, dtype=dtype or op.dtype, distribution=distribution).reshape(-1)
                          for p in op.params])
    op.probe = draw
    return op


def cut(full_vector, sharded_params):
    """This rank's entries of a full flat vector (per parameter, cut as the parameter is sharded)."""
    chunks, start = [], 0
    for p in sharded_params:
        n = p.numel()
        chunks.append(shard_of(full_vector[start:start + n].reshape(p.shape), p).reshape(-1))
        start += n
    return torch.cat(chunks)


def refusal(fn):
    try:
        fn()
        return "no error"
    except (TypeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"


def diagnostics(rank):
    loss_fn = nn.CrossEntropyLoss()
    model = build_model(shard=True)
    params = list(model.parameters())
    op = hessopt.HessianOperator(model, loss_fn, local_data(rank), method="finite_difference")
    reference = build_model()
    exact = hessopt.HessianOperator(reference, loss_fn, data(), distributed=False)
    fd_one = per_parameter_probes(hessopt.HessianOperator(reference, loss_fn, data(), distributed=False,
                                                          method="finite_difference"))
    per_parameter_probes(exact)
    H = exact.to_dense()
    out = {"num_params": op.num_params, "local_size": op.local_size, "dense": H,
           "local_shapes": [tuple(s) for s in op.shapes]}

    # what a user holds must survive the products: weights and every .grad, bit for bit
    for p in params:
        p.grad = torch.full_like(p, 0.25)
    before = [p.to_local().clone() for p in params]
    versions = [p.to_local()._version for p in params]
    grads_before = [p.grad.to_local().clone() for p in params]

    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out["product"] = op @ cut(v, params)
    out["product_exact"] = cut(H @ v, params)
    out["gradient"], out["gradient_exact"] = op.gradient(), cut(exact.gradient(), params)
    out["loss"], out["loss_exact"] = op.loss(), exact.loss()

    top = hessopt.top_eigenvalues(op, k=3, tol=1e-9, generator=0)
    out["top"], out["top_vectors"], out["top_matvecs"] = top.eigenvalues, top.eigenvectors, top.num_matvecs
    out["top_converged"] = top.converged
    vectors = torch.linalg.eigh(H)[1].flip(1)[:, :3]
    out["top_vectors_exact"] = torch.stack([cut(u, params) for u in vectors.unbind(1)], dim=1)
    power = hessopt.top_eigenvalues(op, k=2, method="power", tol=1e-7, generator=0)
    out["power"], out["power_exact_probes"] = power.eigenvalues, hessopt.top_eigenvalues(
        exact, k=2, method="power", tol=1e-7, generator=0).eigenvalues

    probes = torch.randn(op.num_params, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    local_probes = torch.stack([cut(c, params) for c in probes.unbind(1)], dim=1)
    out["trace_fixed"] = hessopt.trace(op, method="hutchinson", probes=local_probes).estimate
    out["trace_fixed_exact"] = hessopt.trace(exact, method="hutchinson", probes=probes).estimate
    out["hutchpp"] = hessopt.trace(op, num_matvecs=30, method="hutch++", generator=1)
    out["hutchpp_one_process"] = hessopt.trace(fd_one, num_matvecs=30, method="hutch++", generator=1)
    out["hutchpp_exact"] = hessopt.trace(exact, num_matvecs=30, method="hutch++", generator=1)
    out["diagonal"] = hessopt.diagonal(op, num_matvecs=4, generator=2)
    out["diagonal_exact"] = cut(hessopt.diagonal(exact, num_matvecs=4, generator=2), params)
    slq = hessopt.spectral_density(op, num_runs=2, num_steps=12, generator=3)
    slq_exact = hessopt.spectral_density(exact, num_runs=2, num_steps=12, generator=3)
    out["slq_nodes"], out["slq_weights"] = slq.nodes, slq.weights
    out["slq_nodes_exact"], out["slq_weights_exact"] = slq_exact.nodes, slq_exact.weights
    lz = hessopt.lanczos(op, num_steps=10, generator=4)
    out["lanczos_basis_shape"] = tuple(lz.basis.shape)
    b = cut(exact.gradient(), params)
    solved = hessopt.solve(op, b, damping=1.0, tol=1e-10)
    out["solve"] = solved.solution
    out["solve_exact"] = cut(torch.linalg.solve(H + torch.eye(op.num_params, dtype=H.dtype), exact.gradient()), params)
    out["solve_converged"] = solved.converged

    # the GGN by finite differences of the outputs and FSDP's backward, against the dense one-process GGN
    ggn = hessopt.GGNOperator(model, loss_fn, local_data(rank), method="finite_difference")
    G = hessopt.GGNOperator(reference, loss_fn, data(), distributed=False).to_dense()
    out["ggn_product"], out["ggn_product_exact"] = ggn @ cut(v, params), cut(G @ v, params)
    out["ggn_top"] = hessopt.top_eigenvalues(ggn, k=2, tol=1e-9, generator=0).eigenvalues
    out["ggn_top_exact"] = torch.linalg.eigvalsh(G).flip(0)[:2]
    out["ggn_trace_fixed"] = hessopt.trace(ggn, method="hutchinson", probes=local_probes).estimate
    out["ggn_trace_fixed_exact"] = float(torch.einsum("im,ij,jm->", probes, G, probes)) / probes.shape[1]

    # the analyses on top: a curvature summary (eigenvalues, trace, density, loss, gradient concentration)
    summary = hessopt.curvature_summary(op, k=2, trace_matvecs=12, density=True, density_steps=8, generator=0)
    summary_exact = hessopt.curvature_summary(exact, k=2, trace_matvecs=12, density=True, density_steps=8, generator=0)
    keys = ("top_eigenvalues", "trace", "loss", "gradient_norm", "gradient_concentration")
    out["summary"] = {k: getattr(summary, k) for k in keys}
    out["summary_exact"] = {k: getattr(summary_exact, k) for k in keys}
    out["refuse_sensitivity"] = refusal(lambda: hessopt.analysis.hessian_sensitivity(op, num_probes=2))
    out["weights_unchanged"] = all(torch.equal(a, p.to_local()) for a, p in zip(before, params))
    out["versions_unchanged"] = versions == [p.to_local()._version for p in params]
    out["grads_unchanged"] = all(torch.equal(a, p.grad.to_local()) for a, p in zip(grads_before, params))
    out["params_are_the_dtensors"] = all(a is b for a, b in zip(params, model.parameters()))

    # refusals: every one is raised before any collective, the same on every rank
    out["refuse_reverse"] = refusal(lambda: hessopt.HessianOperator(model, loss_fn, local_data(rank)))
    out["refuse_ggn"] = refusal(lambda: hessopt.GGNOperator(model, loss_fn, local_data(rank)))  # method="jvp"
    out["refuse_fisher"] = refusal(lambda: hessopt.EmpiricalFisherOperator(model, loss_fn, local_data(rank)))
    out["refuse_dense"] = refusal(op.to_dense)
    out["refuse_wrong_length"] = refusal(lambda: op @ torch.zeros(op.num_params, dtype=torch.float64))

    # the whole path: train 5 steps with AdaHessian (central differences) on the sharded model, the
    # user's loop unchanged, then the top eigenvalues of the trained model's Hessian, sharded; and the
    # same in one process on the full batches
    trained = build_model(shard=True)
    half = BATCH // 2
    mine = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in make_batches()]
    train(trained, make_opt("adahessian_fd", trained.parameters()), mine)
    after = hessopt.HessianOperator(trained, loss_fn, local_data(rank), method="finite_difference")
    out["trained_top"] = hessopt.top_eigenvalues(after, k=3, tol=1e-9, generator=0).eigenvalues
    single = build_model()
    train(single, make_opt("adahessian_fd", single.parameters()), make_batches())
    out["trained_top_one_process"] = torch.linalg.eigvalsh(
        hessopt.HessianOperator(single, loss_fn, data(), distributed=False).to_dense()).flip(0)[:3]
    out["trained_moved"] = max(float((a.full_tensor() - b).abs().max())
                               for a, b in zip(trained.parameters(), build_model().parameters()))

    # a NaN input on rank 1 only: both ranks raise the same error, and can go on
    bad = local_data(rank)
    if rank == 1:
        bad[0][0][0, 0] = float("nan")
    nan_op = hessopt.HessianOperator(model, loss_fn, bad, method="finite_difference")
    try:
        nan_op @ cut(v, params)
        out["nan"] = "no error"
    except hessopt.operators.NonFiniteCurvatureError as err:
        out["nan"] = f"NonFiniteCurvatureError: {err}"
    out["after_nan"] = op @ cut(v, params)
    out["weights_unchanged_after_nan"] = all(torch.equal(a, p.to_local()) for a, p in zip(before, params))
    return out


def main(out: Path, rank: int, world: int, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    loss_fn = nn.CrossEntropyLoss()
    if mode in ("uneven_batches", "loss_error"):
        batches = local_data(rank)
        if mode == "uneven_batches" and rank == 1:
            batches = batches[:1]

        def failing_loss(logits, y):
            if rank == 1:
                raise RuntimeError("the user's loss failed on this rank")
            return loss_fn(logits, y)

        model = build_model(shard=True)
        op = hessopt.HessianOperator(model, failing_loss if mode == "loss_error" else loss_fn, batches,
                                     method="finite_difference")
        try:
            hessopt.top_eigenvalues(op, k=1, generator=0)
            (out / f"error{rank}.txt").write_text("no error")
        except BaseException as err:  # noqa: BLE001 - the test reads what each rank saw
            (out / f"error{rank}.txt").write_text(f"{type(err).__name__}: {err}")
            if mode == "loss_error":
                sys.stdout.flush()
                os._exit(3)  # the group is broken: leave (destroying it could wait)
        dist.barrier()
        dist.destroy_process_group()
        return
    results = diagnostics(rank)
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "diagnostics")
