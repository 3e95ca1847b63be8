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
    assert {s["curvature_updates"] for s in state.values()} == {2}  # 4 steps, Hessian every 2
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
    # --resume: the checkpoint's options are the base (not config.json's), the given ones change them;
    # how to run (resume, overwrite, allow_config_change) is never inherited
    from recipes.image_classification.checkpoint import save_checkpoint

    out = tmp_path / "saved"
    out.mkdir()
    saved = dataclasses.asdict(train.Config(opt="sgd", epochs=2, model="digits_cnn", allow_config_change=True))
    save_checkpoint(out / "checkpoint.pt", {"config": saved})
    (out / "config.json").write_text(json.dumps({"config": {**saved, "opt": "adamw"}}))
    cfg = train.parse_args(["--output-dir", str(out), "--resume", "--epochs", "3"])
    assert (cfg.opt, cfg.model, cfg.epochs, cfg.resume, cfg.allow_config_change) == ("sgd", "digits_cnn", 3, True, False)


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


# --------------------------------------------------------------------------------------------------
# the recipe never throws a run away


def test_rerunning_into_a_run_directory_is_refused_unless_overwrite(tmp_path):
    train.main(_cfg(tmp_path, opt="sgd"))
    out = tmp_path / "run"
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    with pytest.raises(train.UsageError, match="already holds a run .*--resume.*--overwrite"):
        train.main(_cfg(tmp_path, opt="sgd"))  # a scheduler restarting the same command
    assert {name: (out / name).read_bytes() for name in before} == before
    with pytest.raises(train.UsageError, match="pass one"):
        train.main(_cfg(tmp_path, opt="sgd", resume=True, overwrite=True))
    train.main(_cfg(tmp_path, opt="sgd", overwrite=True, lr=0.05))
    (record,) = _jsonl(out / "metrics.jsonl")
    assert record["lr"] == pytest.approx(0.05) and _load(out / "checkpoint.pt")["resolved"]["lr"] == 0.05


def test_the_script_refuses_a_rerun_with_a_message_and_no_traceback(tmp_path):
    args = [sys.executable, str(SCRIPT), "--dataset", "digits", "--model", "digits_cnn", "--opt", "sgd", "--epochs", "1",
            "--batch-size", "32", "--max-steps-per-epoch", "1", "--output-dir", str(tmp_path / "cli"), "--device", "cpu",
            "--no-progress", "--no-plots", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(args, capture_output=True, text=True, env=env, timeout=300).returncode == 0
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "error:" in again.stderr and "already holds a run" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize("change", [dict(lr=0.05), dict(weight_decay=1e-2), dict(milestones=(1,)),
                                    dict(momentum=0.5)])
def test_resume_with_changed_hyperparameters_is_refused(tmp_path, change):
    train.main(_cfg(tmp_path, opt="sgd", epochs=1))
    with pytest.raises(train.UsageError, match="other hyper-parameters than the checkpoint's.*--allow-config-change"):
        train.main(_cfg(tmp_path, opt="sgd", epochs=2, resume=True, **change))
    assert [r["epoch"] for r in _jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_allow_config_change_trains_with_the_new_values_and_says_so(tmp_path, capsys):
    train.main(_cfg(tmp_path, opt="sgd", epochs=1, milestones=()))
    capsys.readouterr()
    train.main(_cfg(tmp_path, opt="sgd", epochs=2, milestones=(), resume=True, allow_config_change=True, lr=0.05,
                    weight_decay=1e-2))
    assert "--allow-config-change: from epoch 2 on, --lr 0.1 -> 0.05, --weight-decay 0.0005 -> 0.01" \
        in capsys.readouterr().out
    records = _jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.05])
    ckpt = _load(tmp_path / "run" / "checkpoint.pt")
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["lr"], group["initial_lr"], group["weight_decay"]) == (0.05, 0.05, 1e-2)
    assert ckpt["scheduler"]["base_lrs"] == [0.05]
    assert ckpt["resolved"]["lr"] == 0.05 and any("allow-config-change" in n for n in ckpt["notes"])
    assert ckpt["optimizer"]["state"]  # the momentum buffers came through


