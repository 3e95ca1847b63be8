"""The image recipe's checkpoints analyzed through its adapter (recipes/image_classification/analyze.py and
checkpoint.py): end to end on a one-epoch digits checkpoint, through the generic `hessopt analyze`, and
the error messages (corrupt, truncated, foreign, one flipped byte)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hessopt
from hessopt.cli import main as hessopt_main
from recipes.common import build_model, load_dataset
from recipes.image_classification.analyze import main as analyze_main
from recipes.image_classification.checkpoint import analysis_subset

pytest.importorskip("sklearn")  # the digits data set
ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    """recipes/image_classification/train.py as a module (its main(cfg) writes DIR/checkpoint.pt)."""
    path = ROOT / "recipes" / "image_classification" / "train.py"
    spec = importlib.util.spec_from_file_location("hessopt_recipe_train_for_analyze", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(one_thread, tmp_path_factory):
    """One epoch of digits_cnn with SGD on the digits, by the recipe."""
    out = tmp_path_factory.mktemp("ckpt")
    train = _recipe()
    train.main(train.Config(dataset="digits", model="digits_cnn", opt="sgd", epochs=1, batch_size=64,
                            output_dir=str(out), progress=False, plots=False, device="cpu"))
    return out / "checkpoint.pt"


def _by_hand(checkpoint, count, seed):
    ckpt = torch.load(checkpoint, weights_only=False)
    data = load_dataset("digits")
    model = build_model("digits_cnn", data.num_classes, in_chans=1)
    model.load_state_dict(ckpt["model"])
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    idx = analysis_subset(data.test_x.shape[0], count, seed=seed)
    assert len(set(data.test_y[idx].tolist())) == 10  # a random subset, not the first images
    x = (data.test_x[idx].float() / 255 - mean) / std
    return hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x, data.test_y[idx]))


def test_analyze_py_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "report"
    rc = analyze_main([str(checkpoint), "--dataset", "digits", "--out", str(out), "--device", "cpu",
                       "--batch-size", "32", "--num-batches", "2", "--top-k", "2", "--trace-matvecs", "9",
                       "--density-steps", "12", "--layerwise", "--layerwise-trace-matvecs", "4", "--landscape",
                       "--landscape-steps", "5", "--landscape-grid", "3", "--no-progress", "--seed", "3"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    meta = report["metadata"]
    assert meta["num_samples"] == 64 and meta["epoch"] == 1 and meta["dataset"] == "digits"
    assert 0 <= meta["accuracy"] <= 1 and report["config"]["bn_mode"] == "eval"
    top = report["summary"]["top_eigenvalues"]
    assert len(top) == 2 and top[0] >= top[1]
    assert [row["name"] for row in report["layerwise"]] == ["conv1", "bn1", "conv2", "bn2", "fc"]
    assert len(report["landscape"]["top_eigenvector"]["losses"]) == 5
    assert len(report["landscape"]["random_plane"]["losses"]) == 3
    for png in ("density.png", "layerwise.png", "landscape_top.png", "landscape_random.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in (out / "report.md").read_text()
    # the same Hessian by hand: test images normalized as in training, BN in eval mode
    op = _by_hand(checkpoint, 64, seed=3)
    ref = hessopt.top_eigenvalues(op, k=2, tol=1e-5, generator=0).eigenvalues
    assert top == pytest.approx(ref.tolist(), rel=5e-3)
    assert report["summary"]["loss"] == pytest.approx(op.loss(), rel=1e-4)


def test_the_generic_command_through_the_checkpoint_adapter(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "generic"
    rc = hessopt_main(["analyze", "--model-fn", "recipes.image_classification.checkpoint:build_model",
                       "--model-arg", f"checkpoint={checkpoint}",
                       "--data-fn", "recipes.image_classification.checkpoint:batches",
                       "--data-arg", f"checkpoint={checkpoint}", "--data-arg", "batch_size=32",
                       "--data-arg", "num_batches=2", "--data-arg", "seed=3", "--loss", "cross_entropy",
                       "--out", str(out), "-k", "2", "--device", "cpu", "--no-plots", "--no-progress",
                       "--trace-matvecs", "4", "--density-steps", "4", "--tol", "1e-5"])
    assert rc == 0
    op = _by_hand(checkpoint, 64, seed=3)
    ref = hessopt.top_eigenvalues(op, k=2, tol=1e-5, generator=0).eigenvalues
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["top_eigenvalues"] == pytest.approx(ref.tolist(), rel=1e-3)


def _fail(capsys, argv, match):
    assert analyze_main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_analyze_py_errors(checkpoint, tmp_path, capsys):
    base = ["--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress", "--no-plots"]
    _fail(capsys, [str(tmp_path / "missing.pt"), "--dataset", "digits", *base], "checkpoint not found")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    _fail(capsys, [str(bad), "--dataset", "digits", *base], "not a complete PyTorch checkpoint")
    text = tmp_path / "notes.txt"
    text.write_text("some notes\n" * 20)
    _fail(capsys, [str(text), *base], "not a complete PyTorch checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    _fail(capsys, [str(truncated), "--dataset", "digits", *base], "truncated")
    flipped = tmp_path / "flipped.pt"
    raw = bytearray(checkpoint.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped.write_bytes(bytes(raw))
    _fail(capsys, [str(flipped), *base], "checksum does not match")
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    _fail(capsys, [str(other), "--dataset", "digits", *base], "not a checkpoint of the image-classification recipe")
    _fail(capsys, [str(checkpoint), "--dataset", "mnist", *base], "unknown dataset 'mnist'")
    _fail(capsys, [str(checkpoint), "--out", str(tmp_path / "o"), "--device", "gpu0"], "is not a device")
    _fail(capsys, [str(tmp_path), *base], "without checkpoint.pt")
    _fail(capsys, [str(checkpoint), "--dataset", "digits", "--model", "cifar_resnet20", *base],
          "do not fit 'cifar_resnet20'")
    _fail(capsys, [str(checkpoint), "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), *base],
          "cannot load dataset 'cifar10'")
    _fail(capsys, [str(checkpoint), "--trace-matvecs", "3", *base], "--trace-matvecs must be at least 4")
    with pytest.raises(SystemExit):
        analyze_main([str(checkpoint), "--out", "x", "--num-batches", "0"])


class _Opaque:  # a class the safe loader refuses
    pass


def test_untrusted_objects_need_trust_checkpoint(tmp_path, capsys):
    path = tmp_path / "objects.pt"
    torch.save({"model": {}, "extra": _Opaque()}, path)
    _fail(capsys, [str(path), "--dataset", "digits", "--out", str(tmp_path / "o"), "--no-plots"], "--trust-checkpoint")
