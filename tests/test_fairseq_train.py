"""fairseq-train with ``--user-dir <plugin> --optimizer adahessian``, end to end on CPU (tiny models).

In-process runs go through fairseq's own CLI path (parse_args_and_arch -> call_main -> train.main,
as fairseq's test suite does); the distributed runs are separate processes (2 ranks, gloo).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairseq")

from hessopt.integrations.fairseq import USER_DIR  # noqa: E402
from hessopt.integrations.fairseq.optimizer import UnsupportedFairseqOption  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "transformer"
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"

TINY_MODEL = [
    "--arch", "transformer_iwslt_de_en", "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
    "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]
ADAHESSIAN = [
    "--user-dir", USER_DIR, "--optimizer", "adahessian", "--lr", "0.047", "--adahessian-betas", "(0.9, 0.98)",
    "--adahessian-eps", "1e-4", "--block-length", "8", "--weight-decay", "1e-4",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2", "--warmup-init-lr", "1e-7",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
]
COMMON = ["--cpu", "--num-workers", "0", "--log-format", "simple", "--log-interval", "1",
          "--no-epoch-checkpoints", "--disable-validation", "--seed", "3"]
DUMMY_MT = ["--task", "dummy_mt", "--dict-size", "100", "--src-len", "8", "--tgt-len", "8",
            "--dataset-size", "64", "--batch-size", "8"]




@pytest.fixture(autouse=True)
def _fairseq_checkpoints_load(monkeypatch):
    # fairseq-fixed calls torch.load without weights_only (True by default since torch 2.6) and its
    # checkpoints hold an argparse.Namespace; these are our own files
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", **extra)


def _run(cmd, **env):
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(**env))
    assert result.returncode == 0, f"{cmd[1]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def fairseq_train(args):
    """``fairseq-train ARGS`` in this process."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train

    parser = options.get_training_parser()
    parsed = options.parse_args_and_arch(parser, input_args=[str(a) for a in args])
    distributed_utils.call_main(convert_namespace_to_omegaconf(parsed), train.main)


def load(path):
    from fairseq import checkpoint_utils

    return checkpoint_utils.load_checkpoint_to_cpu(str(path))


@pytest.fixture(scope="module")
def multi30k_slice(tmp_path_factory):
    """200 Multi30k training pairs through recipes/transformer/prepare_data.py (sentencepiece + fairseq-preprocess)."""
    if not MULTI30K.is_dir():
        pytest.fail(f"Multi30k not found at {MULTI30K} (../shared/data/multi30k beside the repository)")
    out = tmp_path_factory.mktemp("multi30k") / "prepared"
    _run([sys.executable, str(RECIPES / "prepare_data.py"), "--out", str(out), "--max-sentences", "200",
          "--max-eval-sentences", "12", "--vocab-size", "300", "--workers", "1"])
    info = json.loads((out / "prepare.json").read_text())
    assert info["sentences"] == {"train": 200, "valid": 12, "test": 12}
    return out


def test_dummy_mt_trains_with_update_freq_clipping_and_inverse_sqrt(tmp_path):
    fairseq_train(DUMMY_MT + TINY_MODEL + ADAHESSIAN + COMMON + [
        "--max-update", "3", "--update-freq", "2", "--clip-norm", "0.5", "--save-dir", tmp_path])
    state = load(tmp_path / "checkpoint_last.pt")
    assert state["optimizer_history"][-1]["optimizer_name"] == "FairseqAdaHessian"
    opt = state["last_optimizer_state"]
    glob = opt["param_groups"][0]["adahessian"]
    assert glob["step"] == 3 and glob["generator_states"], "global step and probe generator state saved"
    per_param = list(opt["state"].values())
    assert per_param and all(s["curvature_updates"] == 3 for s in per_param)
    assert all(torch.isfinite(s["exp_hessian_diag_sq"]).all() and s["exp_hessian_diag_sq"].abs().sum() > 0
               for s in per_param)
    # inverse_sqrt after 3 updates with 2 warm-up updates: lr * sqrt(warmup / num_updates)
    assert opt["param_groups"][0]["lr"] == pytest.approx(0.047 * (2 / 3) ** 0.5)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--fp16", "--fp16-no-flatten-grads"], "--fp16/--bf16"),
        (["--memory-efficient-fp16"], "--memory-efficient-fp16"),
        (["--amp"], "--amp"),
    ],
)
def test_half_precision_is_rejected_at_startup(tmp_path, flags, match):
    with pytest.raises(UnsupportedFairseqOption, match=match):
        fairseq_train(DUMMY_MT + TINY_MODEL + ADAHESSIAN + COMMON + flags + ["--max-update", "2", "--save-dir", tmp_path])
    assert not (tmp_path / "checkpoint_last.pt").exists()  # raised before any update


