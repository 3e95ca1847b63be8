"""`hessopt analyze` on the user's own model and data (tests/analyze_fixtures.py), and its error messages.

The fixtures module is imported by MODULE:FUNCTION from the current directory (tests/), as a user's
module would be; the report's eigenvalues are compared with ``hessopt.top_eigenvalues`` on the
same operator and with the dense Hessian's (float64, 26 parameters).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hessopt
from hessopt.cli import CLIError, main, resolve_callable

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import analyze_fixtures as fx  # noqa: E402

FAST = ["--device", "cpu", "--no-plots", "--no-progress", "--tol", "1e-9", "--trace-matvecs", "8",
        "--density-steps", "8"]


@pytest.fixture
def in_tests(monkeypatch):
    monkeypatch.chdir(TESTS)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _reference(model, data, k=3, loss_fn=None):
    op = hessopt.HessianOperator(model, loss_fn or nn.CrossEntropyLoss(), data)
    ref = hessopt.top_eigenvalues(op, k=k, tol=1e-10, generator=0).eigenvalues
    dense = torch.linalg.eigvalsh(op.to_dense()).flip(0)[:k]
    torch.testing.assert_close(ref, dense, rtol=1e-8, atol=1e-10)
    return ref.tolist(), op


def test_analyze_a_user_model_from_module_function(in_tests, tmp_path):
    out = tmp_path / "report"
    rc = main(["analyze", "--model-fn", "analyze_fixtures:build", "--data-fn", "analyze_fixtures:batches",
               "--loss", "cross_entropy", "--out", str(out), "-k", "3", *FAST])
    assert rc == 0
    report = _report(out)
    ref, op = _reference(fx.build(), fx.batches())
    assert report["summary"]["top_eigenvalues"] == pytest.approx(ref, rel=1e-7)
    assert report["summary"]["num_params"] == op.num_params == 26
    assert report["summary"]["loss"] == pytest.approx(op.loss(), rel=1e-12)
    assert report["metadata"]["model"] == "analyze_fixtures:build"
    assert report["metadata"]["data"] == "analyze_fixtures:batches"
    assert (out / "report.md").read_text().startswith("# Curvature report")


def test_weights_arguments_generators_and_user_losses(in_tests, tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(fx.build(seed=1).state_dict(), weights)
    ref, _ = _reference(fx.build(seed=1), fx.batches(num=3, size=5))
    # a plain state dict into the callable's model (positional and --weights), keyword arguments by
    # KEY=VALUE (JSON values) and by a JSON object, a one-shot generator of batches
    for extra in ([str(weights)], ["--weights", str(weights)]):
        out = tmp_path / f"r{len(extra)}"
        assert main(["analyze", *extra, "--model-fn", "analyze_fixtures:build", "--model-arg", "hidden=4",
                     "--data-fn", "analyze_fixtures:batches", "--data-args", '{"num": 3, "size": 5}',
                     "--loss", "cross_entropy", "--out", str(out), "-k", "3", *FAST]) == 0
        assert _report(out)["summary"]["top_eigenvalues"] == pytest.approx(ref, rel=1e-7)
        assert _report(out)["metadata"]["weights"] == str(weights.resolve())
    # a dict holding the state dict under "model"; a generator; a user loss by MODULE:FUNCTION
    torch.save({"model": fx.build(seed=1).state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    ref_gen, _ = _reference(fx.build(seed=1), fx.batches())
    out = tmp_path / "gen"
    assert main(["analyze", "--weights", str(tmp_path / "ckpt.pt"), "--model", "analyze_fixtures:build",
                 "--data-fn", "analyze_fixtures:batch_generator", "--loss", "analyze_fixtures:sum_then_mean_ce",
                 "--out", str(out), "-k", "3", *FAST]) == 0
    assert _report(out)["summary"]["top_eigenvalues"] == pytest.approx(ref_gen, rel=1e-7)
    # loss(model, batch)
    out = tmp_path / "model_form"
    assert main(["analyze", "--model-fn", "analyze_fixtures:build", "--data-fn", "analyze_fixtures:one_batch",
                 "--loss", "analyze_fixtures:model_form_loss", "--loss-form", "model", "--out", str(out), "-k", "2",
                 *FAST]) == 0
    ref_one, _ = _reference(fx.build(), fx.one_batch(), k=2)
    assert _report(out)["summary"]["top_eigenvalues"] == pytest.approx(ref_one, rel=1e-7)


def test_dict_batches_use_the_models_own_loss_or_a_named_one(in_tests, tmp_path):
    ref, _ = _reference(fx.build(), fx.batches())
    for extra in ([], ["--loss", "cross_entropy"]):  # outputs.loss, or F.cross_entropy(outputs.logits, labels)
        out = tmp_path / f"dict{len(extra)}"
        assert main(["analyze", "--model-fn", "analyze_fixtures:build_dict_model", "--data-fn",
                     "analyze_fixtures:dict_batches", *extra, "--out", str(out), "-k", "3", *FAST]) == 0
        assert _report(out)["summary"]["top_eigenvalues"] == pytest.approx(ref, rel=1e-7)


def test_layerwise_and_landscape_reach_the_report(in_tests, tmp_path):
    out = tmp_path / "full"
    assert main(["analyze", "--model-fn", "analyze_fixtures:build", "--data-fn", "analyze_fixtures:batches",
                 "--loss", "ce", "--out", str(out), "-k", "2", "--layerwise", "--layerwise-trace-matvecs", "4",
                 "--landscape", "--landscape-steps", "3", "--landscape-grid", "0", "--seed", "3", *FAST]) == 0
    report = _report(out)
    assert [row["name"] for row in report["layerwise"]] == ["0", "2"]
    assert len(report["landscape"]["top_eigenvector"]["losses"]) == 3
    assert report["config"]["seed"] == 3


def _fail(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err


def test_errors_are_clear_messages(in_tests, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), *FAST]
    data = ["--data-fn", "analyze_fixtures:batches", "--loss", "cross_entropy"]
    model = ["--model-fn", "analyze_fixtures:build"]
    _fail(capsys, ["analyze", "--model-fn", "analyze_fixtures.build", *data, *out], "expected MODULE:FUNCTION")
    _fail(capsys, ["analyze", "--model-fn", "no_such_module_xyz:build", *data, *out],
          "no module named 'no_such_module_xyz'")
    _fail(capsys, ["analyze", "--model-fn", "analyze_fixtures:nope", *data, *out], "has no attribute 'nope'")
    _fail(capsys, ["analyze", "--model-fn", "analyze_fixtures:NOT_CALLABLE", *data, *out], "not a callable")
    _fail(capsys, ["analyze", "--model-fn", "analyze_fixtures:not_a_model", *data, *out],
          "returned a int, not a torch.nn.Module")
    _fail(capsys, ["analyze", "--model-fn", "analyze_fixtures:raises", *data, *out], "raised ValueError: boom")
    _fail(capsys, ["analyze", *model, "--model-arg", "width=3", *data, *out], "does not take the arguments ['width']")
    _fail(capsys, ["analyze", *model, "--model-arg", "no-equals", *data, *out], "expected KEY=VALUE")
    _fail(capsys, ["analyze", *model, "--model-args", "[1]", *data, *out], "must be a JSON object")
    _fail(capsys, ["analyze", *data, *out], "no model: pass --model-fn")
    _fail(capsys, ["analyze", *model, "--timm", "resnet18", *data, *out], "one model source")
    _fail(capsys, ["analyze", *model, "--loss", "cross_entropy", *out], "no data: pass --data-fn")
    for fn, match in (("not_batches", "returned a str"), ("wrong_batches", "first item is a Tensor"),
                      ("empty", "returned no batches")):
        _fail(capsys, ["analyze", *model, "--data-fn", f"analyze_fixtures:{fn}", "--loss", "mse", *out], match)
    _fail(capsys, ["analyze", *model, "--data-fn", "analyze_fixtures:batches", *out], "pass --loss")
    _fail(capsys, ["analyze", *model, "--data-fn", "analyze_fixtures:batches", "--loss", "hinge", *out],
          "not a known loss")
    _fail(capsys, ["analyze", *model, "--data-fn", "analyze_fixtures:batches", "--loss", "mse", "--loss-form", "model",
                   *out], "--loss-form model needs --loss MODULE:FUNCTION")
    _fail(capsys, ["analyze", *model, *data, "--device", "gpu0", "--out", str(tmp_path / "o")], "is not a device")
    _fail(capsys, ["analyze", *model, *data, "--matrix", "curvature", *out], "matrix='curvature'")
    # the weights: a text file (today: an uncaught KeyError), garbage, empty, not a state dict, not fitting
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes, not a checkpoint\n")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(300))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    torch.save({"weights": 1, "epoch": 2}, tmp_path / "other.pt")
    torch.save(fx.build(hidden=5).state_dict(), tmp_path / "wide.pt")
    for path, match in ((text, "not a PyTorch file"), (garbage, "not a PyTorch file"), (empty, "is empty"),
                        (tmp_path / "other.pt", "not a state dict"), (tmp_path / "wide.pt", "do not fit"),
                        (tmp_path / "missing.pt", "weights not found")):
        _fail(capsys, ["analyze", "--weights", str(path), *model, *data, *out], match)
    _fail(capsys, ["analyze", str(text), *out], "not a PyTorch file")  # also without a model source
    # a report already there
    done = tmp_path / "done"
    assert main(["analyze", *model, *data, "--out", str(done), "-k", "1", *FAST]) == 0
    capsys.readouterr()
    _fail(capsys, ["analyze", *model, *data, "--out", str(done), "-k", "1", *FAST], "--overwrite")
    assert main(["analyze", *model, *data, "--out", str(done), "-k", "1", "--overwrite", *FAST]) == 0
    with pytest.raises(SystemExit):
        main(["analyze", *model, *data, "--out", "x", "-k", "0"])


def test_timm_names_are_built_lazily(in_tests, tmp_path, capsys):
    pytest.importorskip("timm")
    _fail(capsys, ["analyze", "--timm", "no_such_timm_model", "--data-fn", "analyze_fixtures:batches", "--loss", "ce",
                   "--out", str(tmp_path / "o"), *FAST], "timm has no model 'no_such_timm_model'")
    _fail(capsys, ["analyze", "--model", "timm:no_such_timm_model", "--data-fn", "analyze_fixtures:batches",
                   "--loss", "ce", "--out", str(tmp_path / "o"), *FAST], "timm has no model")


def test_resolve_callable_puts_the_current_directory_on_sys_path(tmp_path, monkeypatch):
    (tmp_path / "my_user_module_for_cli.py").write_text("def build():\n    return 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert resolve_callable("my_user_module_for_cli:build", "--model-fn")() == 7
    (tmp_path / "broken_user_module_for_cli.py").write_text("import no_such_dependency_xyz\n")
    with pytest.raises(CLIError, match="importing 'broken_user_module_for_cli' failed: No module named 'no_such_dep"):
        resolve_callable("broken_user_module_for_cli:build", "--model-fn")


def test_console_entry_points_exit_2_without_a_traceback(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "hessopt", "analyze", str(text), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "hessopt analyze: error:" in res.stderr and "not a PyTorch file" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "hessopt.cli", "analyze", "--help"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0 and "--model-fn" in res.stdout and "--data-fn" in res.stdout


@pytest.mark.parametrize("matrix,cls", [("ggn", "GGNOperator"), ("fisher", "EmpiricalFisherOperator")])
def test_matrix_reaches_the_report(in_tests, tmp_path, matrix, cls):
    out = tmp_path / matrix
    assert main(["analyze", "--model-fn", "analyze_fixtures:build", "--data-fn", "analyze_fixtures:batches",
                 "--loss", "cross_entropy", "--matrix", matrix, "--out", str(out), "-k", "2", *FAST]) == 0
    op = getattr(hessopt, cls)(fx.build(), nn.CrossEntropyLoss(), fx.batches())
    dense = torch.linalg.eigvalsh(op.to_dense()).flip(0)[:2]
    report = _report(out)
    assert report["config"]["matrix"] == matrix
    assert report["summary"]["top_eigenvalues"] == pytest.approx(dense.tolist(), rel=1e-7)
