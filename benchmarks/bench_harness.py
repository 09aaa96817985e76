"""The measuring harness itself: does inferopt's latency agree with torch.utils.benchmark, what
does it cost per call, and does it call noise noise?

    python benchmarks/bench_harness.py [--repeats 20] [--rounds 5]

1. p50 of an unmodified model: inferopt's ``latency`` metric vs ``torch.utils.benchmark.Timer``
   (median of ``blocked_autorange``), alternated for ``--rounds`` rounds on the same model and
   input; the ratio of the medians over rounds. Target: within 5%.
2. Overhead per call for a ~1 ms model: inferopt's timed call (backend.time around
   backend.forward) against the same calls in a bare loop timed as a whole. Target: under 2%.
3. A/A: the same model against a copy of itself with the interleaved A/B harness, ``--repeats``
   times (quick preset). Target: "no measurable change" in at least 19 of 20.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.utils.benchmark as tb

import inferopt
from inferopt._contract import MetricContext
from inferopt._logging import configure, get_logger
from inferopt.plugins.backends.cpu import CpuBackend
from inferopt.plugins.metrics.latency import LatencyMetric


def model_of_about(ms: float, x: torch.Tensor) -> torch.nn.Module:
    """An MLP whose forward on ``x`` takes about ``ms`` milliseconds here."""
    width = 256
    while True:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(x.shape[1], width), torch.nn.ReLU(),
                                torch.nn.Linear(width, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, 10)).eval()
        with torch.inference_mode():
            for _ in range(5):
                m(x)
            start = time.perf_counter()
            for _ in range(20):
                m(x)
        took = (time.perf_counter() - start) / 20 * 1e3
        if took >= ms or width >= 16384:
            return m
        width = int(width * 1.3)


def ctx() -> MetricContext:
    return MetricContext(log=get_logger(), role="baseline")


def agreement(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> list[str]:
    data = inferopt.Data(eval=[inferopt.Batch(x)])
    backend = CpuBackend()
    ours, theirs = [], []
    timer = tb.Timer("m(x)", globals={"m": model, "x": x},
                     num_threads=torch.get_num_threads())
    for _ in range(rounds):
        with torch.inference_mode():
            ours.append(LatencyMetric().measure(model, backend, data, ctx())["p50_ms"])
            theirs.append(timer.blocked_autorange(min_run_time=0.5).median * 1e3)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"\n1. p50 of an unmodified model, {rounds} alternating rounds:")
    print(f"   inferopt latency p50 {a:.4f} ms; torch.utils.benchmark median {b:.4f} ms; "
          f"ratio {a / b:.3f}")
    print(f"   per round, inferopt: {', '.join(f'{v:.4f}' for v in ours)}")
    print(f"   per round, torch:    {', '.join(f'{v:.4f}' for v in theirs)}")
    return [f"inferopt p50 vs torch.utils.benchmark median: {abs(a / b - 1):.1%} apart "
            f"(target within 5%): {'met' if abs(a / b - 1) <= 0.05 else 'NOT met'}"]


def overhead(model: torch.nn.Module, x: torch.Tensor, calls: int = 2000) -> list[str]:
    backend = CpuBackend()
    with torch.inference_mode():
        for _ in range(50):
            model(x)
        bare, timed = [], []
        for _ in range(5):  # alternate, so that drift hits both
            start = time.perf_counter()
            for _ in range(calls):
                model(x)
            bare.append((time.perf_counter() - start) / calls)
            start = time.perf_counter()
            for _ in range(calls):
                backend.time(lambda: backend.forward(model, x))
            timed.append((time.perf_counter() - start) / calls)
    b, t = statistics.median(bare), statistics.median(timed)
    share = (t - b) / b
    print(f"\n2. overhead per call ({calls} calls x 5 alternating rounds): bare loop "
          f"{b * 1e3:.4f} ms/call, inferopt timed call {t * 1e3:.4f} ms/call, overhead "
          f"{(t - b) * 1e6:.1f} us ({share:.2%})")
    return [f"measurement overhead per call {share:.2%} for a {b * 1e3:.2f} ms model (target "
            f"under 2%): {'met' if share < 0.02 else 'NOT met'}"]


def a_a(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> list[str]:
    data = inferopt.Data(eval=[inferopt.Batch(x)])
    twin = copy.deepcopy(model)
    verdicts = []
    print(f"\n3. A/A: the model against a copy of itself, {repeats} repeats (quick preset):")
    for i in range(repeats):
        _b, _o, cmp = LatencyMetric().measure_pair(model, twin, CpuBackend(), data, ctx())
        verdicts.append(cmp["verdict"])
        print(f"   {i + 1:2d}: speedup {cmp['speedup']:.3f} [{cmp['ci_low']:.3f}, "
              f"{cmp['ci_high']:.3f}] {cmp['verdict']}")
    same = verdicts.count("no measurable change")
    need = -(-19 * repeats // 20)
    return [f"A/A: {same} of {repeats} 'no measurable change' (target >= 19 of 20): "
            f"{'met' if same >= need else 'NOT met'}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    configure(level="warning")
    x = torch.randn(64, 512)
    model = model_of_about(1.0, x)
    print(f"model: MLP {[m.out_features for m in model if isinstance(m, torch.nn.Linear)]}, "
          f"batch 64, {torch.get_num_threads()} threads")
    checks = agreement(model, x, args.rounds) + overhead(model, x) + a_a(model, x, args.repeats)
    print("\ntargets:")
    for line in checks:
        print(" -", line)


if __name__ == "__main__":
    main()
