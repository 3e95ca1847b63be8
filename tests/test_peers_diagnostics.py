"""benchmarks/peers_diagnostics.py: the side-by-side runs record every peer (a missing or crashing
peer as an error, not a dropped row) and are scored against float64 references."""
from __future__ import annotations

import builtins
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import Clock  # noqa: E402
from benchmarks.peers_diagnostics import ggn_reference, run_side_by_side, score_side_by_side  # noqa: E402

import hessopt  # noqa: E402


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(32, 4), torch.arange(32) % 3
    return model, x, y


def _run(model, x, y, monkeypatch=None, hide=()):
    if hide:
        real_import = builtins.__import__

        def fake_import(name, *args, **kwargs):
            if name.split(".")[0] in hide:
                raise ImportError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", fake_import)
    records = []
    args = SimpleNamespace(seed=0, trace_budgets=[12], slq_steps=8)
    run_side_by_side(model, nn.CrossEntropyLoss(), x, y, Clock(torch.device("cpu")), args,
                     lambda method, **f: records.append({"method": method, **f}), {"model": "mlp"})
    return records


def test_missing_peers_are_recorded_as_not_installed(monkeypatch):
    model, x, y = _setup()
    records = _run(model, x, y, monkeypatch, hide=("hessian_eigenthings", "curvlinops"))
    by = {r["method"]: r for r in records}
    assert by["side_hessopt_ggn_top5"].get("error") is None
    peers = [r for m, r in by.items() if "eigenthings" in m or "curvlinops" in m]
    assert len(peers) == 7 and all(r["error"].startswith("not installed") for r in peers)


def test_records_are_scored_against_float64_references():
    model, x, y = _setup()
    records = _run(model, x, y)
    H = hessopt.HessianOperator(model.double(), nn.CrossEntropyLoss(), (x.double(), y)).to_dense()
    hessian_ref = {"eigenvalues": torch.linalg.eigvalsh(H).flip(0)[:5].tolist(), "trace": float(torch.trace(H))}
    ggn_ref = ggn_reference(model, x.double(), y, quick=True)
    model.float()
    score_side_by_side(records, hessian_ref, ggn_ref)
    ours = next(r for r in records if r["method"] == "side_hessopt_ggn_top5")
    assert ours["max_rel_error"] < 1e-3 and ours["matvecs"] > 0 and ours["seconds"] >= ours["hvp_seconds"]
    for rec in records:  # each peer either ran and was scored, or its failure is recorded
        assert rec.get("error") or ("max_rel_error" in rec or "rel_error" in rec or "other_fraction" in rec), rec