@pytest.mark.parametrize("flags", [["--fp16", "--fp16-no-flatten-grads"], ["--amp"]], ids=["fp16", "amp"])
def test_half_precision_wrappers_really_lose_the_graph(tmp_path, monkeypatch, flags):
    """Evidence for the start-up error: with the check disabled, fairseq's FP16Optimizer / AMPOptimizer
    hand AdaHessian gradients without their graph (they run their own plain backward)."""
    import hessopt
    from hessopt.integrations.fairseq import optimizer as plugin

    monkeypatch.setattr(plugin, "check_fairseq_options", lambda cfg: None)
    with pytest.raises(hessopt.SecondOrderGraphError, match="without create_graph=True"):
        fairseq_train(DUMMY_MT + TINY_MODEL + ADAHESSIAN + COMMON + flags + ["--max-update", "2", "--save-dir", tmp_path])


def _params(path):
    return {k: v for k, v in load(path)["model"].items()}


def test_resume_from_checkpoint_is_bit_identical(multi30k_slice, tmp_path):
    """4 updates straight == 2 updates, checkpoint, resume for 2 (data order, dropout, probes all restored)."""
    base = ["--task", "translation", str(multi30k_slice / "bin"), "-s", "de", "-t", "en"] + TINY_MODEL + ADAHESSIAN + [
        "--max-tokens", "300", "--dropout", "0.1"] + COMMON
    fairseq_train(base + ["--max-update", "4", "--save-dir", tmp_path / "straight"])
    fairseq_train(base + ["--max-update", "2", "--save-dir", tmp_path / "resumed"])
    # negative control: the same checkpoint with the probe generator's state removed
    control = tmp_path / "control"
    control.mkdir()
    state = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=False)
    assert state["last_optimizer_state"]["param_groups"][0]["adahessian"]["generator_states"]
    state["last_optimizer_state"]["param_groups"][0]["adahessian"]["generator_states"] = {}
    torch.save(state, control / "checkpoint_last.pt")
    fairseq_train(base + ["--max-update", "4", "--save-dir", tmp_path / "resumed"])
    fairseq_train(base + ["--max-update", "4", "--save-dir", control])

    straight, resumed = _params(tmp_path / "straight" / "checkpoint_last.pt"), _params(tmp_path / "resumed" / "checkpoint_last.pt")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    opt_s = load(tmp_path / "straight" / "checkpoint_last.pt")["last_optimizer_state"]
    opt_r = load(tmp_path / "resumed" / "checkpoint_last.pt")["last_optimizer_state"]
    for key in opt_s["state"]:
        assert torch.equal(opt_s["state"][key]["exp_hessian_diag_sq"], opt_r["state"][key]["exp_hessian_diag_sq"])
    assert torch.equal(opt_s["param_groups"][0]["adahessian"]["generator_states"]["cpu"],
                       opt_r["param_groups"][0]["adahessian"]["generator_states"]["cpu"])
    reseeded = _params(control / "checkpoint_last.pt")
    assert any(not torch.equal(straight[n], reseeded[n]) for n in straight), "the test cannot see the probe stream"


