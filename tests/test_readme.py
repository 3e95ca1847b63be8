"""The README's Python examples run as printed (they are what a new user copies first)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2, "README lost its optimizer and diagnostics examples"
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)  # one session, as a reader would
    eig, tr = namespace["eig"], namespace["tr"]
    assert eig.converged and eig.eigenvalues.shape == (5,)
    assert bool((eig.eigenvalues[:-1] >= eig.eigenvalues[1:]).all())
    assert tr.std_error > 0 and abs(tr.estimate) < 1e6
