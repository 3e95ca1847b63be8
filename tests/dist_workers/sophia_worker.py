"""One rank of the 2-process gloo job behind tests/test_distributed_sophia.py.

Usage: ``python sophia_worker.py OUT_DIR RANK WORLD_SIZE``. Trains the shared tiny model under
DistributedDataParallel (each rank half of every batch, the user's closure unchanged) with Sophia-H,
Sophia-G and AdaHessian with finite differences, and saves this rank's parameters.
"""
from __future__ import annotations

import datetime
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

_spec = importlib.util.spec_from_file_location("hessopt_dist_common", HERE / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)
_spec2 = importlib.util.spec_from_file_location("hessopt_sophia_cases", HERE.parent / "sophia_cases.py")
cases = importlib.util.module_from_spec(_spec2)
_spec2.loader.exec_module(cases)


def main(out: Path, rank: int, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    per_rank = common.BATCH // world
    local = [common.shard(b, rank * per_rank, (rank + 1) * per_rank) for b in common.make_batches()]
    results = {}
    for name in cases.CASES:
        model = common.build_model()
        ddp = DDP(model)
        opt = cases.make(name, ddp.parameters())
        common.train(ddp, opt, local, "closure")
        results[name] = common.params_of(model)
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
