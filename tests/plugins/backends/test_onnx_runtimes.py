"""The built-in runtime backends: ``onnxruntime`` and ``openvino`` run float and int8 models
exported to ONNX (int8 layers as QDQ graphs that the runtimes fuse into int8 kernels), and
``inductor`` compiles the torch.export-ed model; each leaves the artifact that ran in the run
directory, and that artifact loads and gives the run's outputs."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch

import inferopt
from inferopt.plugins.backends.inductor import InductorBackend
from inferopt.plugins.backends.onnxruntime import OnnxRuntimeBackend
from inferopt.plugins.backends.openvino import OpenVinoBackend


def _needs(*modules: str) -> pytest.MarkDecorator:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed "
                                                    "(pip install 'inferopt[test]')")


needs_ort = _needs("onnxruntime", "onnx", "onnxscript")
needs_ov = _needs("openvino", "onnx", "onnxscript")


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()


def _quantized(mode: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    batches = [torch.randn(16, 32) for _ in range(4)]
    model = _mlp()
    if mode != "float":
        model = inferopt.apply(copy.deepcopy(model), "int8", data=batches, mode=mode)
    return model, torch.randn(16, 32)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@needs_ort
@pytest.mark.parametrize("mode", ["float", "dynamic", "static"])
def test_onnxruntime_runs_the_model_and_its_int8_layers_in_int8(mode, tmp_path):
    model, x = _quantized(mode)
    backend = OnnxRuntimeBackend()
    ctx = inferopt.PrepareContext(example_inputs=x, role="optimized", artifact_dir=tmp_path)
    prepared = backend.prepare(model, ctx)
    with torch.inference_mode():
        expected = model(x)
    # the last batch may be smaller: the batch dimension stays dynamic
    for inputs, want in ((x, expected), (x[:3], expected[:3])):
        got = backend.forward(prepared, inputs)
        assert got.shape == want.shape
        assert _cosine(got, want) > 0.999
    facts = backend.describe()["prepared"]["optimized"]
    if mode == "float":
        assert facts["int8_ops"] == {} and facts["exported_qdq_ops"] == {}
    elif mode == "static":
        # three Linear layers: three QDQ groups, fused by ONNX Runtime into int8 GEMMs
        assert facts["exported_qdq_ops"]["QuantizeLinear"] == 3
        assert facts["int8_ops"] == {"QGemm": 3}
    else:
        # activations quantized per call: the chain ONNX Runtime's own dynamic quantizer
        # writes, fused with the scaling and the bias into one kernel per layer
        assert facts["exported_qdq_ops"]["MatMulInteger"] == 3
        assert facts["int8_ops"] == {"DynamicQuantizeMatMul": 3}
    # the artifact is what ran: a plain session on it gives the same outputs
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert _cosine(torch.from_numpy(out), backend.forward(prepared, x)) > 0.99999


@needs_ort
@pytest.mark.parametrize("granularity", ["per-channel", "per-tensor"])
def test_dynamic_int8_exports_a_weight_scale_per_column_or_one_for_all(granularity, tmp_path):
    """A per-tensor weight scale exported as one value per column made ONNX Runtime's
    DynamicQuantizeMatMul take its per-column path (about 8% slower on an MLP at batch 1);
    equal column scales now export as a scalar."""
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(1)
    model = inferopt.apply(_mlp(), "int8", data=[torch.randn(16, 32) for _ in range(4)],
                           mode="dynamic", granularity=granularity)
    x = torch.randn(16, 32)
    backend = OnnxRuntimeBackend()
    ctx = inferopt.PrepareContext(example_inputs=x, role="optimized", artifact_dir=tmp_path)
    prepared = backend.prepare(model, ctx)
    with torch.inference_mode():
        assert _cosine(backend.forward(prepared, x), model(x)) > 0.999
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    scales = {n.output[1] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weight_scales = [values[x] for n in graph.node if n.op_type == "Mul"
                     and set(n.input) & scales for x in n.input if x in values]
    assert len(weight_scales) == 3
    assert all(v.ndim == (0 if granularity == "per-tensor" else 1) for v in weight_scales)


@needs_ov
@pytest.mark.parametrize("mode", ["float", "static"])
def test_openvino_runs_the_ir_and_its_int8_layers_in_int8(mode, tmp_path):
    model, x = _quantized(mode)
    backend = OpenVinoBackend(precision="f32")
    ctx = inferopt.PrepareContext(example_inputs=x, role="optimized", artifact_dir=tmp_path)
    prepared = backend.prepare(model, ctx)
    with torch.inference_mode():
        expected = model(x)
    for inputs, want in ((x, expected), (x[:3], expected[:3])):
        got = backend.forward(prepared, inputs)
        assert got.shape == want.shape
        assert _cosine(got, want) > 0.999
    facts = backend.describe()["prepared"]["optimized"]
    assert facts["inference_precision"] == "f32"
    int8_fc = facts["int8_layers"].get("FullyConnected", 0)
    assert int8_fc == (0 if mode == "float" else 3)
    # the IR is what ran: OpenVINO reads it back and gives the same outputs
    import openvino as ov

    compiled = ov.Core().compile_model(str(tmp_path / "model.xml"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    out = torch.from_numpy(compiled(x.numpy())[compiled.outputs[0]])
    assert _cosine(out, backend.forward(prepared, x)) > 0.99999
    assert (tmp_path / "model.bin").stat().st_size > 0


class _TiedLM(torch.nn.Module):
    """A language model in miniature: an embedding table and a head that shares its weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = torch.nn.Embedding(512, 32)  # above the exporter's own folding limit
        self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                       torch.nn.Linear(64, 32))
        self.head = torch.nn.Linear(32, 512, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids)
        return self.head(h + self.mlp(h))


