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


def test_documented_hessopt_commands_and_timm_names_exist():
    """Every ``python -m hessopt...`` in the READMEs names a module that exists, and every hessopt
    optimizer name given to ``--opt`` is one the timm integration accepts."""
    import importlib.util

    from hessopt.integrations import timm as timm_integration

    root = README.parent
    texts = [README.read_text(encoding="utf-8")] + [
        p.read_text(encoding="utf-8") for p in sorted((root / "recipes").glob("*/README.md"))]
    modules = {m for text in texts for m in re.findall(r"python -m (hessopt[\w.]*)", text)}
    assert "hessopt.integrations.timm.train" in modules  # timm's own train.py is documented
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    for text in texts:
        for name in re.findall(r"--opt[ =]((?:lookahead_)?hessopt[\w-]*)", text):
            assert name.lower().removeprefix("lookahead_") in timm_integration.NAMES, name
