"""The ``onnxruntime`` backend: the model exported to ONNX once (untimed), run by an ONNX Runtime
session on the CPU.

Float models export as they are; inferopt's int8 layers export as QDQ graphs
(QuantizeLinear/DequantizeLinear around each quantized product), which ONNX Runtime fuses into
its int8 kernels (QGemm, QLinearConv, MatMulIntegerToFloat; weight-only layers MatMulNBits).
The graph that ran is the run's artifact ``backend/<role>/model.onnx``; the report's
environment counts, per role, the int8 operators in the graph ONNX Runtime optimized.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import attrs

from inferopt import Backend, PrepareContext, UsageError, hookimpl, option
from inferopt.plugins.backends.onnx_export import (
    EXTRAS,
    INT8_OPS,
    GraphIO,
    export_onnx,
    missing_modules,
    op_counts,
)

LEVELS = ("all", "extended", "basic", "none")


@attrs.frozen
class OrtPrepared:
    """What ``prepare`` returns: the session and how inputs and outputs map onto it."""

    session: Any
    io: GraphIO
    path: str


@attrs.frozen
class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU, running the model exported to ONNX (QDQ for int8 layers)."""

    name = "onnxruntime"
    summary = ("ONNX Runtime (CPU): the model exported to ONNX, int8 layers as QDQ "
               "(extra [onnxruntime])")
    exposes_modules = False  # what runs is an InferenceSession, not torch modules

    threads: int = option(0, min=0, help="intra-op threads; 0: one per core")
    opset: int = option(21, min=17, max=23, help="ONNX opset to export to")
    optimization: Literal["all", "extended", "basic", "none"] = option(
        "all", choices=LEVELS, help="ONNX Runtime graph optimization level (the int8 fusions "
                                    "need 'extended' or 'all')")
    spinning: bool = option(
        False, help="let ONNX Runtime's worker threads spin between ops (faster on an idle "
                    "machine, much slower when other processes share the cores)")

    #: per role: what was exported and which int8 operators ran (reported by describe())
    facts: dict[str, Any] = attrs.field(factory=dict, init=False, eq=False, repr=False)

    def available(self) -> str | None:
        missing = missing_modules(("onnxruntime", "onnx", "onnxscript"))
        if missing:
            return (f"{', '.join(missing)} not installed: pip install "
                    f"'{EXTRAS['onnxruntime']}'")
        return None

    def prepare(self, model: Any, ctx: PrepareContext) -> OrtPrepared:
        import onnx
        import onnxruntime as ort

        if ctx.example_inputs is None:
            raise UsageError("onnxruntime: prepare needs example inputs to export the model")
        model = model.to("cpu").eval()
        path = ctx.artifact_path("model.onnx")
        io = export_onnx(model, ctx.example_inputs, path, opset=self.opset,
                         backend=self.name)
        options = self.session_options()
        # the graph after ONNX Runtime's fusions, to say which products run in int8; written
        # beside the artifact, read and deleted (it is specific to this CPU)
        optimized = path.with_name(".optimized.onnx")
        options.optimized_model_filepath = str(optimized)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ran = op_counts(onnx.load(str(optimized), load_external_data=False))
        optimized.unlink(missing_ok=True)
        for extra in path.parent.glob(".optimized.onnx*"):
            extra.unlink(missing_ok=True)
        exported = op_counts(onnx.load(str(path), load_external_data=False))
        int8 = {k: v for k, v in ran.items() if k in INT8_OPS}
        self.facts[ctx.role] = {"artifact": "model.onnx", "exported_qdq_ops": exported,
                                "int8_ops": int8, "shared_quantizers": io.shared}
        # one per int8 layer's activations: calibrated (QuantizeLinear) or dynamic; and one
        # before each pooling that runs on int8
        quantized = (exported.get("QuantizeLinear", 0) + exported.get("DynamicQuantizeLinear", 0)
                     - io.shared.get("pools", 0))
        products = sum(v for k, v in int8.items() if k != "DynamicQuantizeLinear")
        if products < quantized:
            ctx.warn(f"onnxruntime: {quantized - products} of {quantized} int8 layers of the "
                     f"{ctx.role} model ran in float: ONNX Runtime did not fuse their "
                     "quantize/dequantize pairs into int8 kernels (a SmoothQuant scaling "
                     "between a ReLU and the next layer does that; try int8:smooth=0 here)")
        prepared = OrtPrepared(session, io, str(path))
        self.forward(prepared, ctx.example_inputs)  # warm up: the first run allocates
        ctx.log.info("onnxruntime session ready", path=str(path), int8_ops=int8,
                     inputs=list(io.input_names))
        return prepared

    def session_options(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or (os.cpu_count() or 1)
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if self.spinning else "0")
        options.log_severity_level = 3  # errors only: it warns about every CPU-specific fusion
        options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.optimization]
        return options

    def forward(self, prepared: OrtPrepared, inputs: Any) -> Any:
        return prepared.io.outputs(prepared.session.run(None, prepared.io.feed(inputs)))

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"backend": self.name, "onnxruntime": ort.__version__,
                "provider": "CPUExecutionProvider",
                "threads": self.threads or os.cpu_count(), "spinning": self.spinning,
                "opset": self.opset, "optimization": self.optimization,
                "prepared": dict(self.facts)}


@hookimpl
def inferopt_register_backends(register: Any) -> None:
    register(OnnxRuntimeBackend)