@needs_ov
def test_openvino_runs_a_head_tied_to_its_int8_table_in_int8(tmp_path):
    """The tied head reads the table's int8 rows transposed; OpenVINO left that transpose in the
    graph (the table's Gather reads the same weight) and ran the head in float."""
    torch.manual_seed(1)
    batches = [inferopt.Batch(torch.randint(0, 512, (4, 16))) for _ in range(4)]
    model = inferopt.apply(_TiedLM().eval(), "int8", mode="static",
                           data=inferopt.Data(eval=batches, calibration=batches))
    assert model.head.weight_int8 is model.wte.weight_int8  # the tie holds
    backend = OpenVinoBackend(precision="f32")
    x = batches[0].inputs
    ctx = inferopt.PrepareContext(example_inputs=x, role="optimized", artifact_dir=tmp_path)
    prepared = backend.prepare(model, ctx)
    facts = backend.describe()["prepared"]["optimized"]
    assert facts["int8_layers"].get("FullyConnected", 0) == 3  # the two MLP layers and the head
    assert facts["folded_transposes"] >= 1
    with torch.inference_mode():
        assert _cosine(backend.forward(prepared, x), model(x)) > 0.999


class _ResidualNet(torch.nn.Module):
    """A ResNet in miniature: a stem convolution, ReLU and max pooling, one residual block
    (its input read by the first convolution and by the sum), a pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem, self.pool = conv(3, 16, 3, padding=1), torch.nn.MaxPool2d(3, 2, 1)
        self.conv1, self.conv2 = conv(16, 16, 3, padding=1), conv(16, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


@needs_ort
@needs_ov
@pytest.mark.parametrize("backend_class", [OnnxRuntimeBackend, OpenVinoBackend])
def test_a_cnn_feature_map_is_quantized_once_for_its_convolution_sum_and_pooling(
        backend_class, tmp_path):
    """Each int8 convolution quantizes its own input; the residual sum read the same tensor in
    float and the max pooling ran before the quantizer, so OpenVINO kept float copies of the
    feature maps (Reorders, standalone FakeQuantizes, a float MaxPool: ResNet-18 at batch 1 ran
    0.85x NNCF's speed on an AMX CPU). The export now lets the sum read the int8 tensor and
    pools after a quantizer, as NNCF places them."""
    import onnx

    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(4)]
    model = inferopt.apply(_ResidualNet().eval(), "int8", mode="static", data=batches)
    x = torch.randn(4, 3, 32, 32)
    backend = backend_class()
    ctx = inferopt.PrepareContext(example_inputs=x, role="optimized", artifact_dir=tmp_path)
    prepared = backend.prepare(model, ctx)
    assert backend.describe()["prepared"]["optimized"]["shared_quantizers"] == {
        "residual_adds": 1, "pools": 1}
    with torch.inference_mode():
        assert _cosine(backend.forward(prepared, x), model(x)) > 0.999
    if backend_class is OnnxRuntimeBackend:
        graph = onnx.load(str(tmp_path / "model.onnx")).graph
        producer = {o: n.op_type for n in graph.node for o in n.output}
        # activations dequantized (not the int32 biases, also DequantizeLinear outputs)
        int8_maps = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"
                     and producer.get(n.input[0]) == "QuantizeLinear"}
        pools = [n for n in graph.node if n.op_type == "MaxPool"]
        sums = [n for n in graph.node if n.op_type == "Add" and set(n.input) & int8_maps]
        assert pools[0].input[0] in int8_maps and len(sums) == 1
    else:
        import openvino as ov

        compiled = ov.Core().compile_model(str(tmp_path / "model.xml"), "CPU")
        pool = next(n for n in compiled.get_runtime_model().get_ordered_ops()
                    if "layerType" in n.get_rt_info()
                    and n.get_rt_info()["layerType"].astype(str) == "Pooling")
        assert pool.get_rt_info()["runtimePrecision"].astype(str).upper() in ("U8", "I8")


class _Pools(torch.nn.Module):
    """Max poolings the quantizer must not move before: two reading one tensor (``twice``), a
    pooled map the model also returns (``returned``), a pooling with indices (``indices``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.conv2 = (torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))
        self.pool1 = torch.nn.MaxPool2d(2, return_indices=kind == "indices")
        self.pool2 = torch.nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.stem(x))
        if self.kind == "twice":
            return self.conv1(self.pool1(h)) + self.conv2(self.pool2(h))
        if self.kind == "indices":
            pooled, indices = self.pool1(h)
            return self.conv1(pooled), indices
        return self.pool1(h), self.conv1(self.pool1(h))


