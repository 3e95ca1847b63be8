"""recipes/image_classification/train.py: smoke runs, bit-exact resume, options, the command line."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hessopt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "image_classification" / "train.py"
pytest.importorskip("sklearn")  # the digits data set




def _load_recipe():
    spec = importlib.util.spec_from_file_location("image_classification_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's string annotations through it
    spec.loader.exec_module(module)
    return module


train = _load_recipe()


def _cfg(tmp_path, name="run", **overrides):
    base = dict(dataset="digits", model="digits_cnn", epochs=1, batch_size=32, max_steps_per_epoch=2,
                output_dir=str(tmp_path / name), progress=False, plots=False, device="cpu")
    base.update(overrides)
    return train.Config(**base)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("opt", ["adahessian", "sgd", "adamw"])
def test_two_step_smoke_runs(tmp_path, opt):
    result = train.main(_cfg(tmp_path, opt=opt))
    out = tmp_path / "run"
    (record,) = _jsonl(out / "metrics.jsonl")
    for key in ("epoch", "train_loss", "val_loss", "val_acc", "lr", "time_s", "train_time_s"):
        assert key in record
    assert 0 < record["train_time_s"] < record["time_s"]  # evaluation comes on top of training
    assert record["epoch"] == 1 and record["step"] == 2 and result["val_acc"] == record["val_acc"]
    ckpt = _load(out / "checkpoint.pt")
    for key in ("model", "optimizer", "scheduler", "loader", "rng", "epoch", "config", "model_args", "dataset_args"):
        assert key in ckpt
    assert ckpt["model_args"] == dict(name="digits_cnn", num_classes=10, in_chans=1, batchnorm=True, residual=True)
    assert ckpt["loader"] == {"seed": 0, "epoch": 1}
    saved = json.loads((out / "config.json").read_text())
    assert saved["resolved"]["opt"] == opt and saved["config"]["lr"] is None
    assert not list(out.glob("*.tmp"))
    if opt == "adahessian":  # the probe generator travels with the optimizer state
        assert ckpt["optimizer"]["param_groups"][0]["adahessian"]["generator_states"]


@pytest.mark.parametrize("opt", ["adahessian", "sgd"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, opt):
    common = dict(opt=opt, milestones=(1,), max_steps_per_epoch=3, curvature_every=2, curvature_k=2,
                  curvature_trace_matvecs=4)
    train.main(_cfg(tmp_path, "straight", epochs=2, **common))
    train.main(_cfg(tmp_path, "split", epochs=1, **common))
    train.main(_cfg(tmp_path, "split", epochs=2, resume=True, **common))
    a, b = _load(tmp_path / "straight" / "checkpoint.pt"), _load(tmp_path / "split" / "checkpoint.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    assert a["loader"] == b["loader"] and a["step"] == b["step"] == 6
    drop_time = lambda rs: [{k: v for k, v in r.items() if "time" not in k} for r in rs]
    assert drop_time(_jsonl(tmp_path / "straight" / "metrics.jsonl")) == drop_time(_jsonl(tmp_path / "split" / "metrics.jsonl"))
    straight_curv = drop_time(_jsonl(tmp_path / "straight" / "curvature.jsonl"))
    assert [r["step"] for r in straight_curv] == [0, 2, 4, 6]
    assert straight_curv == drop_time(_jsonl(tmp_path / "split" / "curvature.jsonl"))


def test_lazy_hessian_and_timm_optimizer_names(tmp_path):
    train.main(_cfg(tmp_path, "lazy", update_each=2, max_steps_per_epoch=4))
    state = _load(tmp_path / "lazy" / "checkpoint.pt")["optimizer"]["state"]
    assert {s["hessian_step"] for s in state.values()} == {2}  # 4 steps, Hessian every 2
    pytest.importorskip("timm")
    train.main(_cfg(tmp_path, "via_timm", opt="hessopt_adahessian"))
    assert "adahessian" in _load(tmp_path / "via_timm" / "checkpoint.pt")["optimizer"]["param_groups"][0]
    train.main(_cfg(tmp_path, "lamb", opt="lamb"))
    assert _jsonl(tmp_path / "lamb" / "metrics.jsonl")[0]["lr"] == pytest.approx(1e-3)


def test_presets_defaults_and_milestone_scaling():
    cfg, notes = train.resolve(train.Config(preset="paper_adahessian_cifar"))
    assert (cfg.dataset, cfg.model, cfg.opt, cfg.lr, cfg.betas, cfg.eps) == ("cifar10", "cifar_resnet20", "adahessian", 0.15, (0.9, 0.999), 1e-4)
    assert (cfg.batch_size, cfg.epochs, cfg.milestones, cfg.augment) == (256, 160, (80, 120), True)
    assert cfg.weight_decay == pytest.approx(5e-4 / 0.15) and not notes
    cfg, notes = train.resolve(train.Config(preset="paper_sgd_cifar", epochs=20))
    assert (cfg.opt, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.milestones) == ("sgd", 0.1, 0.9, True, 5e-4, (10, 15))
    assert "scaled" in notes[0]
    cfg, _ = train.resolve(train.Config(preset="paper_sgd_cifar", epochs=20, milestones=(5,), lr=0.05))
    assert cfg.milestones == (5,) and cfg.lr == 0.05  # given options beat the preset
    cfg, _ = train.resolve(train.Config())
    assert (cfg.dataset, cfg.opt, cfg.epochs, cfg.milestones, cfg.augment) == ("digits", "adahessian", 10, (5, 8), False)
    cfg, _ = train.resolve(train.Config(opt="adamw", epochs=2))
    assert (cfg.lr, cfg.weight_decay, cfg.milestones) == (1e-3, 0.05, (1,))
    assert [train.lr_factor(cfg)(e) for e in range(2)] == [1.0, 0.1]
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        train.resolve(train.Config(batch_size=0))


def test_command_line_parsing(tmp_path):
    cfg = train.parse_args(["--preset", "paper_sgd_cifar", "--epochs", "20", "--no-batchnorm", "--milestones",
                            "3", "7", "--betas", "0.8", "0.9", "--amp", "bf16"])
    assert (cfg.preset, cfg.epochs, cfg.batchnorm, cfg.residual, cfg.milestones, cfg.betas, cfg.amp) == (
        "paper_sgd_cifar", 20, False, True, (3, 7), (0.8, 0.9), "bf16")
    assert cfg.lr is None  # left to the preset
    assert train.parse_args(["--milestones"]).milestones == ()  # constant learning rate
    # --resume: the saved options are the base, the given ones change them
    out = tmp_path / "saved"
    out.mkdir()
    saved = dataclasses.asdict(train.Config(opt="sgd", epochs=2, model="digits_cnn"))
    (out / "config.json").write_text(json.dumps({"config": saved}))
    cfg = train.parse_args(["--output-dir", str(out), "--resume", "--epochs", "3"])
    assert (cfg.opt, cfg.model, cfg.epochs, cfg.resume) == ("sgd", "digits_cnn", 3, True)


def test_resume_errors(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        train.main(_cfg(tmp_path, "nothing", resume=True))
    train.main(_cfg(tmp_path, "first", opt="sgd"))
    with pytest.raises(ValueError, match="different opt"):
        train.main(_cfg(tmp_path, "first", opt="adamw", epochs=2, resume=True))


def test_the_command_line_end_to_end(tmp_path):
    out = tmp_path / "cli"
    args = [sys.executable, str(SCRIPT), "--dataset", "digits", "--model", "digits_cnn", "--opt", "adahessian",
            "--batch-size", "64", "--max-steps-per-epoch", "3", "--output-dir", str(out), "--curvature-every", "2",
            "--curvature-k", "2", "--curvature-trace-matvecs", "4", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(args + ["--epochs", "2", "--no-tensorboard"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    assert "epoch 2/2" in first.stdout
    # the continuation in-process (same parser and main as the script's entry point)
    result = train.main(train.parse_args(["--output-dir", str(out), "--epochs", "3", "--resume", "--no-progress"]))
    assert result["epoch"] == 3
    assert [r["epoch"] for r in _jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    curvature = _jsonl(out / "curvature.jsonl")
    assert [r["step"] for r in curvature] == [0, 2, 4, 6, 8]
    assert all(len(r["top_eigenvalues"]) == 2 and "trace" in r for r in curvature)
    assert _load(out / "checkpoint.pt")["epoch"] == 3
    pytest.importorskip("matplotlib")
    assert (out / "training.png").exists() and (out / "curvature.png").exists()


def test_warmup_steps_ramp_the_learning_rate_linearly(tmp_path, monkeypatch):
    """--warmup-steps N: step s (0-based) runs at lr * (s + 1) / N, then the schedule's lr."""
    seen = []
    original = hessopt.AdaHessian.step

    def recording_step(self, closure=None):
        seen.append(self.param_groups[0]["lr"])
        return original(self, closure)

    monkeypatch.setattr(hessopt.AdaHessian, "step", recording_step)
    train.main(_cfg(tmp_path, opt="adahessian", lr=0.2, warmup_steps=4, epochs=2, max_steps_per_epoch=3,
                    milestones=()))
    assert seen == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
