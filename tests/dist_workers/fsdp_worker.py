"""One rank of the 2-process gloo jobs behind tests/test_fsdp.py (FSDP2: ``fully_shard``, DTensor parameters).

Usage: ``python fsdp_worker.py OUT_DIR RANK WORLD_SIZE [MODE]``. MODE ``train`` (default): trains
the tiny model of :func:`build_model` (``fully_shard`` on each Linear and on the root; every
parameter's dim 0 is odd, so the shards are uneven, and one has a single row, so rank 1's chunk of
it is empty) with each optimizer of :data:`CASES` on half of every batch, the user's closure
unchanged; checks the refusals, a NaN batch on one rank, and a save/resume through
torch.distributed.checkpoint; saves the gathered parameters and the optimizer-state sizes. MODE
``closure_error``: rank 1's closure raises at the second step (the other rank is then left in
FSDP's reduce-scatter, which must fail, not hang).
"""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import hessopt  # noqa: E402

STEPS = 5
BATCH = 16
CASES = ("adahessian_fd", "sophia_fd", "sophia_g")


class Net(nn.Module):
    """6 -> 7 -> 3 with a learned logit scale: weight rows 7 and 3, biases 7 and 3, scale 1 (all odd)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 7)
        self.fc2 = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def build_model(shard: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Net().double()
    if shard:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.fc1)
        fully_shard(model.fc2)
        fully_shard(model)
    return model


def make_batches(steps: int = STEPS, n: int = BATCH, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for _ in range(steps)]


def make_opt(name: str, params, **kw):
    if name == "adahessian_fd":
        return hessopt.AdaHessian(params, lr=0.05, curvature=hessopt.FiniteDifference(scheme="central"), seed=3, **kw)
    if name == "sophia_fd":
        return hessopt.Sophia(params, lr=0.02, update_each=2, curvature="finite_difference", seed=3, **kw)
    if name == "sophia_g":
        return hessopt.Sophia(params, lr=0.02, update_each=2, curvature="gnb", seed=3, **kw)
    raise ValueError(name)


def train(model, opt, batches, fail_at=None):
    """The user's loop, the same with one process and with FSDP2."""
    for step, (x, y) in enumerate(batches):
        def closure():
            opt.zero_grad()
            if step == fail_at:
                raise RuntimeError("the user's closure failed on this rank")
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def gathered(model):
    """The full parameters (a collective: every rank calls it in the same order)."""
    return [p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()]


def state_bytes(opt):
    """Bytes of the optimizer's moment tensors held by this rank (local chunks of DTensors)."""
    total = 0
    for p, st in opt.state.items():
        if not isinstance(p, torch.Tensor):
            continue
        for v in st.values():
            if isinstance(v, torch.Tensor):
                t = v.to_local() if hasattr(v, "to_local") else v
                total += t.numel() * t.element_size()
    return total


def refusals():
    out = {}
    for curvature in ("hutchinson", None):
        try:
            (hessopt.Sophia if curvature else hessopt.AdaHessian)(build_model(shard=True).parameters(), curvature=curvature)
            out[str(curvature)] = "no error"
        except TypeError as err:
            out[str(curvature)] = str(err)
    return out


