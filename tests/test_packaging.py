"""What a user takes home: the wheel's contents and metadata (built from a copy of the sources)."""
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging.requirements")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy (setuptools would leave build/ in the checkout otherwise)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "hessopt", src / "hessopt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (path,) = dist.glob("hessopt-*.whl")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(z.read(meta_name).decode())
    return names, metadata


def _requirements(metadata, extra):
    """The requirements that ``pip install 'hessopt[EXTRA]'`` adds (on this Python)."""
    reqs = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    return [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": extra})]


def test_wheel_carries_the_license_and_no_recipe_code(wheel):
    names, metadata = wheel
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert metadata["License"] == "MIT" or metadata["License-Expression"] == "MIT"
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "the hessopt authors" in (ROOT / "LICENSE").read_text()
    assert all(n.startswith(("hessopt/", "hessopt-")) for n in names)  # no tests, recipes, conftest.py
    assert not any(n.startswith("hessopt/zoo/") for n in names)
    assert "hessopt/integrations/timm/train.py" in names


def test_the_library_needs_neither_numpy_nor_recipe_packages(wheel):
    _, metadata = wheel
    assert {r.name for r in (Requirement(s) for s in metadata.get_all("Requires-Dist")) if r.marker is None} == {
        "torch", "tqdm"}
    code = (
        "import sys; sys.modules['numpy'] = None\n"  # any `import numpy` now raises ImportError
        "import torch, hessopt, hessopt.cli, hessopt.monitor, hessopt.analysis, hessopt.integrations.timm\n"
        "m = torch.nn.Linear(3, 2); x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))\n"
        "op = hessopt.HessianOperator(m, torch.nn.CrossEntropyLoss(), (x, y))\n"
        "assert hessopt.top_eigenvalues(op, k=2).converged\n"
        "opt = hessopt.AdaHessian(m.parameters())\n"
        "torch.nn.functional.cross_entropy(m(x), y).backward(create_graph=True); opt.step()\n"
    )
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("python, wanted, unwanted", [("3.10", "fairseq", "fairseq-fixed"),
                                                      ("3.11", "fairseq-fixed", "fairseq"),
                                                      ("3.12", "fairseq-fixed", "fairseq")])
def test_fairseq_extra_is_chosen_where_the_wheel_is_installed(wheel, python, wanted, unwanted):
    _, metadata = wheel
    env = {"extra": "fairseq", "python_version": python, "python_full_version": python + ".0"}
    chosen = {r.name for r in (Requirement(s) for s in metadata.get_all("Requires-Dist"))
              if r.marker is not None and r.marker.evaluate(env)}
    assert wanted in chosen and unwanted not in chosen


def test_timm_extra_is_the_tested_range_and_recipes_bring_scikit_learn(wheel):
    from hessopt.integrations.timm import TESTED_TIMM_RANGE

    _, metadata = wheel
    (timm,) = [r for r in _requirements(metadata, "timm") if r.name == "timm"]
    low, high = TESTED_TIMM_RANGE
    assert timm.specifier.contains(low) and timm.specifier.contains(high)
    assert Version(low) == Version("1.0.12")  # the first timm with the OptimInfo registry
    assert not timm.specifier.contains("1.0.11") and not timm.specifier.contains("1.1.0")
    for extra in ("recipes", "dev"):
        assert "scikit-learn" in {r.name for r in _requirements(metadata, extra)}


def test_the_package_points_at_no_file_a_clone_lacks():
    """Docstrings state facts with their sources (a paper, a PyTorch issue), not the project's working notes."""
    import re

    pattern = re.compile(r"FIELD_NOTES|DESIGN\.md|HELPERS\.md|\.\./shared/|(?<!PyTorch )\bissue \d+", re.I)
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for path in sorted((ROOT / "hessopt").rglob("*.py"))
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)
