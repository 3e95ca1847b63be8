"""Optimizer memory per rank under FSDP2 against one process (the figures in docs/distributed.md).

Run on CPU: ``torchrun --nproc-per-node=2 tests/dist_workers/fsdp_memory.py`` (FSDP2 over 2 gloo
processes) and ``python tests/dist_workers/fsdp_memory.py`` (one process, no FSDP). Trains an MLP
(784-1024-1024-10, float32, 1.86M parameters; ``--width`` changes it) for 3 steps with
Sophia(curvature="finite_difference") and prints, per rank, the bytes of its parameter chunks, of
its gradient chunks and of the optimizer's moments (local chunks of the DTensor moments), and the
process's peak resident memory. Sizes are counted from the tensors, not timed: they do not depend
on the machine's load.

``--diagnostics``: first, the top eigenvalue of the initial model's Hessian on one batch by
``HessianOperator(method="finite_difference")`` (sharded under FSDP2), printing this rank's vector
length, the bytes of the Lanczos basis it holds, the eigenvalues, and the collectives (calls and
the size of each: its largest tensor; counted by wrapping ``torch.distributed``'s functions) per
product and per Lanczos step. Every rank takes its slice of the same batches (the same data for 1
and 2 processes).
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


def batch(gen, world: int, rank: int, n: int = 64):
    """This rank's slice of the next batch of ``n`` (the same batches whatever the number of ranks)."""
    x, y = torch.randn(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    part = slice(rank * n // world, (rank + 1) * n // world)
    return x[part], y[part]


class CollectiveCounter:
    """Counts the calls of ``torch.distributed``'s collectives and the bytes of their input tensors."""

    NAMES = ("all_gather_single", "reduce_scatter_single", "all_reduce", "broadcast", "all_gather_into_tensor",
             "reduce_scatter_tensor", "broadcast_object_list", "all_gather_object")

    def __init__(self):
        self.calls, self.bytes, self._saved = {}, {}, {}

    def __enter__(self):
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def counted(*args, _fn=fn, _name=name, **kwargs):
                self.calls[_name] = self.calls.get(_name, 0) + 1
                # the size of the collective: its largest tensor (the gathered output of an
                # all-gather, the input of a reduce-scatter, the buffer of an all-reduce)
                sizes = [t.numel() * t.element_size() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
                self.bytes[_name] = self.bytes.get(_name, 0) + max(sizes, default=0)
                return _fn(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def per(self, n: int) -> str:
        return ", ".join(f"{k} {self.calls[k] / n:.1f} calls {self.bytes.get(k, 0) / n / 2**20:.3f} MiB"
                         for k in sorted(self.calls))


def diagnostics(model, world: int, rank: int, gen) -> None:
    """The top Hessian eigenvalue on one batch of 64 by sharded finite differences; memory and traffic."""
    from hessopt.spectrum.lanczos import LanczosIteration

    x, y = batch(gen, world, rank)
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), method="finite_difference")
    v = op.probe(torch.Generator().manual_seed(2))
    op @ v  # the first product also sizes the data (one-off collectives)
    with CollectiveCounter() as per_product:
        for _ in range(3):
            op @ v
    with CollectiveCounter() as per_step:
        it = LanczosIteration(op, 40, generator=3)
        for _ in range(10):
            it.step()
    steps = 40
    basis = (steps + 1) * op.local_size * 4
    result = hessopt.top_eigenvalues(op, k=1, tol=1e-4, max_matvecs=steps, check_multiplicity=False, generator=0)
    print(f"world {world} rank {rank}: diagnostics: vector length {op.local_size} of {op.num_params}, Lanczos basis of "
          f"{steps} steps {basis / 2**20:.2f} MiB; top eigenvalue {float(result.eigenvalues[0]):.5f} in "
          f"{result.num_matvecs} products (converged: {result.converged}); per product: {per_product.per(3) or 'no collectives'}; per Lanczos step "
          f"(product included): {per_step.per(10) or 'no collectives'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--curvature", default="finite_difference", choices=("finite_difference", "gnb"))
    parser.add_argument("--diagnostics", action="store_true")
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
    if args.diagnostics:  # first, on the initial weights: the same model whatever the number of ranks
        diagnostics(model, world, rank, torch.Generator().manual_seed(4))
    opt = hessopt.Sophia(model.parameters(), lr=1e-3, update_each=1, curvature=args.curvature, seed=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = batch(gen, world, rank)

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
