"""int4 (weight-only, group-wise): fp32 vs inferopt int4 for each inference path and method,
in one run.

    python benchmarks/bench_int4.py [--device cpu|cuda] [--repeats 20]

Part 1, speed (MLP 1024-4096-1024, random weights): p50 latency ratio to fp32 at batch
1/16/64/256 (timed interleaved with fp32), cosine similarity to fp32, saved size ratio.
Part 2, calibration (the trained demo classifier `demo:digits-mlp`): output MSE against fp32 on
the held-out digits for round-to-nearest and GPTQ (calibrated on the training split), the MSE
reduction, and top-1 accuracy.
Targets (issue 4): size <= 0.16x at group 128; >= 1.3x at batch 64 and 256, >= 1.0x at batch 1;
GPTQ MSE <= 0.75x RTN on held-out data; demo accuracy within 1.5 points.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from typing import Any

import torch
from timing import interleaved_p50

import inferopt
from inferopt._artifacts import weights_bytes

warnings.filterwarnings("ignore")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                               torch.nn.Linear(4096, 1024)).eval()


def p50_pair(base: Any, cand: Any, x: torch.Tensor, repeats: int, device: str
             ) -> tuple[float, float]:
    return interleaved_p50(lambda: base(x), lambda: cand(x), repeats, device)


def speed(device: str, repeats: int) -> None:
    base = mlp().to(device)
    size0 = len(weights_bytes(base))
    print(f"\nspeed: MLP 1024-4096-1024, {device}, p50 ms and speedup vs fp32 in the same run")
    print(f"{'variant':38} {'size':>6} {'cosine':>8}  " + "  ".join(
        f"{'b' + str(b):>18}" for b in (1, 16, 64, 256)))
    for label, opts in [
        ("int4 rtn g128 path=int8 (W4A8)", {}),
        ("int4 rtn g128 path=dequant", {"path": "dequant"}),
        ("int4 rtn g32 path=int8", {"group_size": 32}),
        ("int3 rtn g128 path=int8", {"bits": 3}),
    ]:
        cand = inferopt.apply(copy.deepcopy(base), "int4", **opts)
        size = len(weights_bytes(cand)) / size0
        x = torch.randn(64, 1024, device=device)
        with torch.inference_mode():
            cos = float(torch.nn.functional.cosine_similarity(cand(x), base(x)).min())
        cells = []
        for batch in (1, 16, 64, 256):
            x = torch.randn(batch, 1024, device=device)
            b, c = p50_pair(base, cand, x, repeats, device)
            cells.append(f"{c:7.3f} ({b / c:5.2f}x)")
        print(f"{label:38} {size:6.3f} {cos:8.5f}  " + "  ".join(f"{s:>18}" for s in cells))


def calibration(device: str) -> None:
    from inferopt._contract import SourceContext
    from inferopt._logging import get_logger
    from inferopt.plugins.sources.demo import DemoData, DemoModels

    sctx = SourceContext(log=get_logger(), batch_size=128)
    data = DemoData().load("demo:digits", sctx)
    base = DemoModels().load("demo:digits-mlp", sctx).to(device)
    x = torch.cat([b.inputs for b in data.eval]).to(device)
    y = torch.cat([b.labels for b in data.eval]).to(device)
    with torch.inference_mode():
        ref = base(x)
        acc0 = float((ref.argmax(-1) == y).float().mean())
    print(f"\ncalibration: demo:digits-mlp (trained), held-out {len(y)} digits, fp32 top-1 "
          f"{acc0 * 100:.2f}%")
    print(f"{'setting':24} {'rtn mse':>10} {'gptq mse':>10} {'gptq/rtn':>9} "
          f"{'rtn top1':>9} {'gptq top1':>10}")
    for bits, group in ((4, 128), (4, 32), (3, 128), (3, 32)):
        mse, acc = {}, {}
        for method in ("rtn", "gptq"):
            cand = inferopt.apply(copy.deepcopy(base), "int4", data=data, bits=bits,
                                  group_size=group, method=method, path="dequant")
            with torch.inference_mode():
                out = cand(x)
            mse[method] = float((out - ref).pow(2).mean())
            acc[method] = float((out.argmax(-1) == y).float().mean())
        print(f"{f'{bits}-bit group {group}':24} {mse['rtn']:10.3e} {mse['gptq']:10.3e} "
              f"{mse['gptq'] / mse['rtn']:8.2f}x {acc['rtn'] * 100:8.2f}% "
              f"{acc['gptq'] * 100:9.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    from inferopt._logging import configure

    configure("console", "error")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    speed(args.device, args.repeats)
    calibration(args.device)


if __name__ == "__main__":
    main()