def test_resume_with_more_epochs_keeps_the_lr_milestones(tmp_path, capsys):
    # 2 epochs: default milestones at 50% / 75% of 2 epochs = epoch 1; extending to 4 must not move
    # them to 2 and 3 (which would train epoch 4 at lr / 100 instead of lr / 10)
    train.main(_cfg(tmp_path, opt="sgd", epochs=2))
    capsys.readouterr()
    train.main(_cfg(tmp_path, opt="sgd", epochs=4, resume=True))
    assert "the lr milestones stay at epochs [1]" in capsys.readouterr().out
    records = _jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.01, 0.01, 0.01])
    assert _load(tmp_path / "run" / "checkpoint.pt")["resolved"]["milestones"] == (1,)


def test_a_missing_config_json_changes_nothing_on_resume(tmp_path):
    out = tmp_path / "run"
    common = ["--dataset", "digits", "--model", "digits_cnn", "--batch-size", "32", "--max-steps-per-epoch", "2",
              "--output-dir", str(out), "--device", "cpu", "--no-progress", "--no-plots"]
    train.main(train.parse_args(common + ["--opt", "sgd", "--lr", "0.05", "--momentum", "0.5", "--epochs", "1"]))
    (out / "config.json").unlink()
    cfg = train.parse_args(["--output-dir", str(out), "--resume", "--epochs", "2", "--no-progress", "--no-plots"])
    assert (cfg.opt, cfg.lr, cfg.momentum, cfg.model, cfg.max_steps_per_epoch) == ("sgd", 0.05, 0.5, "digits_cnn", 2)
    train.main(cfg)
    assert [r["lr"] for r in _jsonl(out / "metrics.jsonl")] == pytest.approx([0.05, 0.05])
    assert json.loads((out / "config.json").read_text())["resolved"]["lr"] == 0.05
    assert not list(out.glob("*.tmp"))


def test_config_json_is_written_atomically(tmp_path, monkeypatch):
    from recipes.image_classification import checkpoint as ckpt_format

    path = tmp_path / "config.json"
    ckpt_format.write_text_atomic(path, '{"old": 1}')

    def fsync_fails(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="No space left"):
        ckpt_format.write_text_atomic(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}' and not list(tmp_path.glob("*.tmp"))


def test_a_truncated_last_log_line_is_dropped_on_resume(tmp_path):
    common = dict(opt="sgd", curvature_every=1, curvature_k=1, curvature_trace_matvecs=4)
    train.main(_cfg(tmp_path, epochs=1, **common))
    out = tmp_path / "run"
    for name, partial in (("metrics.jsonl", '{"epoch": 2, "step": 4, "train_lo'), ("curvature.jsonl", '{"step": 3, "t')):
        with open(out / name, "a") as f:
            f.write(partial)  # a kill in the middle of a write
    with pytest.warns(RuntimeWarning, match="last line is incomplete"):
        train.main(_cfg(tmp_path, epochs=2, resume=True, **common))
    assert [r["epoch"] for r in _jsonl(out / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in _jsonl(out / "curvature.jsonl")] == [0, 1, 2, 3, 4]
    # a broken line in the middle is corruption, not a kill: named, not dropped
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0][:10] + "\n" + lines[1] + "\n")
    with pytest.raises(train.UsageError, match="metrics.jsonl, line 1, is not a JSON record"):
        train.main(_cfg(tmp_path, epochs=3, resume=True, **common))


def _flip(path, offset):
    raw = bytearray(Path(path).read_bytes())
    raw[offset % len(raw)] ^= 0x10
    Path(path).write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    train.main(train.Config(dataset="digits", model="digits_cnn", opt="adahessian", epochs=1, batch_size=32,
                            max_steps_per_epoch=2, output_dir=str(out / "run"), progress=False, plots=False,
                            device="cpu"))
    return out / "run" / "checkpoint.pt"


def _resume_with(tmp_path, good, content: bytes):
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    (out / "checkpoint.pt").write_bytes(content)
    return train.main(_cfg(tmp_path, opt="adahessian", epochs=2, resume=True))


