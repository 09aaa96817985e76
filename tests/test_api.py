"""The Python API: inferopt.run / apply / load."""

from __future__ import annotations

import json

import pytest
import torch

import inferopt
from tests.helpers import demo_correct


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))


def test_apply_quantizes_in_the_torchao_style():
    model = mlp()
    x = torch.randn(16, 32)
    ref = model(x).detach()
    q = inferopt.apply(model, "int8", skip="2")
    assert type(q[0]).__name__ == "Int8Linear"
    assert isinstance(q[2], torch.nn.Linear)  # skipped
    out = q(x)
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.999


def test_apply_unknown_option_is_clear():
    with pytest.raises(inferopt.UsageError, match="optimizer 'int8': unknown option 'bits'"):
        inferopt.apply(mlp(), "int8", bits=4)


def test_run_with_module_and_tensors_does_not_touch_the_module(tmp_path):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(64, 32)
    y = torch.randint(0, 8, (64,))
    report = inferopt.run(model=model, data=(x, y), batch_size=16, out=tmp_path / "run",
                          metrics=["accuracy", "fidelity", "size"])
    assert report.optimized["fidelity"]["cosine"] > 0.999
    assert report.baseline["accuracy"]["samples"] == 64
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[0], torch.nn.Linear)
    manifest = json.loads((tmp_path / "run" / "inferopt.json").read_text())
    assert manifest["model"] == "<in-memory module>"

    with pytest.raises(inferopt.UsageError, match="pass model="):
        inferopt.load(tmp_path / "run")
    loaded = inferopt.load(tmp_path / "run", model=mlp())
    assert type(loaded[0]).__name__ == "Int8Linear"


def test_load_rebuilds_the_saved_model_without_pickle(tmp_path):
    report = inferopt.run(model="demo:digits-mlp-small", out=tmp_path / "r",
                          metrics=["accuracy"])
    loaded = inferopt.load(tmp_path / "r")
    assert demo_correct(loaded) == report.optimized["accuracy"]["correct"]
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.modules())


def test_load_refuses_a_directory_that_is_not_a_saved_model(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a model")
    with pytest.raises(inferopt.UsageError, match="is not a saved inferopt model"):
        inferopt.load(tmp_path)


def test_load_detects_weights_that_do_not_match(tmp_path):
    inferopt.run(model="demo:digits-mlp-small", out=tmp_path / "r", metrics=["size"])
    manifest = tmp_path / "r" / "inferopt.json"
    doc = json.loads(manifest.read_text())
    doc["steps"] = []  # pretend no step was applied: the int8 buffers no longer fit
    manifest.write_text(json.dumps(doc))
    with pytest.raises(inferopt.UsageError, match="does not match the saved weights"):
        inferopt.load(tmp_path / "r")


def test_small_inputs_labels_tuple_is_one_labelled_batch():
    x = torch.randn(8, 32)
    y = torch.randint(0, 8, (8,))
    report = inferopt.run(model=mlp(), data=(x, y), save=False,
                          optimize=[], metrics=["accuracy"])
    assert report.baseline["accuracy"]["samples"] == 8
    assert report.steps == []


def test_unknown_gate_in_api_is_a_usage_error():
    with pytest.raises(inferopt.UsageError, match="unknown gate"):
        inferopt.run(model="demo:digits-mlp-small", gates={"max_latency": 1.0}, save=False)


def test_iterable_datasets_are_batched():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(20):
                yield torch.randn(32, generator=g), torch.tensor(1)

    report = inferopt.run(model=mlp(), data=Stream(), batch_size=8, save=False, optimize=[],
                          metrics=["accuracy"])
    assert report.baseline["accuracy"]["samples"] == 20


def test_saved_runs_of_file_models_load_from_any_directory(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text(
        "import torch\ndef build():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(32, 8))\n")
    monkeypatch.chdir(tmp_path)
    inferopt.run(model="m.py:build", data="synthetic:shape=4x32", out="r", metrics=["size"])
    monkeypatch.chdir(tmp_path.parent)
    # the saved spec names Python code: the manifest alone never grants trust
    loaded = inferopt.load(tmp_path / "r", trust_model=True)
    assert type(loaded[0]).__name__ == "Int8Linear"
