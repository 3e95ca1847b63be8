"""Smoke test of the Lanczos suite (benchmarks/suite_lanczos.py): a tiny nn.Linear stack, both
kernels (the current one and the one loaded from git), a fixed number of products. No timing
assertions: CPU timings on a shared machine mean nothing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import suite_lanczos  # noqa: E402


def test_lanczos_suite_records_products_and_bookkeeping(tmp_path):
    argv = ["--device", "cpu", "--quick", "--model", "linear", "--width", "48", "--depth", "1", "--batch", "8",
            "--max-matvecs", "12", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]
    assert suite_lanczos.main(argv) == 0
    records = json.loads((tmp_path / "lanczos.json").read_text())
    # the 'before' kernel comes from `git show`: without a git checkout only the current one runs
    assert [r["variant"] for r in records] == (["before", "after"] if (ROOT / ".git").exists() else ["after"])
    for rec in records:
        assert rec["suite"] == "lanczos" and rec["error"] is None
        assert rec["matvecs"] <= 12 and rec["products_s"] > 0 and rec["bookkeeping_s"] >= 0
        assert len(rec["loadavg_before"]) == 3 and len(rec["eigenvalues"]) == 5
        assert rec["command"].startswith("python ")
    if len(records) == 2:
        assert records[1]["eigenvalue_diff_to_before"] is not None
    md = (tmp_path / "lanczos.md").read_text()
    assert "bookkeeping / products" in md and "load avg" in md
