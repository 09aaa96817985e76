"""inferopt's models on each runtime backend: fp32 and int8 (dynamic, static) on eager CPU,
Inductor, ONNX Runtime and OpenVINO, prepared and run through the backends' own ``prepare`` and
``forward`` (what ``inferopt run --backend NAME`` measures).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_runtimes.py [--repeats 20]
        [--models mlp,encoder]
        [--backends cpu,inductor,onnxruntime,openvino,openvino-f32]

Models: an MLP 1024-4096-1024 at batch 64 and a transformer encoder (d 384, 6 layers, 6 heads,
ffn 1536, seq 128) at batch 1. Every row is timed interleaved with eager fp32 on the CPU (A B A
B ..., medians), so the speedup column is against the same reference for every backend and
machine noise hits both; cosine is the minimum over output rows against eager fp32. The last
column says what ran in int8 (the backend's own report: ONNX Runtime's fused operators,
OpenVINO's executed layers in i8/u8, Inductor's int8 lowerings).
"""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from typing import Any

import torch
from timing import interleaved_p50

import inferopt
from inferopt.utils import cpu_flags

warnings.filterwarnings("ignore")


def mlp() -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                torch.nn.Linear(4096, 1024)).eval()
    return model, torch.randn(64, 1024), [torch.randn(64, 1024) for _ in range(8)]


def encoder() -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(384, 6, 1536, dropout=0.0, batch_first=True,
                                             norm_first=False)
    model = torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).eval()
    return model, torch.randn(1, 128, 384), [torch.randn(1, 128, 384) for _ in range(8)]


MODELS = {"mlp": mlp, "encoder": encoder}


def backend_for(name: str) -> Any:
    from inferopt.plugins.backends.cpu import CpuBackend
    from inferopt.plugins.backends.inductor import InductorBackend
    from inferopt.plugins.backends.onnxruntime import OnnxRuntimeBackend
    from inferopt.plugins.backends.openvino import OpenVinoBackend

    return {"cpu": CpuBackend, "inductor": InductorBackend,
            "onnxruntime": OnnxRuntimeBackend, "openvino": OpenVinoBackend,
            "openvino-f32": lambda: OpenVinoBackend(precision="f32")}[name]()


def min_row_cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    a = out.reshape(-1, out.shape[-1]).float()
    b = ref.reshape(-1, ref.shape[-1]).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def int8_summary(backend: Any, variant: str) -> str:
    if backend.name == "cpu":
        return "-" if variant == "fp32" else "eager int8 kernels (FBGEMM / oneDNN)"
    facts = backend.describe().get("prepared", {}).get("optimized", {})
    found = (facts.get("int8_ops") or facts.get("int8_layers") or facts.get("int8_lowerings")
             or {})
    extra = facts.get("inference_precision")
    text = " ".join(f"{k}x{v}" for k, v in found.items()) or "-"
    return f"{text} ({extra})" if extra else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", default="mlp,encoder")
    parser.add_argument("--backends", default="cpu,inductor,onnxruntime,openvino,openvino-f32")
    args = parser.parse_args()

    flags = cpu_flags()
    isa = sorted(f for f in flags if f.startswith(("avx512", "avx2", "amx", "avx_vnni")))
    print(f"cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("CPU flags:", " ".join(isa))
    print(f"{'model':8} {'backend':13} {'variant':8} {'ms p50':>8} {'eager fp32':>10} "
          f"{'speedup':>8} {'cosine':>8}  int8 in the run")
    for model_name in args.models.split(","):
        model, x, calibration = MODELS[model_name]()
        with torch.inference_mode():
            reference = model(x)
        variants = {"fp32": model}
        for mode in ("dynamic", "static"):
            variants[f"int8-{mode[:3]}"] = inferopt.apply(copy.deepcopy(model), "int8",
                                                         data=calibration, mode=mode)

        def eager_fp32(model: torch.nn.Module = model, x: torch.Tensor = x) -> Any:
            return model(x)

        for backend_name in args.backends.split(","):
            for variant, candidate in variants.items():
                backend = backend_for(backend_name)
                reason = backend.available()
                if reason:
                    print(f"{model_name:8} {backend_name:13} {variant:8} skipped: {reason}")
                    break
                ctx = inferopt.PrepareContext(example_inputs=x, role="optimized")
                try:
                    prepared = backend.prepare(copy.deepcopy(candidate), ctx)
                except Exception as exc:
                    print(f"{model_name:8} {backend_name:13} {variant:8} failed: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}")
                    continue

                def run(backend: Any = backend, prepared: Any = prepared,
                        x: torch.Tensor = x) -> Any:
                    return backend.forward(prepared, x)

                base_ms, ms = interleaved_p50(eager_fp32, run, args.repeats)
                cosine = min_row_cosine(run(), reference)
                print(f"{model_name:8} {backend_name:13} {variant:8} {ms:8.2f} {base_ms:10.2f} "
                      f"{base_ms / ms:7.2f}x {cosine:8.5f}  {int8_summary(backend, variant)}",
                      flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