def test_recipe_end_to_end_on_multi30k_slice(multi30k_slice, tmp_path):
    """compare.py: adam and adahessian for the same 2 updates, then fairseq-generate + sacrebleu on the test slice."""
    out = tmp_path / "out"
    train_args = " ".join(TINY_MODEL + ["--max-tokens", "300"])
    _run(
        [sys.executable, str(RECIPES / "compare.py"), "--data", str(multi30k_slice / "bin"),
         "--ref", str(multi30k_slice / "ref" / "test.en"), "--out", str(out), "--work-dir", str(tmp_path / "work"),
         "--max-update", "2", "--device", "cpu", "--train-args", train_args, "--max-len-a", "0", "--max-len-b", "4",
         "--gen-batch-size", "16"],
        PYTHONWARNINGS="ignore::FutureWarning",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizers"] == ["adahessian", "adam"]
    for opt in ("adahessian", "adam"):
        r = summary["results"][opt]
        assert r["num_updates"] == 2
        assert 0.0 <= r["bleu"]["bleu"] <= 100.0 and r["bleu"]["sentences"] == 12
        assert r["seconds_per_update"] is not None and r["seconds_per_update"] > 0
    assert "| adahessian | 2 |" in (out / "summary.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "generate_adahessian.txt", "generate_adam.txt", "summary.json", "summary.md",
        "train_adahessian.log", "train_adam.log"]


# -- distributed: 2 gloo ranks on CPU ----------------------------------------------------------------

_WORKER = r"""
import json, sys
args, shim = json.loads(sys.argv[1]), sys.argv[2]
if shim == "c10d":
    # fairseq passes device_ids=[device_id] to torch's DDP, which torch rejects for CPU modules;
    # on CPU the only change needed is device_ids=None. Everything else is fairseq's c10d path.
    import torch.nn.parallel
    import fairseq.models.distributed_fairseq_model as dfm
    class CpuDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, device_ids=None, output_device=None, **kwargs):
            super().__init__(module, **kwargs)
    dfm.DistributedDataParallel = CpuDDP
from fairseq_cli.train import cli_main
sys.argv = ["fairseq-train"] + args
cli_main()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(base, backend, save_dir):
    port = _free_port()
    procs = []
    for rank in range(2):
        args = base + ["--save-dir", str(save_dir), "--ddp-backend", backend, "--distributed-world-size", "2",
                       "--distributed-rank", str(rank), "--distributed-init-method", f"tcp://127.0.0.1:{port}",
                       "--distributed-no-spawn", "--distributed-backend", "gloo", "--device-id", "0"]
        shim = "c10d" if backend in ("c10d", "pytorch_ddp") else "none"
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(args), shim],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=_env()))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_update_freq_2(multi30k_slice, tmp_path):
    """2 ranks (legacy_ddp, and c10d) take the same steps as 1 process accumulating both ranks' batches.

    fairseq shards the shuffled batch list across ranks (rank r gets batches r, r+2, ...) and
    --update-freq 2 groups consecutive batches, so both see batches {0,1}, {2,3}, ... per update.
    The per-rank Hessian estimates differ (different data); only their average over ranks, which
    hessopt.distributed.OptimizerSync computes, reproduces the single-process curvature.
    """
    base = ["--task", "translation", str(multi30k_slice / "bin"), "-s", "de", "-t", "en"] + TINY_MODEL + ADAHESSIAN + [
        "--max-tokens", "300", "--dropout", "0.0", "--max-update", "3"] + COMMON
    fairseq_train(base + ["--update-freq", "2", "--save-dir", tmp_path / "single"])
    single = _params(tmp_path / "single" / "checkpoint_last.pt")
    fairseq_train(base + ["--update-freq", "1", "--save-dir", tmp_path / "half"])
    half = _params(tmp_path / "half" / "checkpoint_last.pt")
    for backend in ("legacy_ddp", "c10d"):
        _two_ranks(base, backend, tmp_path / backend)
        two = _params(tmp_path / backend / "checkpoint_last.pt")
        for name in single:
            torch.testing.assert_close(two[name], single[name], rtol=1e-4, atol=1e-6, msg=f"{backend}: {name}")
    # the comparison is sharp: one process on half the data ends far outside that tolerance
    assert max((half[n] - single[n]).abs().max().item() for n in single) > 1e-3
