"""Data from files (tensors, CSV), splits the user sizes, and choosing the compared output of
models with tuple/dict inputs and outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import inferopt
from inferopt._contract import Batch, Data, SourceContext
from inferopt._logging import get_logger

QUICK = ["--metric", "fidelity", "--metric", "latency:min_runs=3,min_seconds=0,warmup=1"]

MODELS_PY = '''
import torch

class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 32)
        self.b = torch.nn.Linear(32, 3)
    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

class Keywords(torch.nn.Module):
    """Keyword inputs; returns a tuple (hidden, pooled) like an encoder."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
    def forward(self, input_ids, attention_mask):
        h = self.proj(self.emb(input_ids)) * attention_mask.unsqueeze(-1)
        return h, h.mean(1)

def classifier():
    return Classifier()

def keywords():
    return Keywords()
'''


@pytest.fixture
def models(tmp_path: Path) -> Path:
    (tmp_path / "models.py").write_text(MODELS_PY)
    return tmp_path / "models.py"


def load(spec: str, batch_size: int = 4) -> Data:
    from inferopt._registry import load_plugins
    from inferopt._sources import resolve_model_source

    _manager, registry = load_plugins()
    entry = resolve_model_source(registry, spec, kind="data source")
    return entry.obj().load(spec, SourceContext(log=get_logger(), batch_size=batch_size))


def test_npy_with_a_labels_file(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(30, dtype=np.float32).reshape(10, 3))
    np.save(tmp_path / "y.npy", np.arange(10) % 3)
    data = load(f"{tmp_path}/x.npy:labels={tmp_path}/y.npy")
    assert [b.size for b in data.eval] == [4, 4, 2]
    assert data.eval[2].inputs[1, 2].item() == 29.0
    assert data.eval[0].labels.tolist() == [0, 1, 2, 0]


def test_npz_and_safetensors_keyword_inputs_and_labels(tmp_path):
    from safetensors.torch import save_file

    ids = np.random.default_rng(0).integers(0, 50, (6, 5))
    np.savez(tmp_path / "tok.npz", input_ids=ids, attention_mask=np.ones_like(ids),
             labels=ids[:, 0])
    data = load(f"{tmp_path}/tok.npz")
    assert sorted(data.eval[0].inputs) == ["attention_mask", "input_ids"]
    assert data.has_labels and data.num_samples == 6
    save_file({"features": torch.ones(5, 2), "y": torch.arange(5)}, str(tmp_path / "t.safetensors"))
    data = load(f"{tmp_path}/t.safetensors")
    assert isinstance(data.eval[0].inputs, torch.Tensor) and data.eval[1].labels.tolist() == [4]
    data = load(f"{tmp_path}/tok.npz:inputs=input_ids,labels=labels")
    assert isinstance(data.eval[0].inputs, torch.Tensor)
    with pytest.raises(inferopt.UsageError, match="no entry 'nope'; it has"):
        load(f"{tmp_path}/tok.npz:inputs=nope")


def test_pt_tuple_of_inputs_and_labels(tmp_path):
    torch.save((torch.randn(9, 6), torch.arange(9) % 3), tmp_path / "d.pt")
    data = load(f"{tmp_path}/d.pt")
    assert data.num_samples == 9 and data.has_labels


def test_csv_features_and_text_labels_run_with_accuracy(cli, tmp_path, models):
    rng = np.random.default_rng(0)
    lines = ["f1,f2,f3,f4,f5,f6,species"] + [
        ",".join(f"{v:.3f}" for v in rng.normal(size=6)) + "," + ["setosa", "virginica",
                                                                  "versicolor"][i % 3]
        for i in range(40)]
    (tmp_path / "iris.csv").write_text("\n".join(lines) + "\n")
    data = load(f"{tmp_path}/iris.csv:label=species")
    assert data.eval[0].inputs.shape == (4, 6)
    assert data.eval[0].labels.tolist() == [0, 2, 1, 0]  # sorted: setosa, versicolor, virginica
    assert "label column 'species'" in data.description
    result = cli("run", "--model", "models.py:classifier", "--data", "iris.csv:label=species",
                 "--metric", "accuracy", *QUICK, "--out", "csv")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "csv" / "report.json").read_text())
    assert report["baseline"]["metrics"]["accuracy"]["samples"] == 40
    (tmp_path / "bad.csv").write_text("a,b,label\n1,x,0\n")
    result = cli("run", "--model", "models.py:classifier", "--data", "bad.csv", *QUICK)
    assert result.returncode == 2 and "line 2, column 'b' is not a number" in result.stderr


def test_split_sizes_are_disjoint_and_seeded():
    from inferopt._recipe import Split
    from inferopt._splits import split_data

    x = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    data = Data(eval=[Batch(inputs=x[i:i + 10], labels=torch.arange(i, i + 10))
                      for i in range(0, 100, 10)])
    parts = split_data(data, Split(calibration=30, train=20, eval=40, seed=3), batch_size=16)
    ids = {name: torch.cat([b.inputs for b in getattr(parts, name)]).flatten().tolist()
           for name in ("calibration", "train", "eval")}
    assert [len(v) for v in ids.values()] == [30, 20, 40]
    assert len(set().union(*map(set, ids.values()))) == 90  # no sample in two splits
    assert all(torch.equal(b.inputs.flatten(), b.labels.float()) for b in parts.eval)
    assert not parts.calibration_is_eval and not parts.train_is_eval
    again = split_data(data, Split(calibration=30, train=20, eval=40, seed=3), batch_size=16)
    other = split_data(data, Split(calibration=30, train=20, eval=40, seed=4), batch_size=16)
    assert torch.equal(again.eval[0].inputs, parts.eval[0].inputs)
    assert not torch.equal(other.eval[0].inputs, parts.eval[0].inputs)
    rest = split_data(data, Split(calibration=30), batch_size=64)
    assert rest.num_samples == 70 and rest.train is rest.calibration
    with pytest.raises(inferopt.UsageError, match="asks for 120 samples but the data has 100"):
        split_data(data, Split(eval=120), batch_size=16)


def test_split_on_the_command_line_reaches_calibration(cli, tmp_path, models):
    torch.save((torch.randn(50, 6), torch.arange(50) % 3), tmp_path / "d.pt")
    result = cli("run", "--model", "models.py:classifier", "--data", "d.pt", "--split",
                 "calibration=20,eval=24,seed=1", "--batch-size", "8",
                 "--optimize", "int8:mode=static", *QUICK, "--out", "split")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "split" / "report.json").read_text())
    assert report["optimized"]["metrics"]["fidelity"]["samples"] == 24
    assert report["steps"][0]["details"]["calibration"] == {
        "batches": 3, "observer": "minmax", "source": "calibration split"}
    assert report["recipe"]["split"] == {"calibration": 20, "eval": 24, "seed": 1}
    bad = cli("run", "--model", "models.py:classifier", "--data", "d.pt", "--split", "test=5")
    assert bad.returncode == 2 and "calibration" in bad.stderr


def test_output_option_picks_the_tensor_of_a_tuple_output(cli, tmp_path, models):
    ids = np.random.default_rng(0).integers(1, 50, (16, 7))
    np.savez(tmp_path / "tok.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    runs = {}
    for output in ("0", "1"):
        result = cli("run", "--model", "models.py:keywords", "--data", "tok.npz", "--output",
                     output, "--optimize", "int8", *QUICK, "--out", f"out{output}")
        assert result.returncode == 0, result.stderr
        runs[output] = json.loads((tmp_path / f"out{output}" / "report.json").read_text())
    hidden = runs["0"]["optimized"]["metrics"]["fidelity"]
    pooled = runs["1"]["optimized"]["metrics"]["fidelity"]
    assert hidden["samples"] == pooled["samples"] == 16
    assert hidden["mean_abs_err"] != pooled["mean_abs_err"]  # two different tensors compared
    result = cli("run", "--model", "models.py:keywords", "--data", "tok.npz", "--output",
                 "pooler_output", *QUICK)
    assert result.returncode == 2
    assert "has no 'pooler_output'; it has: 0, 1" in result.stderr


def test_select_output_on_model_output_objects():
    from inferopt._model_io import primary_output

    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.BaseModelOutputWithPooling(
        last_hidden_state=torch.ones(2, 3, 4), pooler_output=torch.zeros(2, 4),
        hidden_states=(torch.zeros(2, 3, 4), torch.full((2, 3, 4), 7.0)))
    assert primary_output(out) is out.last_hidden_state  # default: the first tensor
    assert primary_output(out, "pooler_output") is out.pooler_output
    assert primary_output(out, "hidden_states.1")[0, 0, 0] == 7.0
    with pytest.raises(inferopt.UsageError, match="names a tuple, not a tensor"):
        primary_output(out, "hidden_states")


def test_float64_arrays_and_a_csv_with_a_byte_order_mark(tmp_path):
    np.save(tmp_path / "x64.npy", np.ones((4, 3)))  # NumPy's default dtype, float64
    assert load(f"{tmp_path}/x64.npy").eval[0].inputs.dtype == torch.float32
    (tmp_path / "bom.csv").write_text("label,a,b\n1,0.5,0.25\n0,1.0,2.0\n",
                                      encoding="utf-8-sig")
    data = load(f"{tmp_path}/bom.csv")
    assert data.has_labels and data.eval[0].labels.tolist() == [1, 0]
    assert data.eval[0].inputs.shape == (2, 2)


def test_split_refuses_to_drop_labels_that_only_some_batches_have():
    from inferopt._recipe import parse_split
    from inferopt._splits import split_data

    labelled = [Batch(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])) for _ in range(2)]
    unlabelled = [Batch(torch.randn(4, 3)) for _ in range(2)]
    data = Data(eval=labelled, calibration=unlabelled)
    with pytest.raises(inferopt.UsageError, match="would be lost"):
        split_data(data, parse_split("calibration=4"), 4)
