"""Knowledge distillation on the demo digits: the scenarios of issue 6, several seeds.

    python benchmarks/bench_distill.py [--seeds 3] [--ratio 0.07]

Teacher: demo:digits-mlp (64-1024-1024-10, trained on the full training split). Students:
student=shrink at --ratio (hidden widths x ratio). Accuracy is top-1 on the 359 held-out digits.

1. Full labels: distilled student vs teacher accuracy, and the parameter ratio.
2. Labels for 10% of the training split (the rest marked unlabelled, -100): the distilled
   student (teacher targets on all images + labels where present) vs the same student trained
   on the labelled 10% alone (cross-entropy only, same schedule and early stopping).
3. Latency at batch 64: teacher vs student p50, timed interleaved.
Targets: student <= 1/100 of the teacher's parameters within 1.5 points of the teacher; >= 5
points over labels-only with 10% labels; >= 5x faster at batch 64.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

import inferopt
from inferopt._contract import Batch, Data, SourceContext
from inferopt._logging import configure, get_logger
from inferopt._model_cost import parameter_count
from inferopt.plugins.sources.demo import DemoData, DemoModels


def accuracy(model: Any, data: Data) -> float:
    correct = total = 0
    with torch.inference_mode():
        for b in data.eval:
            correct += int((model(b.inputs).argmax(-1) == b.labels).sum())
            total += len(b.labels)
    return 100.0 * correct / total


def partially_labelled(data: Data, fraction: float, seed: int) -> tuple[Data, Data]:
    """(all training images, labels kept for `fraction` of them; only the labelled ones)."""
    x = torch.cat([b.inputs for b in data.calibration])
    y = torch.cat([b.labels for b in data.calibration])
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    keep = keep[: int(len(y) * fraction)]
    partial = torch.full_like(y, -100)
    partial[keep] = y[keep]
    bs = data.calibration[0].inputs.shape[0]

    def batches(xs: torch.Tensor, ys: torch.Tensor, size: int) -> list[Batch]:
        return [Batch(xs[i:i + size], ys[i:i + size]) for i in range(0, len(ys), size)]

    everything = Data(eval=data.eval, calibration=batches(x, partial, bs))
    labelled = Data(eval=data.eval, calibration=batches(x[keep], y[keep], 16))
    return everything, labelled


def p50_ms(model: Any, x: torch.Tensor, repeats: int = 200) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(10):
            model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.07)
    args = parser.parse_args()
    configure("console", "error")
    sctx = SourceContext(log=get_logger(), batch_size=64)
    teacher = DemoModels().load("demo:digits-mlp", sctx)
    data = DemoData().load("demo:digits", sctx)
    t_acc = accuracy(teacher, data)
    opts = {"ratio": args.ratio}
    student0 = inferopt.apply(copy.deepcopy(teacher), "distill", data=data, epochs=1, **opts)
    ratio = parameter_count(student0) / parameter_count(teacher)
    print(f"teacher: {parameter_count(teacher):,} parameters, top-1 {t_acc:.2f}%")
    print(f"student: shrink ratio {args.ratio}: {parameter_count(student0):,} parameters "
          f"({ratio:.2%} of the teacher)\n")

    full, distilled10, alone10 = [], [], []
    for seed in range(args.seeds):
        s = inferopt.apply(copy.deepcopy(teacher), "distill", data=data, seed=seed, **opts)
        full.append(accuracy(s, data))
        everything, labelled = partially_labelled(data, 0.10, seed)
        s = inferopt.apply(copy.deepcopy(teacher), "distill", data=everything, seed=seed, **opts)
        distilled10.append(accuracy(s, data))
        s = inferopt.apply(copy.deepcopy(teacher), "distill", data=labelled, seed=seed,
                           alpha=0.0, **opts)
        alone10.append(accuracy(s, data))

    def row(label: str, values: list[float]) -> None:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{label:58} {statistics.mean(values):6.2f}% ± {sd:4.2f}  "
              + " ".join(f"{v:.2f}" for v in values))

    print(f"{'scenario (top-1 on held-out digits, mean ± sd over seeds)':58} {'mean':>7}")
    row("teacher", [t_acc])
    row("1. distilled student, full labels", full)
    print(f"   -> gap to teacher: {t_acc - statistics.mean(full):.2f} points "
          f"(target <= 1.5 with <= 1% of the parameters)")
    row("2a. student on the labelled 10% alone (no teacher)", alone10)
    row("2b. distilled student, 10% labels + unlabelled images", distilled10)
    print(f"   -> distillation gain: {statistics.mean(distilled10) - statistics.mean(alone10):.2f}"
          " points (target >= 5)")
    x = torch.randn(64, 64)
    tt, ts = [], []
    for _ in range(5):  # interleaved rounds
        tt.append(p50_ms(teacher, x, 50))
        ts.append(p50_ms(student0, x, 50))
    t_ms, s_ms = statistics.median(tt), statistics.median(ts)
    print(f"\n3. latency at batch 64: teacher {t_ms:.3f} ms, student {s_ms:.3f} ms: "
          f"{t_ms / s_ms:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
