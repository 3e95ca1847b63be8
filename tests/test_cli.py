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
from hessopt.cli import main


def _train_digits_checkpoint(path: Path) -> Path:
    """A one-epoch digits_cnn checkpoint in the recipe's format."""
    from hessopt.zoo import DeviceLoader

    torch.manual_seed(0)
    data = zoo.load_dataset("digits")
    model = zoo.build_model("digits_cnn", data.num_classes, in_chans=data.in_chans)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DeviceLoader(data.train_x, data.train_y, 64, data.mean, data.std, shuffle=True, flip=False)
    model.train()
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    config = {"model": "digits_cnn", "dataset": "digits", "data_dir": None, "batchnorm": True, "residual": True}
    torch.save({"model": model.state_dict(), "config": config, "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _train_digits_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt")


def test_analyze_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "report"
    rc = main(["analyze", str(checkpoint), "--dataset", "digits", "--out", str(out), "--device", "cpu",
               "--batch-size", "64", "--num-batches", "2", "--top-k", "2", "--trace-matvecs", "9",
               "--density-steps", "12", "--layerwise", "--layerwise-trace-matvecs", "4", "--landscape",
               "--landscape-steps", "5", "--landscape-grid", "3", "--no-progress", "--seed", "3"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == 128 and report["epoch"] == 1 and report["bn_mode"] == "eval"
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
    ckpt = torch.load(checkpoint)
    data = zoo.load_dataset("digits")
    model = zoo.build_model("digits_cnn", data.num_classes, in_chans=1)
    model.load_state_dict(ckpt["model"])
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    x = (data.test_x[:128].float() / 255 - mean) / std
    op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, data.test_y[:128]))
    ref = hessopt.top_eigenvalues(op, k=2, tol=1e-6, generator=0).eigenvalues
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
    _fail(capsys, ["analyze", str(checkpoint), "--dataset", "digits", "--model", "cifar_resnet20", *base],
          "do not fit 'cifar_resnet20'")
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
