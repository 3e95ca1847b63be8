"""One rank of the 2-process gloo job behind tests/test_distributed.py.

Usage: ``python worker.py OUT_DIR RANK WORLD_SIZE`` (rendezvous through the file ``OUT_DIR/store``,
so concurrent test runs cannot collide on a port). Runs every scenario in a fixed order on all
ranks (each collective is matched), and saves this rank's results to ``OUT_DIR/rank{RANK}.pt``.
Scenarios that must fail do so on every rank at the same call (``pytest.raises(match=)`` here, in
the process that raises), so the job goes on.
"""
from __future__ import annotations

import copy
import datetime
import importlib.util
import pickle
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: hessopt without installation

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import hessopt  # noqa: E402

_spec = importlib.util.spec_from_file_location("hessopt_dist_common", HERE / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def main(out: Path, rank: int, world: int) -> None:
    torch.set_num_threads(1)
    results = {}

    # An optimizer built *before* init_process_group (its hooks are inert until then).
    late_model = common.build_model()
    late_opt = hessopt.AdaHessian(late_model.parameters(), **common.OPT_ARGS)

    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    per_rank = common.BATCH // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    batches = common.make_batches()
    local = [common.shard(b, lo, hi) for b in batches]
    probe_data = common.make_batches(1, common.BATCH, seed=5)[0]
    equal = common.shard(probe_data, lo, hi)

    # -- AdaHessian under DDP, the user's loop unchanged -----------------------------------------
    def ddp_run(mode, update_each, micro_batches=1, use_no_sync=False, after_step=None, **kw):
        model = common.build_model()
        ddp = DDP(model)
        opt = hessopt.AdaHessian(ddp.parameters(), update_each=update_each, **{**common.OPT_ARGS, **kw})
        common.train(ddp, opt, local, mode, micro_batches, ddp.no_sync if use_no_sync else None,
                     None if after_step is None else (lambda s: after_step(s, ddp)))
        return common.params_of(model)

    def dense_between_steps(step, ddp):
        if step == 1:  # an HVP-based diagnostic between steps must neither break nor disturb training
            results["during/dense"] = hessopt.HessianOperator(ddp, common.loss_fn, equal).to_dense()

    for mode in ("closure", "explicit"):
        for update_each in (1, 2):
            after = dense_between_steps if (mode, update_each) == ("closure", 1) else None
            results[f"ddp/{mode}/{update_each}"] = ddp_run(mode, update_each, after_step=after)
        results[f"accumulate/{mode}"] = ddp_run(mode, 1, micro_batches=2, use_no_sync=True)

    common.train(DDP(late_model), late_opt, local, "closure")
    results["late_init"] = common.params_of(late_model)

    # DDP over a one-process subgroup: each rank trains alone (the optimizer follows DDP's group)
    groups = [dist.new_group([r]) for r in range(world)]
    model = common.build_model()
    ddp = DDP(model, process_group=groups[rank])
    opt = hessopt.AdaHessian(ddp.parameters(), distributed=groups[rank], **common.OPT_ARGS)
    common.train(ddp, opt, local, "explicit")
    results["subgroup"] = common.params_of(model)
    # a copy shares the process group (a communicator is not copied); pickling it is refused
    results["subgroup/deepcopy_shares_group"] = copy.deepcopy(opt)._distributed_mode is groups[rank]
    try:
        pickle.dumps(opt)
        results["subgroup/pickle"] = "pickled"
    except TypeError as err:
        results["subgroup/pickle"] = str(err)

    # -- diagnostics over sharded data ------------------------------------------------------------
    model = common.build_model()
    op = hessopt.HessianOperator(model, common.loss_fn, equal)
    results["op/equal"] = common.diagnostics(op)
    results["op/equal/dense"] = op.to_dense()
    results["op/none/top"] = hessopt.top_eigenvalues(op, k=1).eigenvalues.clone()
    results["op/none/trace"] = hessopt.trace(op, num_matvecs=12).estimate
    uneven = [common.shard(probe_data, 0, 5), common.shard(probe_data, 5, 9)] if rank == 0 else \
        common.shard(probe_data, 9, 16)
    op_uneven = hessopt.HessianOperator(model, common.loss_fn, uneven)
    results["op/uneven"] = common.diagnostics(op_uneven)
    results["op/uneven/dense"] = op_uneven.to_dense()
    results["op/local/dense"] = hessopt.HessianOperator(model, common.loss_fn, equal, distributed=False).to_dense()
    # the other curvature matrices follow the same protocol (uneven shards, weighted by sample count)
    for name, build in common.OTHER_OPERATORS.items():
        results[f"op/{name}/dense"] = build(model, uneven).to_dense()
    # an empty shard: rank 0 holds all 16 samples, rank 1 none (weight 0, not a hang or an error)
    lopsided = [common.shard(probe_data, 0, 16)] if rank == 0 else []
    op_lopsided = hessopt.HessianOperator(model, common.loss_fn, lopsided)
    results["op/empty_shard/dense"] = op_lopsided.to_dense()
    results["op/empty_shard/top"] = hessopt.top_eigenvalues(op_lopsided, k=1, tol=1e-10, generator=3).eigenvalues.clone()
    ddp_model = common.build_model()
    ddp = DDP(ddp_model)
    results["op/ddp/dense"] = hessopt.HessianOperator(ddp, common.loss_fn, equal).to_dense()
    opt = hessopt.AdaHessian(ddp.parameters(), **common.OPT_ARGS)
    common.train(ddp, opt, local[:1], "closure")  # DDP still trains after the operator's HVPs
    results["op/ddp/after_step"] = common.params_of(ddp_model)

    # -- bad input: a clear error on every rank, not a hang or a silent divergence -----------------
    def one_step(model, params=None, **kw):
        opt = hessopt.AdaHessian(model.parameters() if params is None else params, **{**common.OPT_ARGS, **kw})
        common.train(model, opt, local[:1], "explicit")

    def bad_operator_probes():
        op = hessopt.HessianOperator(common.build_model(), common.loss_fn, equal)
        hessopt.trace(op, num_matvecs=4, method="hutchinson", generator=torch.Generator().manual_seed(rank))

    def fsdp2_adahessian():
        from torch.distributed.fsdp import fully_shard

        hessopt.AdaHessian(fully_shard(common.build_model()).parameters(), **common.OPT_ARGS)

    def optimizer_state_on_rank_0_only():
        ddp = DDP(common.build_model())
        opt = hessopt.AdaHessian(ddp.parameters(), **common.OPT_ARGS)
        common.train(ddp, opt, local[:1], "closure")
        saved = opt.state_dict()
        resumed = hessopt.AdaHessian(ddp.parameters(), **common.OPT_ARGS)
        if rank == 0:
            resumed.load_state_dict(saved)
        common.train(ddp, resumed, local[1:2], "closure")

    def operator_fails_on_one_rank():
        # rank 1's loss is NaN: rank 1 raises its own error, rank 0 one that quotes it; nobody hangs
        x, y = equal
        bad = (x * float("nan"), y) if rank == 1 else (x, y)
        op = hessopt.HessianOperator(common.build_model(), common.loss_fn, bad)
        hessopt.top_eigenvalues(op, k=1, generator=0)

    def every_shard_empty():
        hessopt.HessianOperator(common.build_model(), common.loss_fn, []).loss()

    model = common.build_model()
    provoke = {
        "seeds": lambda: one_step(DDP(common.build_model()), seed=rank),
        "update_each": lambda: one_step(DDP(common.build_model()), update_each=1 + rank),
        "param_lists": lambda: one_step(model, params=list(model.parameters()) if rank == 0 else list(model[0].parameters())),
        "param_values": lambda: one_step(common.build_model(seed=rank)),
        "optimizer_state": optimizer_state_on_rank_0_only,
        "operator_probes": bad_operator_probes,
        "fsdp2": fsdp2_adahessian,
        "operator_rank_failure": operator_fails_on_one_rank,
        "all_shards_empty": every_shard_empty,
    }
    for name, fn in provoke.items():
        exc, pattern = common.BAD_INPUT[name]
        try:
            with pytest.raises(exc, match=pattern) as info:
                fn()
            results[f"error/{name}"] = "ok"
            results[f"error/{name}/type"] = type(info.value).__name__
        except BaseException as err:  # pytest's Failed included: record, the test reports it
            results[f"error/{name}"] = f"{type(err).__name__}: {err}"
    dist.barrier()  # every rank got here: nothing is left waiting in a collective

    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
