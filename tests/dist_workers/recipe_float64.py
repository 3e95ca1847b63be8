"""The image-classification recipe in float64: ``python recipe_float64.py <train.py options>``.

For tests/test_distributed_recipe.py: in float32 the 2-process and 1-process runs differ by
rounding (gradients summed in another order), which AdaHessian's ``g / (|D| + eps)`` amplifies
where ``|D|`` is a small difference of large terms; in float64 they agree to ~1e-12, which makes
the comparison sharp. Runs the recipe's own ``main`` with float64 parameters and batches; nothing
else changes (works under ``torchrun``).
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

_spec = importlib.util.spec_from_file_location("image_recipe", ROOT / "recipes" / "image_classification" / "train.py")
recipe = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = recipe  # dataclasses look their module up there
_spec.loader.exec_module(recipe)

if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)  # the model is built in the default dtype
    recipe.DeviceLoader = functools.partial(recipe.DeviceLoader, dtype=torch.float64)
    recipe.main(recipe.parse_args())
