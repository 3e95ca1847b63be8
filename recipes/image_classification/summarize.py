"""Summarize runs of train.py as a markdown table (one row per --output-dir).

    python recipes/image_classification/summarize.py runs/c10_sgd runs/c10_adamw runs/c10_adahessian

Columns: optimizer, epochs, final and best validation accuracy, median seconds per epoch of
training alone and of training plus evaluation (curvature time excluded; the medians skip the first
epoch's warm-up), total time.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _resolved(run: Path) -> dict:
    """The run's resolved options: config.json, else the checkpoint (the source of truth)."""
    if (run / "config.json").exists():
        return json.loads((run / "config.json").read_text())["resolved"]
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    from recipes.image_classification.checkpoint import read_checkpoint

    return read_checkpoint(run / "checkpoint.pt", require=("resolved",))["resolved"]


def _records(path: Path) -> list:
    """Epoch records; a truncated last line (a run killed while writing it) is left out."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
    return records


def summarize(run: Path) -> str:
    resolved = _resolved(run)
    records = _records(run / "metrics.jsonl")
    if not records:
        return f"| {run.name} | no epochs logged | | | | |"
    times = [r["time_s"] for r in records]
    train_times = [r.get("train_time_s") for r in records]  # absent in runs made before it was recorded
    opt = resolved["opt"] + (f" (update_each {resolved['update_each']})" if resolved.get("update_each", 1) > 1 else "")
    train = "–" if None in train_times else f"{_steady_median(train_times):.2f}"
    return (f"| {opt} | {resolved['model']} | {len(records)} | {100 * records[-1]['val_acc']:.2f} | "
            f"{100 * max(r['val_acc'] for r in records):.2f} | {train} | {_steady_median(times):.2f} | "
            f"{sum(times):.0f} |")


def _steady_median(times) -> float:
    return statistics.median(times[1:] or times)


def main(argv) -> None:
    if not argv:
        raise SystemExit(__doc__)
    print("| optimizer | model | epochs | final val acc (%) | best val acc (%) | train s/epoch | train + eval s/epoch "
          "| total s |")
    print("|---|---|---|---|---|---|---|---|")
    for run in argv:
        print(summarize(Path(run)))


if __name__ == "__main__":
    main(sys.argv[1:])
