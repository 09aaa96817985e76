"""Two ``inferopt tune`` workers on one study against one worker, on the same search: the wall
time of each (and their ratio, in one run), whether both ran the same trials, and the recipe
each chose with its accuracy drop and size. Both searches use ``--sampler grid``, whose trials
do not depend on which worker saw which result: they are the same whenever the measured results
the plan uses are the same (accuracy and size are deterministic; whether a trial is faster is
measured, so noise can still change the pairs, the sensitivity runs and the choice).

    python benchmarks/bench_tune_workers.py                     # the demo, 12 trials, 2 workers
    python benchmarks/bench_tune_workers.py --trials 6 --model demo:digits-mlp-small   # quick
    python benchmarks/bench_tune_workers.py --workers 4 --trials 24
    python benchmarks/bench_tune_workers.py --objective size   # a choice free of timing noise

The single worker gets every core (OMP_NUM_THREADS = cores); each of N workers gets its share,
pinned with ``taskset`` where it exists, so that the workers' timings do not compete for the
same cores. Run it on an idle machine: other processes distort both the timings and the ratio
(the load average is printed at the start and at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from inferopt.utils import cpu_flags


def search(out: Path, workers: int, args: argparse.Namespace) -> tuple[float, list[dict[str, Any]]]:
    """Wall seconds until every worker exited, and each worker's tune document."""
    cores = os.cpu_count() or 1
    share = max(1, cores // workers)
    command = [sys.executable, "-m", "inferopt", "tune", "--model", args.model,
               "--metric", args.latency, "--trials", str(args.trials),
               "--budget-minutes", "60", "--sampler", "grid", "--out", str(out), "--json",
               "--objective", args.objective,
               *[flag for t in args.technique for flag in ("-t", t)]]
    procs = []
    start = time.perf_counter()
    for i in range(workers):
        env = dict(os.environ, OMP_NUM_THREADS=str(share), OMP_WAIT_POLICY="PASSIVE")
        pin = []
        if workers > 1 and shutil.which("taskset") and cores >= workers:
            pin = ["taskset", "-c", f"{i * share}-{(i + 1) * share - 1}"]
        procs.append(subprocess.Popen([*pin, *command], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    docs = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode not in (0, 1):
            raise SystemExit(f"a worker failed (exit {p.returncode}):\n{stderr[-2000:]}")
        docs.append(json.loads(stdout))
    return time.perf_counter() - start, docs


def summary(docs: list[dict[str, Any]]) -> dict[str, Any]:
    doc = max(docs, key=lambda d: len(d["trials"]))  # the worker that finished last
    chosen = next((t for t in doc["trials"] if t["id"] == doc["chosen"]), None)
    workers = {t.get("worker") for t in doc["trials"]}
    return {"trials": {t["key"] for t in doc["trials"]}, "workers": len(workers),
            "chosen": chosen and chosen["key"],
            "accuracy_drop": chosen and chosen["accuracy_drop_points"],
            "size_ratio": chosen and chosen["size_ratio"],
            "speedup": chosen and chosen["speedup"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo:digits-mlp")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--technique", action="append",
                        help="repeatable; default: int8 and prune-activations (16 points)")
    parser.add_argument("--latency", default="latency:min_runs=100,min_seconds=0.5")
    parser.add_argument("--objective", default="latency",
                        help="tune's --objective; size makes the plan and the choice "
                             "independent of timing noise (latency is still measured)")
    args = parser.parse_args()
    args.technique = args.technique or ["int8", "prune-activations"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    print(f"CPU flags: {' '.join(sorted(cpu_flags())) or '(none found)'}")
    print(f"search: {args.model}, {' '.join(args.technique)}, {args.trials} trials, "
          f"--sampler grid, --objective {args.objective}")
    print("load average at the start (1, 5, 15 min): "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        one_s, one = search(Path(tmp) / "one", 1, args)
        many_s, many = search(Path(tmp) / "many", args.workers, args)
    a, b = summary(one), summary(many)
    print(f"1 worker:  {one_s:7.1f} s  chosen {a['chosen']} (drop {a['accuracy_drop']} pts, "
          f"size {a['size_ratio']}, x{a['speedup']})")
    print(f"{args.workers} workers: {many_s:7.1f} s  chosen {b['chosen']} (drop "
          f"{b['accuracy_drop']} pts, size {b['size_ratio']}, x{b['speedup']}); trials by "
          f"{b['workers']} workers")
    print(f"wall time, 1 worker / {args.workers} workers: x{one_s / many_s:.2f} "
          f"({'faster' if many_s < one_s else 'NOT faster'} with {args.workers})")
    same_trials = a["trials"] == b["trials"]
    print(f"same trial keys: {same_trials} ({len(a['trials'])} and {len(b['trials'])} trials, "
          "the A/A trial included)")
    same_quality = all(
        x is not None and y is not None and math.isclose(x, y, abs_tol=1e-6)
        for x, y in ((a["accuracy_drop"], b["accuracy_drop"]), (a["size_ratio"], b["size_ratio"])))
    print(f"chosen recipe: {'same' if a['chosen'] == b['chosen'] else 'different'}; same "
          f"accuracy drop and size of the choice: {same_quality}")
    if not same_trials:
        print(f"  only 1 worker: {sorted(a['trials'] - b['trials'])}; only "
              f"{args.workers}: {sorted(b['trials'] - a['trials'])}")
    print("load average at the end (1, 5, 15 min): "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
