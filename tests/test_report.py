"""hessopt.report: the files it writes, their numbers, what it refuses."""
import json
import sys

import pytest
import torch
from torch import nn

import hessopt

PNG = b"\x89PNG"


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (5,), generator=g))
               for _ in range(2)]
    return model, nn.CrossEntropyLoss(), batches


def test_report_on_a_tiny_model_writes_every_file(tmp_path):
    pytest.importorskip("matplotlib")
    model, loss, batches = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    r = hessopt.report(model, loss, batches, out=tmp_path / "rep", k=3, layerwise=True,
                       landscape={"steps": 5, "grid": 3}, seed=4, density_steps=10, trace_matvecs=12,
                       metadata={"checkpoint": "none"})
    assert sorted(r.paths) == ["density", "eigenvalues", "json", "landscape_random", "landscape_top", "layerwise",
                               "markdown"]
    for name in ("density", "eigenvalues", "layerwise", "landscape_top", "landscape_random"):
        assert r.paths[name].read_bytes()[:4] == PNG, name
    saved = json.loads(r.paths["json"].read_text())
    # the numbers are those of one curvature_summary with generator=seed
    op = hessopt.HessianOperator(model, loss, batches)
    expected = hessopt.curvature_summary(op, k=3, density=True, density_steps=10, trace_matvecs=12, generator=4)
    assert saved["summary"] == json.loads(json.dumps(expected.to_dict()))
    assert saved["summary"]["top_eigenvalues"] == expected.top_eigenvalues.tolist()
    assert saved["config"]["seed"] == 4 and saved["config"]["matrix"] == "hessian"
    assert saved["config"]["summary_kwargs"] == {"density_steps": 10, "trace_matvecs": 12}
    assert saved["metadata"] == {"checkpoint": "none"}
    assert saved["hessopt_version"] == hessopt.__version__ and saved["torch_version"] == torch.__version__
    assert "date" in saved and set(saved["timings_s"]) >= {"summary", "layerwise", "landscape", "total"}
    assert [row["name"] for row in saved["layerwise"]] == ["0", "2"]
    assert len(saved["landscape"]["top_eigenvector"]["losses"]) == 5
    md = r.paths["markdown"].read_text()
    for text in ("# Curvature report", "| top eigenvalues |", "## Layer-wise spectra", "![density](density.png)",
                 "## Loss landscape", "| checkpoint | none |"):
        assert text in md, text
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert r.layerwise is not None and set(r.landscapes) == {"top_eigenvector", "random_plane"}


def test_report_refuses_to_overwrite(tmp_path):
    model, loss, batches = _tiny()
    kw = dict(out=tmp_path, k=1, density=False, trace_matvecs=4, plots=False)
    hessopt.report(model, loss, batches[0], **kw)
    (tmp_path / "report.json").write_text("{}")  # a user's edit that must survive a refused call
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hessopt.report(model, loss, batches[0], **kw)
    assert (tmp_path / "report.json").read_text() == "{}"
    r = hessopt.report(model, loss, batches[0], overwrite=True, **kw)
    assert json.loads(r.paths["json"].read_text())["summary"]["num_params"] == 26
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]  # plots=False: no PNGs


def test_report_on_an_operator(tmp_path):
    A = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    r = hessopt.report(hessopt.MatrixOperator(A), out=tmp_path, k=2, plots=False, density_steps=8, seed=1)
    assert r.summary.top_eigenvalues.tolist() == pytest.approx([8.0, 7.0], abs=1e-8)
    saved = json.loads(r.paths["json"].read_text())
    assert saved["config"]["operator"] == "MatrixOperator" and saved["config"]["model"] is None
    assert "gradient_concentration" not in saved["summary"]
    assert "operator `MatrixOperator`" in r.paths["markdown"].read_text()


