#!/usr/bin/env python
"""Train ``transformer_iwslt_de_en`` with fairseq and ``--optimizer adahessian`` or the Adam baseline.

Runs fairseq-train in this process (the same code path as the ``fairseq-train`` command) with two
additions for measurements: a timestamp after every update (``--timing-out``; the GPU is
synchronised every ``--sync-every`` updates, so per-update times come from synchronised stamps) and
the peak GPU memory. ``--print-command`` prints the equivalent ``fairseq-train`` command instead.

Hyper-parameters (``PRESETS``; everything after ``--`` is passed to fairseq-train and wins):

* shared: ``--arch transformer_iwslt_de_en --share-decoder-input-output-embed --dropout 0.3
  --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --max-tokens 4096 --clip-norm 0
  --lr-scheduler inverse_sqrt --warmup-init-lr 1e-7 --weight-decay 1e-4`` (fairseq's IWSLT14
  recipe, which the AdaHessian paper's baseline follows).
* adam (fairseq's, decoupled weight decay = AdamW): ``--adam-betas '(0.9, 0.98)' --lr 5e-4``,
  warm-up 4000 updates in the full recipe.
* adahessian (Yao et al. 2021, fairseq recipe): ``--adahessian-betas '(0.9, 0.98)'
  --adahessian-eps 1e-4 --lr 0.047 --block-length 32 --hessian-power 1``, warm-up 8000 updates in
  the full recipe; its weight decay ``theta -= lr * 1e-4 * theta`` is ``--weight-decay 1e-4``.

Warm-up for short runs (``--warmup-updates`` unset): 10% of ``--max-update`` for Adam and 20% for
AdaHessian, i.e. the paper's 4k:8k ratio scaled to the run length.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
USER_DIR = REPO / "hessopt" / "integrations" / "fairseq" / "plugin" / "hessopt_adahessian"

COMMON = [
    "--arch", "transformer_iwslt_de_en", "--share-decoder-input-output-embed",
    "--dropout", "0.3",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--max-tokens", "4096",
    "--clip-norm", "0.0",
    "--lr-scheduler", "inverse_sqrt", "--warmup-init-lr", "1e-07",
    "--weight-decay", "0.0001",
]

PRESETS: Dict[str, Dict] = {
    "adam": {
        "args": ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "5e-4"],
        "warmup_fraction": 0.10,
        "paper_warmup": 4000,
    },
    "adahessian": {
        "args": [
            "--user-dir", str(USER_DIR),
            "--optimizer", "adahessian", "--adahessian-betas", "(0.9, 0.98)", "--adahessian-eps", "1e-4",
            "--lr", "0.047", "--block-length", "32", "--hessian-power", "1",
        ],
        "warmup_fraction": 0.20,
        "paper_warmup": 8000,
    },
}


def default_warmup(optimizer: str, max_update: int) -> int:
    return max(1, round(PRESETS[optimizer]["warmup_fraction"] * max_update))


def fairseq_args(
    data: str,
    optimizer: str,
    max_update: int,
    save_dir: str,
    device: str = "cuda",
    warmup_updates: Optional[int] = None,
    seed: int = 1,
    log_interval: int = 50,
    extra: Optional[List[str]] = None,
) -> List[str]:
    """The fairseq-train argument list for one run (without the program name)."""
    if optimizer not in PRESETS:
        raise ValueError(f"optimizer must be one of {sorted(PRESETS)}, got {optimizer!r}")
    warmup = default_warmup(optimizer, max_update) if warmup_updates is None else warmup_updates
    args = [data] + COMMON + PRESETS[optimizer]["args"] + [
        "--warmup-updates", str(warmup),
        "--max-update", str(max_update),
        "--seed", str(seed),
        "--save-dir", save_dir,
        # validate and save once, when max-update is reached (not after every epoch: a checkpoint
        # of this model with optimizer state is ~0.5 GB and would dominate a short run's time)
        "--validate-interval", "1000000", "--save-interval", "1000000",
        "--no-epoch-checkpoints", "--no-save-optimizer-state",
        "--log-format", "json", "--log-interval", str(log_interval),
        "--num-workers", "0",
    ]
    if device == "cpu":
        args.append("--cpu")
    return args + list(extra or [])


def run_fairseq_train(args: List[str], timing_out: Optional[str], tf32: bool, sync_every: int) -> Dict:
    """fairseq-train in this process with per-update timestamps; returns (and writes) the timing record."""
    t_process = time.perf_counter()
    import torch

    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq.trainer import Trainer
    from fairseq_cli import train as fairseq_train

    record: Dict = {"args": args, "tf32": tf32, "sync_every": sync_every, "stamps": [], "synced": []}
    peak = [0]
    cuda = torch.cuda.is_available() and "--cpu" not in args
    if cuda:
        # fairseq resets the peak-memory counter after every update: keep the maximum over the run
        reset = torch.cuda.reset_peak_memory_stats

        def keep_peak(*a, **k):
            peak[0] = max(peak[0], torch.cuda.max_memory_allocated())
            return reset(*a, **k)

        torch.cuda.reset_peak_memory_stats = keep_peak

    original = Trainer.train_step

    def timed_train_step(self, samples, raise_oom=False):
        out = original(self, samples, raise_oom)
        n = self.get_num_updates()
        record["stamps"].append([n, time.perf_counter() - t_process])
        if n % sync_every == 0 or n == 1:
            if cuda:
                torch.cuda.synchronize()
            record["synced"].append([n, time.perf_counter() - t_process])
        return out

    Trainer.train_step = timed_train_step
    try:
        parser = options.get_training_parser()
        parsed = options.parse_args_and_arch(parser, input_args=args)
        cfg = convert_namespace_to_omegaconf(parsed)
        distributed_utils.call_main(cfg, fairseq_train.main)
    finally:
        Trainer.train_step = original
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats = reset
            peak[0] = max(peak[0], torch.cuda.max_memory_allocated())
        end = time.perf_counter() - t_process
        if record["stamps"] and (not record["synced"] or record["synced"][-1][0] != record["stamps"][-1][0]):
            record["synced"].append([record["stamps"][-1][0], end])  # synchronised just above
        record["process_seconds"] = end
        record["num_updates"] = record["stamps"][-1][0] if record["stamps"] else 0
        record["peak_gpu_memory_gib"] = peak[0] / 2**30 if cuda else None
        record.update(summarize_timing(record))
        if timing_out:
            Path(timing_out).parent.mkdir(parents=True, exist_ok=True)
            Path(timing_out).write_text(json.dumps(record) + "\n")
    return record


def summarize_timing(record: Dict, skip: int = 10) -> Dict:
    """Seconds per update from synchronised stamps, leaving out the first ``skip`` updates (warm-up;
    at most half of a short run).

    Also ``startup_seconds``: process start to the end of the first update (imports, data, model,
    CUDA initialisation, first step), the fixed cost a run pays before its steady state.
    """
    synced = record.get("synced", [])
    out: Dict = {"seconds_per_update": None, "timed_updates": 0, "startup_seconds": None}
    stamps = record.get("stamps", [])
    if stamps:
        out["startup_seconds"] = stamps[0][1]
    last = synced[-1][0] if synced else 0
    usable = [s for s in synced if s[0] >= max(1, min(skip, last // 2))]
    if len(usable) >= 2 and usable[-1][0] > usable[0][0]:
        (n0, t0), (n1, t1) = usable[0], usable[-1]
        out["seconds_per_update"] = (t1 - t0) / (n1 - n0)
        out["timed_updates"] = n1 - n0
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="fairseq data folder (prepare_data.py's OUT/bin)")
    p.add_argument("--optimizer", choices=sorted(PRESETS), required=True)
    p.add_argument("--max-update", type=int, required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--warmup-updates", type=int, default=None,
                   help="default: 10%% (adam) / 20%% (adahessian) of --max-update")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on CUDA for both optimizers (default on)")
    p.add_argument("--sync-every", type=int, default=10, help="synchronise the GPU every N updates for timing")
    p.add_argument("--timing-out", default=None, help="write per-update timing JSON here")
    p.add_argument("--print-command", action="store_true", help="print the fairseq-train command and exit")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then extra fairseq-train arguments")
    return p


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    args = fairseq_args(a.data, a.optimizer, a.max_update, a.save_dir, a.device, a.warmup_updates, a.seed,
                        a.log_interval, extra)
    if a.print_command:
        print("fairseq-train " + " ".join(shlex.quote(x) for x in args))
        return
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # fairseq-fixed's torch.load (resuming from --save-dir) needs weights_only=False on torch >= 2.6:
    # its checkpoints hold an argparse.Namespace
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    # a short run synchronises more often, so that it still has stamps past its warm-up updates
    sync_every = max(1, min(a.sync_every, a.max_update // 4))
    record = run_fairseq_train(args, a.timing_out, tf32=a.tf32 and a.device == "cuda", sync_every=sync_every)
    print(json.dumps({k: record[k] for k in ("num_updates", "seconds_per_update", "startup_seconds",
                                             "process_seconds", "peak_gpu_memory_gib")}))


if __name__ == "__main__":
    main()
