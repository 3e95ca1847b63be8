"""Optimizer memory per rank under FSDP2 against one process (the figures in docs/distributed.md).

Run on CPU: ``torchrun --nproc-per-node=2 tests/dist_workers/fsdp_memory.py`` (FSDP2 over 2 gloo
processes) and ``python tests/dist_workers/fsdp_memory.py`` (one process, no FSDP). Trains an MLP
(784-1024-1024-10, float32, 1.86M parameters; ``--width`` changes it) for 3 steps with
Sophia(curvature="finite_difference") and prints, per rank, the bytes of its parameter chunks, of
its gradient chunks and of the optimizer's moments (local chunks of the DTensor moments), and the
process's peak resident memory. Sizes are counted from the tensors, not timed: they do not depend
on the machine's load.
"""
from __future__ import annotations

import argparse
import datetime
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import hessopt  # noqa: E402


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors):
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if t is not None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--curvature", default="finite_difference", choices=("finite_difference", "gnb"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    w = args.width
    model = nn.Sequential(nn.Linear(784, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = hessopt.Sophia(model.parameters(), lr=1e-3, update_each=1, curvature=args.curvature, seed=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(64 // world, 784, generator=gen)
        y = torch.randint(0, 10, (64 // world,), generator=gen)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    params = list(model.parameters())
    moments = [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    line = (f"world {world} rank {rank}: parameters {sum(p.numel() for p in params)}, "
            f"parameter chunks {nbytes(params) / 2**20:.2f} MiB, gradient chunks {nbytes([p.grad for p in params]) / 2**20:.2f} MiB, "
            f"optimizer moments {nbytes(moments) / 2**20:.2f} MiB, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    print(line, flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
