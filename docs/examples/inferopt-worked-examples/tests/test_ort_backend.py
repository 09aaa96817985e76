"""ort: keeps the backend contract (with a smaller last batch), runs `inferopt run` end to end
with its .onnx files kept in the run directory, and refuses quantized steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convnet import DATA, SPEC, batches, build

import inferopt

pytest.importorskip("onnxruntime", reason="the ort backend needs onnxruntime "
                                          "(pip install 'inferopt-worked-examples[ort]')")
from inferopt_worked_examples.ort_backend import OrtBackend


def test_keeps_the_backend_contract_on_a_cnn_with_a_smaller_last_batch(
        inferopt_backend_contract):
    result = inferopt_backend_contract("ort", model=build, data=batches((8, 8, 5)),
                                       atol=1e-4, rtol=1e-4)
    assert [o.shape[0] for o in result.outputs] == [8, 8, 5]
    assert result.description["backend"] == "ort"
    assert Path(result.prepared.path).name == "model.onnx"


def test_tuple_and_dict_inputs_and_outputs(inferopt_backend_contract):
    class TwoInTwoOut(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(6, 3)

        def forward(self, a, b):
            y = self.linear(a) * b
            return {"logits": y, "norm": y.norm(dim=1)}

    pairs = [inferopt.Batch((torch.randn(n, 6), torch.randn(n, 3))) for n in (4, 2)]
    result = inferopt_backend_contract(OrtBackend(intra_op_num_threads=1), model=TwoInTwoOut(),
                                       data=pairs)
    assert set(result.outputs[1]) == {"logits", "norm"}
    assert result.description["intra_op_num_threads"] == 1


def test_run_end_to_end_keeps_the_onnx_files(inferopt_cli, tmp_path):
    out = tmp_path / "run"
    result = inferopt_cli("run", "-m", SPEC, "-d", DATA, "-O", "fuse-bn",
                          "--backend", "ort:intra_op_num_threads=1", "--metric", "fidelity",
                          "--metric", "memory", "--out", str(out))
    assert result.returncode == 0, result.stderr
    for role in ("baseline", "optimized"):
        assert (out / "backend" / role / "model.onnx").stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["artifacts"]["backend"]) == {"baseline", "optimized"}
    assert report["optimized"]["metrics"]["fidelity"]["max_abs_err"] < 1e-4
    assert "memory" in report["skipped_metrics"]  # not measurable on an onnxruntime session
    assert report["environment"]["backend"] == "ort"


def test_quantization_steps_are_refused_and_the_backend_is_blamed(inferopt_cli, tmp_path):
    result = inferopt_cli("run", "-m", "demo:digits-mlp-small", "-O", "int8",
                          "--backend", "ort", "--metric", "size", "--json",
                          "--out", str(tmp_path / "q"))
    assert result.returncode == 0, result.stderr  # the step is skipped, the run goes on
    report = json.loads(result.stdout)
    assert "torch-only quantized kernels" in report["steps"][0]["refused"]
    assert any("backend cannot run it" in f["finding"] for f in report["verdict"]["findings"])


def test_without_refuses_an_int8_model_fails_with_the_exporters_reason(inferopt_tiny_model,
                                                                        inferopt_tiny_data):
    quantized = inferopt.apply(inferopt_tiny_model, "int8")
    ctx = inferopt.PrepareContext(example_inputs=inferopt_tiny_data.eval[0].inputs)
    with pytest.raises(inferopt.UsageError, match=r"torch\.onnx could not export the model"):
        OrtBackend().prepare(quantized, ctx)
