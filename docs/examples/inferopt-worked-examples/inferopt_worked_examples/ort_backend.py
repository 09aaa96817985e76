"""The ``ort`` backend: export the model to ONNX once (untimed) and run it with ONNX Runtime.

``prepare`` exports with the run's first eval batch, with the batch dimension dynamic (the last
batch may be smaller), saves the file as the run's artifact ``backend/<role>/model.onnx``, builds
an ``onnxruntime.InferenceSession`` on the CPU provider and warms it up. ``forward`` feeds numpy
arrays to the session and hands back torch tensors in the model's own output structure.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import attrs

import inferopt


@attrs.frozen
class OrtSession:
    """What ``prepare`` returns: the session and how to map inputs and outputs onto it."""

    session: Any
    input_names: tuple[str, ...]
    # how the torch model's output was built: "tensor", "tuple" or "dict" (with its keys)
    output_kind: str
    output_keys: tuple[str, ...]
    path: str


@attrs.frozen
class OrtBackend(inferopt.Backend):
    """ONNX Runtime on the CPU: the model exported to ONNX once, then run by a session."""

    name = "ort"
    summary = "ONNX Runtime (CPU provider) running the model exported to ONNX"
    exposes_modules = False  # what runs is an InferenceSession, not torch modules

    intra_op_num_threads: int = inferopt.option(
        0, min=0, help="ONNX Runtime intra-op threads; 0 keeps its default (one per core)")
    opset: int = inferopt.option(18, min=13, max=23, help="ONNX opset to export to")
    exporter: Literal["dynamo", "torchscript"] = inferopt.option(
        "dynamo", help="torch.onnx exporter: dynamo (torch.export based, torch's default) or "
                       "the legacy torchscript one")
    optimization: Literal["all", "extended", "basic", "none"] = inferopt.option(
        "all", help="ONNX Runtime graph optimization level")

    def available(self) -> str | None:
        missing = []
        for module in ("onnxruntime", "onnx") + (("onnxscript",)
                                                 if self.exporter == "dynamo" else ()):
            try:
                __import__(module)
            except ImportError:
                missing.append(module)
        if missing:
            return (f"{' and '.join(missing)} not installed: "
                    "pip install 'inferopt-worked-examples[ort]'")
        return None

    def refuses(self, optimizer: Any) -> str | None:
        if getattr(optimizer, "kind", "") == "quantization":
            return (f"{optimizer.name!r} makes layers that run torch-only quantized kernels "
                    "(FBGEMM/oneDNN packed weights, int4 codes), which torch.onnx cannot "
                    "export; quantize the exported model with onnxruntime.quantization instead")
        return None

    def prepare(self, model: Any, ctx: inferopt.PrepareContext) -> OrtSession:
        import onnxruntime as ort
        import torch

        inputs = ctx.example_inputs
        if inputs is None:
            raise inferopt.UsageError("ort: prepare needs example inputs to export the model")
        model = model.to("cpu").eval()
        with torch.inference_mode():
            reference = _call(model, inputs)
        kind, keys = _output_structure(reference)

        path = ctx.artifact_path("model.onnx")
        args, kwargs = _as_args(inputs)
        # one self-contained file unless the weights pass protobuf's 2 GB limit
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        try:
            with _quiet_exporter():
                self._export(model, args, kwargs, str(path), weight_bytes > 1_500_000_000)
        except Exception as exc:
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
            raise inferopt.UsageError(
                f"ort: torch.onnx could not export the model ({type(exc).__name__}: "
                f"{first[0] if first else ''}); run it on --backend cpu, or try "
                "--backend ort:exporter=torchscript") from exc

        options = ort.SessionOptions()
        if self.intra_op_num_threads:
            options.intra_op_num_threads = self.intra_op_num_threads
        options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.optimization]
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = tuple(i.name for i in session.get_inputs())
        prepared = OrtSession(session, names, kind, keys, str(path))
        n_in = len(kwargs) if kwargs else len(args)
        if len(names) != n_in:
            raise inferopt.UsageError(
                f"ort: the exported graph takes {len(names)} inputs ({', '.join(names)}) but "
                f"the batch has {n_in}; inputs the model ignores or turns into constants "
                "cannot be fed")
        self.forward(prepared, inputs)  # warm up: the first run allocates, untimed
        ctx.log.info("ort session ready", path=str(path), inputs=list(names),
                     providers=session.get_providers())
        return prepared

    def _export(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], path: str,
                external_data: bool) -> None:
        import torch

        if self.exporter == "dynamo":
            # every input's first dimension is the batch: the last batch may be smaller
            dim = torch.export.Dim.DYNAMIC
            shapes: Any = ({k: {0: dim} for k in kwargs} if kwargs
                           else tuple({0: dim} for _ in args))
            torch.onnx.export(model, args, path, kwargs=kwargs or None,
                              dynamic_shapes=shapes, opset_version=self.opset,
                              dynamo=True, verbose=False, external_data=external_data)
        else:
            names = list(kwargs) if kwargs else [f"input_{i}" for i in range(len(args))]
            if kwargs:  # the legacy exporter takes keyword inputs as a trailing dict
                args = (*args, kwargs)
            torch.onnx.export(model, args, path, input_names=names,
                              dynamic_axes={n: {0: "batch"} for n in names},
                              opset_version=self.opset, dynamo=False,
                              external_data=external_data)

    def forward(self, prepared: OrtSession, inputs: Any) -> Any:
        import torch

        args, kwargs = _as_args(inputs)
        values = list(kwargs.values()) if kwargs else list(args)
        feed = {name: value.detach().cpu().numpy() for name, value in
                zip(prepared.input_names, values, strict=True)}
        outputs = [torch.from_numpy(o) for o in prepared.session.run(None, feed)]
        if prepared.output_kind == "tensor":
            return outputs[0]
        if prepared.output_kind == "dict":
            return dict(zip(prepared.output_keys, outputs, strict=True))
        return tuple(outputs)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        return {"backend": self.name, "onnxruntime": ort.__version__,
                "provider": "CPUExecutionProvider",
                "intra_op_num_threads": self.intra_op_num_threads or options.intra_op_num_threads,
                "opset": self.opset, "exporter": self.exporter,
                "optimization": self.optimization}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx logs a line per optional library it lacks (torchvision) and warns about its
    own internals; none of it is the user's business during a run."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _as_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _call(model: Any, inputs: Any) -> Any:
    from inferopt.utils import call_model

    return call_model(model, inputs)


def _output_structure(output: Any) -> tuple[str, tuple[str, ...]]:
    import torch

    if isinstance(output, torch.Tensor):
        return "tensor", ()
    if isinstance(output, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in output):
        return "tuple", ()
    if isinstance(output, dict) and all(isinstance(o, torch.Tensor) for o in output.values()):
        return "dict", tuple(output)
    raise inferopt.UsageError(
        f"ort: the model returns a {type(output).__name__}; this backend hands back a tensor, "
        "a flat tuple or a flat dict of tensors")


@inferopt.hookimpl
def inferopt_register_backends(register: Any) -> None:
    register(OrtBackend)