def test_resume_refuses_empty_garbage_truncated_and_foreign_checkpoints(tmp_path, good_checkpoint):
    from recipes.image_classification.checkpoint import CheckpointError

    raw = good_checkpoint.read_bytes()
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "epoch": 1}, foreign)  # no 'resolved' (today: KeyError: 'resolved')
    cases = [(b"", "is empty"), (b"\x00garbage\xff" * 50, "not a complete PyTorch checkpoint"),
             (raw[: len(raw) // 2], "truncated"), (raw[:-5], "truncated or corrupted"), (raw + b"\n", "truncated or corrupted"),
             (foreign.read_bytes(), "not a checkpoint of the image-classification recipe: it lacks 'optimizer'")]
    for content, match in cases:
        with pytest.raises(CheckpointError, match=match):
            _resume_with(tmp_path, good_checkpoint, content)


@pytest.mark.parametrize("where", ["data", "pickle", "zip_directory", "checksum"])
def test_one_flipped_byte_is_refused(tmp_path, good_checkpoint, where):
    from recipes.image_classification.checkpoint import CheckpointError

    raw = good_checkpoint.read_bytes()
    offset = {"data": len(raw) // 2, "pickle": raw.index(b"data.pkl") + 200, "zip_directory": len(raw) - 120,
              "checksum": len(raw) - 10}[where]
    path = tmp_path / "flipped.pt"
    path.write_bytes(raw)
    _flip(path, offset)
    with pytest.raises(CheckpointError, match="corrupted|not a complete|cannot read"):
        _resume_with(tmp_path, good_checkpoint, path.read_bytes())


def test_every_single_bit_flip_of_a_small_checkpoint_is_refused(tmp_path):
    from recipes.image_classification.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

    path = tmp_path / "small.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(3.0)}, "epoch": 1})
    raw = path.read_bytes()
    assert read_checkpoint(path)["epoch"] == 1
    for offset in range(0, len(raw), 7):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError):
            read_checkpoint(path)


def test_an_old_checkpoint_without_checksum_resumes_with_a_warning(tmp_path, good_checkpoint):
    payload = _load(good_checkpoint)
    out = tmp_path / "run"
    out.mkdir()
    torch.save(payload, out / "checkpoint.pt")  # as the recipe wrote it before checksums
    with pytest.warns(RuntimeWarning, match="no checksum"):
        result = train.main(_cfg(tmp_path, opt="adahessian", epochs=2, resume=True))
    assert result["epoch"] == 2


def test_a_full_disk_while_saving_leaves_the_last_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    import errno
    import io

    from recipes.image_classification.checkpoint import CheckpointError, read_checkpoint

    train.main(_cfg(tmp_path, opt="sgd", epochs=1))
    out = tmp_path / "run"
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # half the bytes reach the disk, then ENOSPC
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*partial file was removed.*unchanged"):
        train.main(_cfg(tmp_path, opt="sgd", epochs=2, resume=True))
    monkeypatch.undo()
    assert not list(out.glob("*.tmp"))
    assert (out / "checkpoint.pt").read_bytes() == before and read_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    # torch's own error for a full disk (a RuntimeError from its zip writer) is reported the same way
    def torch_full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", torch_full_disk)
    with pytest.raises(CheckpointError, match="disk is full"):
        train.main(_cfg(tmp_path, opt="sgd", epochs=2, resume=True))
    monkeypatch.undo()
    assert not list(out.glob("*.tmp")) and (out / "checkpoint.pt").read_bytes() == before
    # and the run resumes from it once there is space again
    assert train.main(_cfg(tmp_path, opt="sgd", epochs=2, resume=True))["epoch"] == 2
    assert [r["epoch"] for r in _jsonl(out / "metrics.jsonl")] == [1, 2]


def test_summarize_reads_a_killed_run(tmp_path, capsys):
    """summarize.py on a run killed mid-write and without config.json: the checkpoint's options, the whole records."""
    spec = importlib.util.spec_from_file_location("image_classification_summarize", SCRIPT.with_name("summarize.py"))
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    train.main(_cfg(tmp_path, opt="sgd"))
    out = tmp_path / "run"
    (out / "config.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "val_a')
    row = summarize.summarize(out)
    assert row.startswith("| sgd | digits_cnn | 1 |")