def dcp_resume(out: Path, local_batches):
    """Sophia(finite_difference): 3 steps, save on both ranks, 2 more steps; a fresh model and optimizer
    resume from the checkpoint and take the same 2 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt = str(out / "ckpt")
    model = build_model(shard=True)
    opt = make_opt("sophia_fd", model.parameters())
    train(model, opt, local_batches[:3])
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    train(model, opt, local_batches[3:])
    straight = gathered(model)

    model2 = build_model(shard=True)
    opt2 = make_opt("sophia_fd", model2.parameters(), )
    msd2, osd2 = get_state_dict(model2, opt2)
    loaded = {"model": msd2, "optim": osd2}
    dcp.load(loaded, checkpoint_id=ckpt)
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(model2, opt2, local_batches[3:])
    resumed = gathered(model2)

    # the control: the same model weights with a fresh optimizer (the loaded moments must matter)
    model3 = build_model(shard=True)
    opt3 = make_opt("sophia_fd", model3.parameters())
    msd3, osd3 = get_state_dict(model3, opt3)
    loaded3 = {"model": msd3}
    dcp.load(loaded3, checkpoint_id=ckpt)
    set_state_dict(model3, opt3, model_state_dict=loaded3["model"], optim_state_dict=osd3)
    train(model3, opt3, local_batches[3:])
    return {"straight": straight, "resumed": resumed, "fresh_optimizer": gathered(model3),
            "steps": (opt.state_dict()["param_groups"][0]["sophia"]["step"],
                      opt2.state_dict()["param_groups"][0]["sophia"]["step"])}


def gnb_fixed_labels(local_batch, labels):
    """The Gauss-Newton-Bartlett estimate for given labels on the sharded model, gathered."""
    from hessopt._sharded import Sharding, like

    model = build_model(shard=True)
    params = list(model.parameters())
    x, _ = local_batch
    logits = model(x)
    terms = hessopt.GaussNewtonBartlett._sharded_terms(params, logits, labels, labels.numel(), BATCH, 1.0, False,
                                                      Sharding(params))
    return [like(t, p).full_tensor() for t, p in zip(terms, params)]


def sophia_g_mixed_precision(local_batches):
    """Sophia-G under FSDP2's MixedPrecisionPolicy (bfloat16 compute, float32 reduce) on a float32 copy
    of the model: gathered parameters and the moments' dtype after the 5 steps."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = Net()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in (model.fc1, model.fc2, model):
        fully_shard(module, mp_policy=policy)
    opt = make_opt("sophia_g", model.parameters())
    train(model, opt, [(x.float(), y) for x, y in local_batches])
    first = next(iter(model.parameters()))
    return {"params": gathered(model), "moment_dtype": str(opt.state[first]["hessian"].dtype),
            "param_dtype": str(first.dtype)}


def main(out: Path, rank: int, world: int, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    per_rank = BATCH // world
    local = [(x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank])
             for x, y in make_batches()]
    if mode == "closure_error":
        model = build_model(shard=True)
        opt = make_opt("sophia_fd", model.parameters())
        try:
            train(model, opt, local, fail_at=1 if rank == 1 else None)
        except BaseException as err:  # the user's error (rank 1) or the broken collective (rank 0)
            (out / f"error{rank}.txt").write_text(f"{type(err).__name__}: {err}")
            sys.stdout.flush()
            os._exit(3)  # a failed rank leaves; the group is broken, destroying it could wait
        (out / f"error{rank}.txt").write_text("no error")
        os._exit(0)

    results = {"refusals": refusals()}
    for name in CASES:
        model = build_model(shard=True)
        opt = make_opt(name, model.parameters())
        train(model, opt, local)
        results[name] = gathered(model)
        results[name + "_state_bytes"] = state_bytes(opt)
        results[name + "_local_shapes"] = [tuple(p.to_local().shape) for p in model.parameters()]

    # Sophia-G in the explicit form: with opt.capture(): forward, backward; opt.step()
    model = build_model(shard=True)
    opt = make_opt("sophia_g", model.parameters())
    for x, y in local:
        opt.zero_grad()
        with opt.capture():
            F.cross_entropy(model(x), y).backward()
        opt.step()
    results["sophia_g_capture"] = gathered(model)

    # a NaN batch on rank 1 only, with nonfinite="raise": every rank raises, nothing changes
    model = build_model(shard=True)
    opt = make_opt("sophia_fd", model.parameters(), nonfinite="raise")
    train(model, opt, local[:1])
    before = gathered(model)
    x, y = local[1]
    if rank == 1:
        x = x.clone()
        x[0, 0] = float("nan")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    try:
        opt.step(closure)
        results["nan_batch"] = "no error"
    except hessopt.NonFiniteError as err:
        results["nan_batch"] = f"NonFiniteError: {err}"
    results["nan_batch_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, gathered(model)))
    train(model, opt, local[2:3])  # the group is still usable and the run goes on
    results["after_nan"] = gathered(model)

    results["dcp"] = dcp_resume(out, local)
    labels = torch.arange(BATCH) % 3
    results["gnb_fixed_labels"] = gnb_fixed_labels(local[0], labels[rank * per_rank:(rank + 1) * per_rank])
    results["sophia_g_bf16"] = sophia_g_mixed_precision(local)
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "train")