@needs_ort
@pytest.mark.parametrize("kind", ["twice", "returned", "indices"])
def test_moving_a_quantizer_before_a_pooling_keeps_the_graph_valid_and_its_outputs(kind,
                                                                                 tmp_path):
    """Two poolings of one tensor got quantizers with the same names (an invalid graph), and a
    pooled map the model returns, or pooled with its indices, was quantized too (review
    findings)."""
    torch.manual_seed(0)
    model = inferopt.apply(_Pools(kind).eval(), "int8", mode="static",
                           data=[torch.randn(2, 3, 16, 16) for _ in range(4)])
    x = torch.randn(2, 3, 16, 16)
    backend = OnnxRuntimeBackend()
    ctx = inferopt.PrepareContext(example_inputs=x, role="optimized", artifact_dir=tmp_path)
    prepared = backend.prepare(model, ctx)
    assert backend.describe()["prepared"]["optimized"]["shared_quantizers"]["pools"] == (
        2 if kind == "twice" else 0)
    with torch.inference_mode():
        want = model(x)
    got = backend.forward(prepared, x)
    for g, w in zip(*((t,) if isinstance(t, torch.Tensor) else t for t in (got, want)),
                    strict=True):
        if w.dtype == torch.int64:  # the indices: exactly the same
            assert torch.equal(g, w)
        else:
            assert _cosine(g, w) > 0.999 and float((g - w).abs().max()) < 0.02


def test_equal_weight_scales_stored_as_external_data_become_a_scalar(tmp_path):
    """A model past 1.5 GB exports its tensors as external data, which the scale pass read
    against the working directory and failed on (review finding)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from inferopt.plugins.backends.onnx_export import scalar_weight_scales

    scale = numpy_helper.from_array(np.full(64, 0.5, dtype=np.float32), "weight_scale")
    weight = numpy_helper.from_array(np.ones((16, 64), dtype=np.int8), "weight")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("MatMulInteger", ["q", "weight", "z"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["s", "weight_scale"], ["ws"]),
             helper.make_node("Mul", ["accf", "ws"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 16])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [2, 64])], [scale, weight])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    loaded = onnx.load(str(path), load_external_data=False)
    assert scalar_weight_scales(loaded.graph, tmp_path)
    value = next(i for i in loaded.graph.initializer if i.name == "weight_scale")
    assert numpy_helper.to_array(value).shape == () and float(numpy_helper.to_array(value)) == 0.5


@needs_ort
@needs_ov
@pytest.mark.parametrize(("backend_class", "bits"), [(OnnxRuntimeBackend, 4),
                                                     (OnnxRuntimeBackend, 3),
                                                     (OpenVinoBackend, 4)])
def test_int4_models_run_on_the_runtimes_in_float(backend_class, bits, tmp_path):
    """int4 layers export their packed codes, unpacked by graph ops: the runtimes fold them
    into float weights, and the report shows no int8 operator."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 16)).eval()
    model = inferopt.apply(model, "int4", group_size=32, bits=bits)
    x = torch.randn(8, 128)
    backend = (backend_class(precision="f32") if backend_class is OpenVinoBackend
               else backend_class())
    prepared = backend.prepare(model, inferopt.PrepareContext(example_inputs=x,
                                                              artifact_dir=tmp_path))
    with torch.inference_mode():
        assert _cosine(backend.forward(prepared, x), model(x)) > 0.999
    facts = backend.describe()["prepared"]["baseline"]
    assert not facts.get("int8_ops") and not facts.get("int8_layers")


