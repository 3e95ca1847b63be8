"""Launch a worker script as 2 real processes (gloo on CPU) and wait for both, never forever.

Used by the FSDP2 tests: ``launch(worker, out, mode, limit)`` runs ``python worker OUT RANK 2 MODE``
for ranks 0 and 1 with one torch thread each, and fails the test (killing both) when they have not
finished within ``limit`` seconds, so that a hang shows as a failure, not as a stuck CI job.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def launch(worker: Path, out: Path, mode: str, limit: float):
    """``(processes, logs, seconds)`` of the 2-process job."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(worker), str(out), str(r), "2", mode],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for r in range(2)]
    try:
        logs = [p.communicate(timeout=max(1.0, limit - (time.monotonic() - start)))[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the 2-process job {worker.name} ({mode}) did not finish within {limit:.0f} s: a hang")
    return procs, logs, time.monotonic() - start
