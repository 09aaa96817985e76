"""The ``openvino`` backend: the model exported to ONNX once (untimed), read by OpenVINO, saved as
OpenVINO IR and compiled for the CPU.

It reads the same export as the ``onnxruntime`` backend, so inferopt's int8 layers arrive as QDQ
graphs, which OpenVINO's low-precision transformations turn into int8 kernels. The IR that ran
is the run's artifact ``backend/<role>/model.xml`` (+ ``model.bin``); the report's environment
counts, per role, the executed layers by runtime precision and the products that ran in int8
(``FullyConnected``/``Convolution`` layers whose runtime precision is ``I8``/``U8``), and says
which inference precision the CPU plugin used: by default OpenVINO computes float layers in
bf16 on CPUs with AVX512-BF16 or AMX; ``precision=f32`` keeps them in fp32.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import attrs

from inferopt import Backend, PrepareContext, UsageError, hookimpl, option
from inferopt.plugins.backends.onnx_export import EXTRAS, GraphIO, export_onnx, missing_modules

#: the CPU plugin's layer types that multiply (an int8 Transpose or Gather only moves data)
COMPUTE_LAYERS = ("FullyConnected", "Convolution", "GroupConvolution", "Deconvolution",
                  "MatMul", "Gemm")


@attrs.frozen
class OvPrepared:
    """What ``prepare`` returns: the compiled model and how inputs and outputs map onto it."""

    compiled: Any
    io: GraphIO
    path: str


@attrs.frozen
class OpenVinoBackend(Backend):
    """OpenVINO on the CPU, running the model exported to ONNX (QDQ for int8 layers) as IR."""

    name = "openvino"
    summary = "OpenVINO (CPU): the model exported to ONNX and saved as IR (extra [openvino])"
    exposes_modules = False  # what runs is a compiled OpenVINO model, not torch modules

    threads: int = option(0, min=0, help="inference threads; 0: OpenVINO's default")
    precision: Literal["auto", "f32", "bf16"] = option(
        "auto", choices=("auto", "f32", "bf16"),
        help="inference precision of float layers: auto keeps OpenVINO's choice (bf16 on CPUs "
             "with AVX512-BF16 or AMX, else f32)")
    hint: Literal["latency", "throughput"] = option(
        "latency", choices=("latency", "throughput"), help="OpenVINO performance hint")
    opset: int = option(21, min=17, max=23, help="ONNX opset of the export OpenVINO reads")

    #: per role: the artifact, the precision used and the executed layers by precision
    facts: dict[str, Any] = attrs.field(factory=dict, init=False, eq=False, repr=False)

    def available(self) -> str | None:
        missing = missing_modules(("openvino", "onnx", "onnxscript"))
        if missing:
            return (f"{', '.join(missing)} not installed: pip install "
                    f"'{EXTRAS['openvino']}'")
        return None

    def prepare(self, model: Any, ctx: PrepareContext) -> OvPrepared:
        import openvino as ov

        if ctx.example_inputs is None:
            raise UsageError("openvino: prepare needs example inputs to export the model")
        model = model.to("cpu").eval()
        with tempfile.TemporaryDirectory(prefix="inferopt-openvino-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            io = export_onnx(model, ctx.example_inputs, onnx_path, opset=self.opset,
                             backend=self.name)
            core = ov.Core()
            ov_model = core.read_model(str(onnx_path))
        folded = fold_constant_transposes(ov_model)
        xml = ctx.artifact_path("model.xml")
        # weights stay as exported: fp16 compression would change what is measured
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        config: dict[str, Any] = {"PERFORMANCE_HINT": self.hint.upper()}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        if self.precision != "auto":
            config["INFERENCE_PRECISION_HINT"] = self.precision
        compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
        layers = runtime_layers(compiled)
        int8 = {kind: n for (kind, prec), n in layers.items()
                if prec in ("I8", "U8") and kind in COMPUTE_LAYERS}
        self.facts[ctx.role] = {
            "artifact": "model.xml",
            "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "int8_layers": dict(sorted(int8.items())),
            "folded_transposes": folded,
            "shared_quantizers": io.shared,
            "layers_by_precision": dict(sorted(
                Counter(prec for (_, prec), n in layers.items() for _ in range(n)).items())),
        }
        prepared = OvPrepared(compiled, io, str(xml))
        self.forward(prepared, ctx.example_inputs)  # warm up: the first run allocates
        ctx.log.info("openvino model compiled", path=str(xml), int8_layers=int8,
                     precision=self.facts[ctx.role]["inference_precision"])
        return prepared

    def forward(self, prepared: OvPrepared, inputs: Any) -> Any:
        import numpy as np

        result = prepared.compiled(prepared.io.feed(inputs))
        # copies: OpenVINO reuses its output buffers on the next call
        return prepared.io.outputs([np.array(result[out]) for out in prepared.compiled.outputs])

    def describe(self) -> dict[str, Any]:
        import openvino as ov

        return {"backend": self.name, "openvino": ov.get_version(), "device": "CPU",
                "threads": self.threads or os.cpu_count(), "precision": self.precision,
                "hint": self.hint, "prepared": dict(self.facts)}


def fold_constant_transposes(ov_model: Any) -> int:
    """Replace each ``Transpose`` of an int8 constant by the transposed constant; return how
    many.

    An int8 layer exports its weight as ``DequantizeLinear(Transpose(int8 weight))``, which
    OpenVINO folds into an int8 product, except where the weight has another reader: a language
    model's head tied to its int8 embedding table (GPT-2's ``lm_head``). That transpose stayed in
    the graph and the head, the largest product of the model, ran in bf16 with its weights
    dequantized (a GPT-2-small decoder at batch 1: 62 ms, 49 ms once folded). Folded, the IR holds
    the transposed copy besides the table."""
    import numpy as np
    import openvino.opset13 as ops

    folded = 0
    for node in ov_model.get_ordered_ops():
        if node.get_type_name() != "Transpose":
            continue
        data, order = (node.input_value(i).get_node() for i in range(2))
        # int8 weights only: a float weight OpenVINO transposes itself in the product (a
        # float tied head would be stored twice), and other element types do not round-trip
        # through numpy (bf16 comes back as f16, int4 packed)
        if (data.get_type_name() == "Constant" and order.get_type_name() == "Constant"
                and data.get_element_type().get_type_name() in ("i8", "u8")):
            value = np.ascontiguousarray(np.transpose(data.get_data(), order.get_data()))
            node.output(0).replace(ops.constant(value).output(0))
            folded += 1
    return folded


def runtime_layers(compiled: Any) -> Counter[tuple[str, str]]:
    """The executed graph's layers counted by (layer type, runtime precision); the CPU plugin
    records both in each node's runtime info."""
    counts: Counter[tuple[str, str]] = Counter()
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else node.get_type_name()
        if kind in ("Input", "Output", "Parameter", "Result", "Const", "Constant", "Reorder"):
            continue  # data movement, not compute
        precision = (info["runtimePrecision"].astype(str).upper() if "runtimePrecision" in info
                     else "?")
        counts[(kind, precision)] += 1
    return counts


@hookimpl
def inferopt_register_backends(register: Any) -> None:
    register(OpenVinoBackend)
