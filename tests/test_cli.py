"""`hessopt analyze` end to end on a one-epoch digits checkpoint, and its error messages."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hessopt
from hessopt import zoo
from hessopt.cli import main, analysis_subset


def _recipe():
    """recipes/image_classification/train.py as a module (its main(cfg) writes DIR/checkpoint.pt)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "recipes" / "image_classification" / "train.py"
    spec = importlib.util.spec_from_file_location("hessopt_recipe_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _train_digits_checkpoint(out: Path) -> Path:
    """One epoch of digits_cnn with SGD on the digits, by the recipe."""
    train = _recipe()
    cfg = train.Config(dataset="digits", model="digits_cnn", opt="sgd", epochs=1, batch_size=64, output_dir=str(out),
                       progress=False, plots=False)
    train.main(cfg)
    return out / "checkpoint.pt"




@pytest.fixture(scope="module")
def checkpoint(one_thread, tmp_path_factory):
    return _train_digits_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_analyze_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "report"
    rc = main(["analyze", str(checkpoint), "--dataset", "digits", "--out", str(out), "--device", "cpu",
               "--batch-size", "32", "--num-batches", "2", "--top-k", "2", "--trace-matvecs", "9",
               "--density-steps", "12", "--layerwise", "--layerwise-trace-matvecs", "4", "--landscape",
               "--landscape-steps", "5", "--landscape-grid", "3", "--no-progress", "--seed", "3"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == 64 and report["epoch"] == 1 and report["bn_mode"] == "eval"
    top = report["top_eigenvalues"]["eigenvalues"]
    assert len(top) == 2 and top[0] >= top[1]
    assert set(report["trace"]) >= {"estimate", "std_error", "num_matvecs"}
    assert set(report["density"]) >= {"grid", "density", "nodes", "weights"}
    names = [row["name"] for row in report["layerwise"]]
    assert names == ["conv1", "bn1", "conv2", "bn2", "fc"]
    assert len(report["landscape"]["top_eigenvector"]["losses"]) == 5
    assert len(report["landscape"]["random_plane"]["losses"]) == 3
    for png in ("density.png", "layerwise.png", "landscape_top.png", "landscape_random.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in (out / "report.md").read_text()

    # the same Hessian by hand: test images normalized as in training, BN in eval mode
    ckpt = torch.load(checkpoint, weights_only=False)
    data = zoo.load_dataset("digits")
    model = zoo.build_model("digits_cnn", data.num_classes, in_chans=1)
    model.load_state_dict(ckpt["model"])
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    idx = analysis_subset(data.test_x.shape[0], 64, seed=3)
    assert len(set(data.test_y[idx].tolist())) == 10  # a random subset, not the first images
    x = (data.test_x[idx].float() / 255 - mean) / std
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, data.test_y[idx]))
    ref = hessopt.top_eigenvalues(op, k=2, tol=1e-5, generator=0).eigenvalues
    assert top == pytest.approx(ref.tolist(), rel=5e-3)
    assert report["loss"] == pytest.approx(op.loss(), rel=1e-4)


def test_python_dash_m_help():
    res = subprocess.run([sys.executable, "-m", "hessopt.cli", "analyze", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--num-batches" in res.stdout


def _fail(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_analyze_errors(checkpoint, tmp_path, capsys):
    base = ["--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress", "--no-plots"]
    _fail(capsys, ["analyze", str(tmp_path / "missing.pt"), "--dataset", "digits", *base], "checkpoint not found")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    _fail(capsys, ["analyze", str(bad), "--dataset", "digits", *base], "corrupt or not a PyTorch checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    _fail(capsys, ["analyze", str(truncated), "--dataset", "digits", *base], "corrupt or not a PyTorch checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    _fail(capsys, ["analyze", str(other), "--dataset", "digits", *base], "not a hessopt recipe checkpoint")
    _fail(capsys, ["analyze", str(checkpoint), "--dataset", "mnist", *base], "unknown dataset 'mnist'")
    _fail(capsys, ["analyze", str(checkpoint), "--out", str(tmp_path / "o"), "--device", "gpu0"], "is not a device")
    _fail(capsys, ["analyze", str(tmp_path), *base], "without checkpoint.pt")
    _fail(capsys, ["analyze", str(checkpoint), "--dataset", "digits", "--model", "cifar_resnet20", *base],
          "do not fit 'cifar_resnet20'")
    _fail(capsys, ["analyze", str(checkpoint), "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), *base],
          "cannot load dataset 'cifar10'")
    _fail(capsys, ["analyze", str(checkpoint), "--dataset", "digits", "--trace-matvecs", "3", *base],
          "--trace-matvecs must be at least 4")
    with pytest.raises(SystemExit):
        main(["analyze", str(checkpoint), "--out", "x", "--num-batches", "0"])


class _Opaque:  # a class the safe loader refuses
    pass


def test_untrusted_objects_need_trust_checkpoint(tmp_path, capsys):
    path = tmp_path / "objects.pt"
    torch.save({"model": {}, "extra": _Opaque()}, path)
    _fail(capsys, ["analyze", str(path), "--dataset", "digits", "--out", str(tmp_path / "o"), "--no-plots"],
          "--trust-checkpoint")