def test_report_argument_errors(tmp_path, monkeypatch):
    model, loss, batches = _tiny()
    op = hessopt.MatrixOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="layerwise needs the model"):
        hessopt.report(op, out=tmp_path, layerwise=True)
    with pytest.raises(ValueError, match="landscape needs the model"):
        hessopt.report(op, out=tmp_path, landscape=True)
    with pytest.raises(ValueError, match="an operator carries its own data"):
        hessopt.report(op, loss, batches, out=tmp_path)
    with pytest.raises(ValueError, match="a model needs data"):
        hessopt.report(model, loss, out=tmp_path)
    with pytest.raises(TypeError, match="nn.Module .* or a curvature operator"):
        hessopt.report("model.pt", out=tmp_path)
    with pytest.raises(ValueError, match=r"matrix='newton': choose one of \['fisher', 'ggn', 'hessian'\]"):
        hessopt.report(model, loss, batches, out=tmp_path, matrix="newton")
    monkeypatch.delattr(hessopt, "GGNOperator", raising=False)
    with pytest.raises(ValueError, match="matrix='ggn' needs hessopt.GGNOperator"):
        hessopt.report(model, loss, batches, out=tmp_path, matrix="ggn")
    with pytest.raises(TypeError, match="report\\(\\) sets generator itself"):
        hessopt.report(model, loss, batches, out=tmp_path, generator=0)
    with pytest.raises(TypeError, match="layerwise must be True, False or a dict"):
        hessopt.report(model, loss, batches, out=tmp_path, layerwise="yes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        hessopt.report(model, loss, batches, out=tmp_path / "file")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install hessopt\[plot\]"):
        hessopt.report(model, loss, batches, out=tmp_path / "new")
    assert not (tmp_path / "new").exists()  # refused before any work or any file


@pytest.mark.parametrize("matrix, name", [("ggn", "GGNOperator"), ("fisher", "EmpiricalFisherOperator")])
def test_report_builds_the_named_matrix(tmp_path, matrix, name):
    model, loss, batches = _tiny()
    r = hessopt.report(model, loss, batches, out=tmp_path, k=2, plots=False, density=False, trace_matvecs=6)
    r2 = hessopt.report(model, loss, batches, out=tmp_path / matrix, k=2, plots=False, density=False,
                        trace_matvecs=6, matrix=matrix)
    saved = json.loads(r2.paths["json"].read_text())
    assert saved["config"]["operator"] == name and saved["config"]["matrix"] == matrix
    op = getattr(hessopt, name)(model, loss, batches)
    expected = hessopt.curvature_summary(op, k=2, density=False, trace_matvecs=6, generator=0)
    assert r2.summary.top_eigenvalues.tolist() == expected.top_eigenvalues.tolist()
    assert r.summary.num_params == r2.summary.num_params


class _HFStyle(nn.Module):
    """A transformers-like model: keyword inputs, an output object with ``.loss`` and ``.logits``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7)

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.emb(input_ids))).mean(dim=1)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return type("Output", (), {"loss": loss, "logits": logits})()


def test_report_on_an_hf_style_dict_loader(tmp_path):
    torch.manual_seed(0)
    model = _HFStyle().double()
    g = torch.Generator().manual_seed(0)
    loader = [{"input_ids": torch.randint(0, 7, (3, 5), generator=g), "labels": torch.randint(0, 7, (3,), generator=g)}
              for _ in range(2)]
    r = hessopt.report(model, None, loader, out=tmp_path, k=2, layerwise=True, plots=False, density_steps=6,
                       trace_matvecs=6)
    assert r.summary.num_params == sum(p.numel() for p in model.parameters())
    # the same numbers as the pair form of the same loss
    pairs = [((b["input_ids"],), b["labels"]) for b in loader]

    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids).logits

    op = hessopt.HessianOperator(Logits(model), nn.CrossEntropyLoss(), [(ids[0], y) for ids, y in pairs])
    expected = hessopt.curvature_summary(op, k=2, density=True, density_steps=6, trace_matvecs=6, generator=0)
    assert r.summary.top_eigenvalues.tolist() == pytest.approx(expected.top_eigenvalues.tolist(), rel=1e-10)
    assert r.summary.loss == pytest.approx(expected.loss, rel=1e-12)
    assert json.loads(r.paths["json"].read_text())["layerwise"][0]["name"] == "emb"
