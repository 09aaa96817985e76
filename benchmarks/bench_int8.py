"""int8 on CPU (or CUDA): fp32 vs inferopt int8 (each mode and kernel) vs PyTorch's
``quantize_dynamic`` (and torchao if importable), on the same models and inputs, in one run.

    python benchmarks/bench_int8.py [--device cpu|cuda] [--repeats 30] [--quick]

For each model and variant it prints p50 latency, the speedup over fp32 measured in the same
run (variants are timed interleaved with the baseline, so machine noise hits both), the cosine
similarity of outputs to fp32 (minimum over rows) and the safetensors size ratio.
Targets (issue 3): MLP 1024-4096-1024 at batch 64 >= 4.0x with cosine >= 0.999; transformer
encoder (d 384, 6 layers, seq 128, batch 16) >= 2.0x with cosine >= 0.995; size <= 0.3x;
demo accuracy within 0.5 points (see the tests and `inferopt run`).
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from timing import interleaved_p50

import inferopt
from inferopt._artifacts import weights_bytes

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                               torch.nn.Linear(4096, 1024)).eval()


def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(384, 6, 1536, dropout=0.0, batch_first=True,
                                             activation="gelu", norm_first=False)
    return torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).eval()


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    c = torch.nn.Conv2d
    return torch.nn.Sequential(
        c(3, 64, 3, padding=1), torch.nn.ReLU(), c(64, 128, 3, stride=2, padding=1),
        torch.nn.ReLU(), c(128, 256, 3, stride=2, padding=1), torch.nn.ReLU(),
        c(256, 256, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(256, 10)).eval()


def compare(base: torch.nn.Module, cand: torch.nn.Module, x: torch.Tensor, repeats: int,
            device: str) -> tuple[float, float, float]:
    """(base p50 ms, candidate p50 ms, min row cosine), timed A B A B ..."""
    base_ms, cand_ms = interleaved_p50(lambda: base(x), lambda: cand(x), repeats, device)
    with torch.inference_mode():
        ref, out = base(x), cand(x)
    cos = torch.nn.functional.cosine_similarity(
        out.reshape(-1, out.shape[-1]).float(), ref.reshape(-1, ref.shape[-1]).float()).min()
    return base_ms, cand_ms, float(cos)


def calibration(x: torch.Tensor) -> inferopt.Data:
    g = torch.Generator().manual_seed(1)
    batches = [inferopt.Batch(torch.randn(x.shape, generator=g).to(x.device)) for _ in range(4)]
    return inferopt.Data(eval=batches, calibration=batches)


def saved_and_loaded(m: torch.nn.Module, data: Any) -> Any:
    """Quantize through a real run, save, and rebuild with inferopt.load (no pickle)."""
    import tempfile
    from pathlib import Path

    original = copy.deepcopy(m)
    with tempfile.TemporaryDirectory() as tmp:
        inferopt.run(model=m, data=data, metrics=["size"], out=Path(tmp) / "run")
        return inferopt.load(Path(tmp) / "run", model=original)


def variants(kind: str, device: str) -> list[tuple[str, Callable[[torch.nn.Module, Any], Any]]]:
    out: list[tuple[str, Callable[[torch.nn.Module, Any], Any]]] = []

    def ours(**opts: Any) -> Callable[[torch.nn.Module, Any], Any]:
        return lambda m, d: inferopt.apply(m, "int8", data=d, **opts)

    # the default: mode=auto (static for the CNN: calibration data is given), per-row
    out.append(("inferopt int8 default (mode=auto)", ours()))
    if kind == "mlp" and device == "cpu":  # the run goes through the default cpu backend
        out.append(("inferopt int8 default, saved + loaded", saved_and_loaded))
    if device == "cpu":
        out.append(("inferopt int8 dynamic kernel=onednn", ours(mode="dynamic",
                                                                kernel="onednn")))
        if kind != "cnn":
            out.append(("inferopt int8 dynamic per-tensor", ours(activations="per-tensor")))
    if kind != "cnn":
        out.append(("inferopt int8 dynamic smooth=0.5", ours(mode="dynamic", smooth=0.5)))
        out.append(("inferopt int8 weight-only", ours(mode="weight-only")))
    out.append(("inferopt int8 static", ours(mode="static")))
    if device == "cpu" and kind != "cnn":
        def ao(m: torch.nn.Module, _d: Any) -> Any:
            m = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
            # its quantized Linear breaks TransformerEncoderLayer's fused path (.weight is a
            # method there); route those layers to the ordinary path as inferopt does
            from inferopt.plugins.quantization.int8.modules import disable_transformer_fast_path

            disable_transformer_fast_path(m)
            return m
        out.append(("torch.ao quantize_dynamic", ao))
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        def tao(m: torch.nn.Module, _d: Any) -> Any:
            quantize_(m, Int8DynamicActivationInt8WeightConfig())
            return m
        out.append(("torchao Int8DynamicActivationInt8Weight", tao))
    except Exception:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="MLP only, fewer repeats")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    models: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...]]] = {
        "mlp 1024-4096-1024 b64": (mlp, (64, 1024)),
        "encoder d384 L6 s128 b16": (encoder, (16, 128, 384)),
        "cnn 4xconv3x3 32x32 b32": (cnn, (32, 3, 32, 32)),
    }
    if args.quick:
        models = dict(list(models.items())[:1])
    from inferopt._logging import configure

    configure("console", "error")  # the table is the output
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'model':26} {'variant':42} {'fp32 ms':>8} {'ms':>8} {'speedup':>8} "
          f"{'cosine':>8} {'size':>6}")
    for label, (build, shape) in models.items():
        base = build().to(device)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
        base_size = len(weights_bytes(base))
        data = calibration(x)
        kind = label.split()[0]
        for name, make in variants(kind, device):
            try:
                cand = make(copy.deepcopy(base), data)
                b, c, cos = compare(base, cand, x, args.repeats, device)
            except Exception as exc:
                print(f"{label:26} {name:42} failed: {type(exc).__name__}: {exc}"[:160])
                continue
            try:
                size = f"{len(weights_bytes(cand)) / base_size:.3f}"
            except Exception:
                size = "n/a"
            print(f"{label:26} {name:42} {b:8.3f} {c:8.3f} {b / c:7.2f}x {cos:8.5f} {size:>6}")


if __name__ == "__main__":
    main()