class _Attention(torch.nn.Module):
    """``scaled_dot_product_attention`` with each kind of mask models pass it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if self.kind == "padding":  # a boolean mask over the keys, as BERT-class encoders give
            return sdpa(q, k, v, attn_mask=keep[:, None, None, :] > 0)
        if self.kind == "additive":
            return sdpa(q, k, v, attn_mask=(keep[:, None, None, :] - 1) * 1e4, scale=0.3)
        if self.kind == "causal":
            return sdpa(q, k, v, is_causal=True)
        if self.kind == "grouped":  # grouped-query: 2 kv heads for 4 query heads
            return sdpa(q, k[:, :2], v[:, :2], enable_gqa=True)
        # 3-D (heads, L, E), grouped, causal with fewer queries than keys
        return sdpa(q[0, :, :4], k[0, :2], v[0, :2], enable_gqa=True, is_causal=True)


@needs_ort
@pytest.mark.parametrize("kind", ["padding", "additive", "causal", "grouped", "grouped-3d"])
def test_attention_exports_as_the_chain_the_runtimes_fuse(kind, tmp_path):
    """MatMul, Softmax, MatMul and nothing between them but the scale and the mask (no
    IsNaN/Where after the Softmax, which kept OpenVINO from fusing attention), with PyTorch's
    results."""
    import onnx
    import onnxruntime as ort

    from inferopt.plugins.backends.onnx_export import export_onnx

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 6, 8) for _ in range(3))
    keep = torch.ones(3, 6)
    keep[0, 4:] = 0  # a padded sequence
    model = _Attention(kind).eval()
    path = tmp_path / "attention.onnx"
    export_onnx(model, (q, k, v, keep), path, opset=21, backend="onnxruntime")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Softmax") == 1 and ops.count("MatMul") == 2
    assert "IsNaN" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (3, 1):  # the batch dimension stays dynamic
        feed = {i.name: t[:batch].numpy() for i, t in zip(session.get_inputs(), (q, k, v, keep),
                                                           strict=True)}
        (out,) = session.run(None, feed)
        want = model(q[:batch], k[:batch], v[:batch], keep[:batch])
        torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-4, atol=1e-5)


def test_a_missing_runtime_names_the_extra_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnxruntime", "openvino")
                        else real(name, *a))
    assert OnnxRuntimeBackend().available() == (
        "onnxruntime not installed: pip install 'inferopt[onnxruntime]'")
    assert OpenVinoBackend().available() == (
        "openvino not installed: pip install 'inferopt[openvino]'")


def test_a_missing_runtime_is_listed_and_refused_with_the_extra(cli, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    listed = cli("plugins")
    assert listed.returncode == 0
    for name in ("onnxruntime", "openvino", "inductor"):
        assert name in listed.stdout
    result = cli("run", "--backend", "openvino")
    assert result.returncode == 2
    assert "openvino not installed: pip install 'inferopt[openvino]'" in result.stderr


@needs_ort
def test_onnxruntime_run_keeps_the_graph_that_ran(cli, tmp_path):
    """int8 on the demo: the optimized model.onnx is a QDQ graph, loads in ONNX Runtime and
    gives the saved model's outputs; module-reading metrics are skipped. The default (dynamic)
    runs every layer as one DynamicQuantizeMatMul. Static layers without smoothing run as
    QGemm; a SmoothQuant scaling after a ReLU keeps ONNX Runtime from fusing the static layer
    before it, and the run says so."""
    default = cli("run", "--backend", "onnxruntime", "--metric", "fidelity", "--json")
    assert default.returncode == 0, default.stderr
    assert "ran in float" not in default.stderr
    facts = json.loads(default.stdout)["environment"]["prepared"]["optimized"]
    assert facts["int8_ops"] == {"DynamicQuantizeMatMul": 3}
    static = cli("run", "--backend", "onnxruntime", "-O", "int8:mode=static", "--metric",
                 "fidelity", "--json")
    assert "int8 layers of the optimized model ran in float" in static.stderr
    result = cli("run", "--backend", "onnxruntime", "-O", "int8:mode=static,smooth=0", "--metric",
                 "fidelity", "--metric", "latency:min_runs=3,min_seconds=0,warmup=1", "--metric",
                 "memory", "--metric", "compute", "--out", "run", "--json")
    assert result.returncode == 0, result.stderr
    assert "ran in float" not in result.stderr
    report = json.loads(result.stdout)
    assert report["optimized"]["metrics"]["fidelity"]["cosine"] > 0.999
    for name in ("memory", "compute"):
        assert "onnxruntime" in report["skipped_metrics"][name]
    facts = report["environment"]["prepared"]
    assert facts["baseline"]["int8_ops"] == {}
    assert facts["optimized"]["int8_ops"].get("QGemm", 0) >= 3
    onnx_path = tmp_path / report["artifacts"]["backend"]["optimized"]["model.onnx"]
    assert onnx_path == tmp_path / "run" / "backend" / "optimized" / "model.onnx"

    import onnxruntime as ort

    model = inferopt.load(tmp_path / "run")
    x = torch.rand(5, 64)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.inference_mode():
        assert _cosine(torch.from_numpy(out), model(x)) > 0.999


@pytest.mark.slow
@needs_ov
def test_openvino_run_keeps_the_ir_that_ran(cli, tmp_path):
    result = cli("run", "--backend", "openvino:precision=f32", "--metric", "fidelity",
                 "--metric", "latency:min_runs=3,min_seconds=0,warmup=1", "--out", "run",
                 "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["optimized"]["metrics"]["fidelity"]["cosine"] > 0.999
    assert report["environment"]["prepared"]["optimized"]["int8_layers"]["FullyConnected"] >= 3
    xml = tmp_path / report["artifacts"]["backend"]["optimized"]["model.xml"]
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = torch.rand(5, 64)
    model = inferopt.load(tmp_path / "run")
    with torch.inference_mode():
        assert _cosine(torch.from_numpy(compiled(x.numpy())[compiled.outputs[0]]),
                       model(x)) > 0.999


@pytest.mark.slow
def test_inductor_run_keeps_the_exported_program(cli, tmp_path):
    result = cli("run", "--backend", "inductor", "--metric", "fidelity",
                 "--metric", "latency:min_runs=3,min_seconds=0,warmup=1", "--metric", "compute",
                 "--out", "run", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["optimized"]["metrics"]["fidelity"]["cosine"] > 0.999
    assert "inductor" in report["skipped_metrics"]["compute"]
    facts = report["environment"]["prepared"]["optimized"]
    assert facts["export"] == "ok" and facts["freezing"] is True
    pt2 = tmp_path / report["artifacts"]["backend"]["optimized"]["model.pt2"]
    program = torch.export.load(str(pt2))
    x = torch.rand(5, 64)
    model = inferopt.load(tmp_path / "run")
    with torch.inference_mode():
        assert _cosine(program.module()(x), model(x)) > 0.999


def test_inductor_compiles_an_int8_model_with_a_dynamic_batch(tmp_path):
    model, x = _quantized("dynamic")
    backend = InductorBackend()
    ctx = inferopt.PrepareContext(example_inputs=x, role="optimized", artifact_dir=tmp_path)
    prepared = backend.prepare(model, ctx)
    with torch.inference_mode():
        expected = model(x)
    for inputs, want in ((x, expected), (x[:3], expected[:3])):
        assert _cosine(backend.forward(prepared, inputs), want) > 0.999
    assert (tmp_path / "model.pt2").stat().st_size > 0
    assert backend.describe()["prepared"]["optimized"]["export"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_an_int8_hf_encoder_runs_on_the_runtime_and_its_artifact_loads(cli, tmp_path, backend):
    transformers = pytest.importorskip("transformers")
    from tests.plugins.sources.test_hf import WORDS

    if (needs_ort if backend == "onnxruntime" else needs_ov).args[0]:
        pytest.skip(f"{backend} not installed")
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                 *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9))
                              for i in range(24)) + "\n")
    spec = backend if backend == "onnxruntime" else f"{backend}:precision=f32"
    result = cli("run", "--model", f"hf:{folder}", "--data", f"text:{text}", "--batch-size", "8",
                 "--backend", spec, "--metric", "fidelity",
                 "--metric", "latency:min_runs=3,min_seconds=0,warmup=1", "--out", "run",
                 "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["optimized"]["metrics"]["fidelity"]["cosine"] > 0.99
    facts = report["environment"]["prepared"]["optimized"]
    listed = report["artifacts"]["backend"]["optimized"]
    # the export fixed the sequence length the run's text batches were padded to
    import onnx

    onnx_path = tmp_path / "run" / "backend" / "optimized" / "model.onnx"
    length = (onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim[1].dim_value
              if backend == "onnxruntime" else None)
    if backend == "openvino":
        import openvino as ov

        length = ov.Core().read_model(str(tmp_path / listed["model.xml"])).inputs[0] \
            .get_partial_shape()[1].get_length()
    batch = dict(tokenizer(["the cat sat on the mat", "a dog ran"], padding="max_length",
                           max_length=length, return_tensors="pt"))
    loaded = inferopt.load(tmp_path / "run")
    with torch.inference_mode():
        expected = loaded(**batch).last_hidden_state
    if backend == "onnxruntime":
        # 12 encoder matmuls and the pooler ran as int8 kernels; the per-tensor layers have
        # their activations quantized once per input (per-row layers export weight-only):
        # inside a DynamicQuantizeMatMul, or where query, key and value share one input and
        # its smoothing, by one DynamicQuantizeLinear the three read (ONNX Runtime merges the
        # identical nodes)
        ops = facts["int8_ops"]
        products = {k: v for k, v in ops.items() if k != "DynamicQuantizeLinear"}
        assert sum(products.values()) == 13
        inputs = {id(m.__dict__.get("_shared", m)) for m in loaded.modules()
                  if getattr(m, "activations", None) == "per-tensor"}
        quantized = ops.get("DynamicQuantizeLinear", 0) + ops.get("DynamicQuantizeMatMul", 0)
        assert quantized == len(inputs) > 0
        import onnxruntime as ort

        session = ort.InferenceSession(str(tmp_path / listed["model.onnx"]),
                                       providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        out = session.run(None, {n: batch[n].numpy() for n in names})[0]
    else:
        assert facts["int8_layers"]["FullyConnected"] == 13
        import openvino as ov

        compiled = ov.Core().compile_model(str(tmp_path / listed["model.xml"]), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "f32"})
        feed = {i.get_any_name(): batch[i.get_any_name()].numpy() for i in compiled.inputs}
        out = compiled(feed)[compiled.outputs[0]]
    assert _cosine(torch.from_numpy(out), expected) > 0.99


def test_inductor_lowers_static_int8_layers_to_int8_kernels(tmp_path):
    """Static int8 Linear and Conv2d layers are rewritten into the PT2E form and Inductor's x86
    lowering (with freezing) turns them into oneDNN int8 kernels; outputs stay the model's."""
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)).eval()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    model = inferopt.apply(cnn, "int8", data=batches, mode="static")
    x = torch.randn(4, 3, 8, 8)
    backend = InductorBackend()
    prepared = backend.prepare(model, inferopt.PrepareContext(example_inputs=x,
                                                              artifact_dir=tmp_path))
    with torch.inference_mode():
        assert _cosine(backend.forward(prepared, x), model(x)) > 0.999
    facts = backend.describe()["prepared"]["baseline"]
    assert facts["pt2e_groups"] == 2
    lowered = facts["int8_lowerings"]
    assert lowered.get("qlinear_unary_lower_count", 0) >= 1
    assert any(k.startswith("qconv") for k in lowered)
