"""Throughput of the backends on one model, in one run: cpu (1 thread and N threads),
data-parallel over N torchrun processes, model-parallel as a pipeline with micro-batches over N
processes, and the naive sequential stage split (the same stages, one micro-batch, so one stage
works at a time), plus the in-process stage split over N CPU "devices" with and without
micro-batches. Scaling efficiency is throughput / (N x one process with one thread).

    python benchmarks/bench_backends.py [--procs 2] [--batches 32] [--batch-size 64] [--runs 3]
    python benchmarks/bench_backends.py --rows pipeline --batch-size 256 --width 2048 --runs 5
    python benchmarks/bench_backends.py --device cuda     (CUDA-event timing vs
                                                           torch.utils.benchmark, CUDA graphs)

The distributed rows start this script again under ``python -m torch.distributed.run`` (gloo,
one intra-op thread per process); rank 0 writes its measurement to a file this run reads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from inferopt._contract import Batch, PrepareContext


def build_model(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


def build_batches(count: int, size: int, width: int) -> list[Batch]:
    torch.manual_seed(1)
    return [Batch(torch.randn(size, width)) for _ in range(count)]


def timed_passes(run_pass: Any, barrier: Any, repeats: int) -> float:
    """Seconds for ``repeats`` passes after one untimed pass; workers lined up on both ends."""
    with torch.inference_mode():
        run_pass()
        barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            run_pass()
        barrier()
        return time.perf_counter() - start


def single_process(backend: Any, batches: list[Batch], repeats: int) -> float:
    prepared = backend.prepare(build_model(ARGS.width, ARGS.depth), PrepareContext())
    inputs = [backend.to_device(b.inputs) for b in batches]

    def run_pass() -> None:
        for x in inputs:
            backend.forward(prepared, x)
        backend.synchronize()

    seconds = timed_passes(run_pass, lambda: None, repeats)
    return sum(b.size for b in batches) * repeats / seconds


def worker(mode: str, out: Path) -> None:
    """One torchrun process: ``dp``, ``mp`` (micro-batches) or ``mp-naive`` (one)."""
    from inferopt.plugins.backends.data_parallel import DataParallelBackend
    from inferopt.plugins.backends.model_parallel import ModelParallelBackend

    torch.set_num_threads(1)
    batches = build_batches(ARGS.batches, ARGS.batch_size, ARGS.width)
    backend: Any
    if mode == "dp":
        backend = DataParallelBackend(threads=1)
    else:
        backend = ModelParallelBackend(microbatches=ARGS.microbatches if mode == "mp" else 1)
    prepared = backend.prepare(build_model(ARGS.width, ARGS.depth), PrepareContext())
    share = backend.shard_indices(len(batches))

    def run_pass() -> None:
        for i in share:
            backend.forward(prepared, batches[i].inputs)

    seconds = timed_passes(run_pass, lambda: backend.gather(None), ARGS.repeats)
    if backend.is_main:
        samples = sum(b.size for b in batches) * ARGS.repeats
        out.write_text(json.dumps({"samples_per_s": samples / seconds,
                                   "threads": torch.get_num_threads()}))


def distributed(mode: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(ARGS.procs), __file__, "--worker", mode,
               "--result", str(out), *sys.argv[1:]]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} workers failed:\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
        if result["threads"] != 1:  # the comparison assumes N processes x 1 thread on N cores
            raise SystemExit(f"{mode} workers ran {result['threads']} intra-op threads, not 1")
        return float(result["samples_per_s"])


def cpu_table() -> None:
    from inferopt.plugins.backends.cpu import CpuBackend
    from inferopt.plugins.backends.model_parallel import ModelParallelBackend

    n = ARGS.procs
    batches = build_batches(ARGS.batches, ARGS.batch_size, ARGS.width)
    devices = ("cpu",) * n

    def in_process(microbatches: int) -> float:
        torch.set_num_threads(1)  # the stage threads share this one intra-op thread each
        return single_process(ModelParallelBackend(devices=devices, microbatches=microbatches),
                              batches, ARGS.repeats)

    pipeline = f"model-parallel pipeline, {n} stages x {ARGS.microbatches} micro-batches (torchrun)"
    naive = f"naive sequential split, {n} stages, 1 micro-batch (torchrun)"
    measure: dict[str, Any] = {
        "cpu, 1 thread": lambda: single_process(CpuBackend(threads=1), batches, ARGS.repeats)}
    if ARGS.rows == "all":
        measure[f"cpu, {n} threads"] = lambda: single_process(CpuBackend(threads=n), batches,
                                                              ARGS.repeats)
        measure[f"data-parallel, {n} processes (torchrun, gloo)"] = lambda: distributed("dp")
    measure[pipeline] = lambda: distributed("mp")
    measure[naive] = lambda: distributed("mp-naive")
    if ARGS.rows == "all":
        measure[f"in-process split, {n} stage threads x {ARGS.microbatches} micro-batches"] = (
            lambda: in_process(ARGS.microbatches))
        measure[f"in-process split, {n} stages, 1 micro-batch (device-map style)"] = (
            lambda: in_process(1))

    # rounds: every row once per round, so that a change in the machine's load (it is shared)
    # falls on all rows alike rather than on whichever row ran at that moment
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {name: [] for name in measure}
    for _ in range(ARGS.runs):
        for name, run in measure.items():
            rates[name].append(run())
    load_after = os.getloadavg()

    one = statistics.median(rates["cpu, 1 thread"])
    print(f"model: {ARGS.depth} x Linear({ARGS.width}, {ARGS.width}) + ReLU, "
          f"{ARGS.batches} batches of {ARGS.batch_size} "
          f"(micro-batches of {ARGS.batch_size // ARGS.microbatches} rows), "
          f"{ARGS.repeats} timed passes; {ARGS.runs} rounds; {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}; torchrun processes: 1 intra-op thread each; "
          f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"| backend | samples/s (median) | min-max | vs cpu 1 thread | "
          f"scaling efficiency (/{n}) |")
    print("|---|---:|---:|---:|---:|")
    for name, values in rates.items():
        rate = statistics.median(values)
        speedup = rate / one
        print(f"| {name} | {rate:,.0f} | {min(values):,.0f}-{max(values):,.0f} | "
              f"x{speedup:.2f} | {speedup / n:.0%} |")
    # paired by round: the two rows ran next to each other
    ratios = sorted(p / q for p, q in zip(rates[pipeline], rates[naive], strict=True))
    print(f"pipeline vs naive sequential split: x{statistics.median(ratios):.2f} "
          f"(per round: {', '.join(f'x{r:.2f}' for r in ratios)})")


def cuda_table() -> None:
    """CUDA-event latency of the cuda backend vs torch.utils.benchmark on the same forward,
    and eager vs CUDA graphs vs fp16 autocast."""
    from torch.utils import benchmark

    from inferopt.plugins.backends.cuda import CudaBackend

    x = torch.randn(ARGS.batch_size, ARGS.width)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| variant | CUDA events p50 ms | torch.utils.benchmark median ms | difference |")
    print("|---|---:|---:|---:|")
    for name, backend in [("eager fp32", CudaBackend()),
                          ("fp16 autocast", CudaBackend(autocast="fp16")),
                          ("CUDA graphs fp32", CudaBackend(cuda_graphs=True))]:
        prepared = backend.prepare(build_model(ARGS.width, ARGS.depth), PrepareContext())
        xs = backend.to_device(x)
        with torch.inference_mode():
            for _ in range(10):
                backend.forward(prepared, xs)

            def once(backend: Any = backend, prepared: Any = prepared, xs: Any = xs) -> Any:
                return backend.forward(prepared, xs)

            events = sorted(backend.time(once) for _ in range(200))
            reference = benchmark.Timer(
                stmt="forward(prepared, xs)",
                globals={"forward": backend.forward, "prepared": prepared, "xs": xs},
            ).blocked_autorange(min_run_time=1.0)
        p50 = events[len(events) // 2] * 1e3
        ref = reference.median * 1e3
        print(f"| {name} | {p50:.4f} | {ref:.4f} | {abs(p50 - ref) / ref:.1%} |")


def main() -> None:
    if ARGS.worker:
        worker(ARGS.worker, Path(ARGS.result))
    elif ARGS.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        cuda_table()
    else:
        cpu_table()


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
parser.add_argument("--procs", type=int, default=2, help="processes / stages")
parser.add_argument("--batches", type=int, default=32)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--microbatches", type=int, default=4)
parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement")
parser.add_argument("--runs", type=int, default=3,
                    help="rounds: each row measured this many times, rows interleaved; the "
                         "table shows the median and the range")
parser.add_argument("--rows", choices=["all", "pipeline"], default="all",
                    help="pipeline: only cpu 1 thread, the torchrun pipeline and the naive split")
parser.add_argument("--worker", help=argparse.SUPPRESS)
parser.add_argument("--result", help=argparse.SUPPRESS)
ARGS = parser.parse_args()

if __name__ == "__main__":
    main()
