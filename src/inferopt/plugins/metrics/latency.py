"""The ``latency`` metric: time per batch, with warm-up and enough runs for stable percentiles;
baseline and optimized models timed interleaved, with a confidence interval on the speedup."""

from __future__ import annotations

from typing import Any

import attrs

from inferopt import Gate, Metric, Quantity, hookimpl, option
from inferopt.plugins.metrics.timing_stats import percentiles_ms, speed_verdict, speedup_ci

# precision presets: (min_runs, min_seconds). quick reaches the MLPerf minimum for p90,
# thorough the one for p99.
PRESETS = {"quick": (64, 0.5), "thorough": (662, 5.0)}


@attrs.frozen
class LatencyMetric(Metric):
    """Milliseconds per batch: warm-up runs, then runs until both a minimum count and a minimum
    time are reached, cycling through the data's full-size batches. Compared with the baseline,
    the two models run alternately (A B B A ...) so that machine noise hits both alike, and the
    speedup gets a bootstrap confidence interval and a verdict."""

    name = "latency"
    summary = "milliseconds per batch (p50/p90/p95/p99), interleaved A/B speedup with a CI"
    unit = "ms"
    primary = "p50_ms"
    higher_is_better = False
    aspect = "speed"
    # unpaired, a change within 5% is noise; paired, the verdict comes from the speedup's CI
    quantities = {
        f"{p}_ms": Quantity("ms", "lower", "speedup", f"latency {p}", same_within_relative=0.05,
                            words=("faster", "slower", "no measurable change"))
        for p in ("p50", "p90", "p95", "p99")
    }
    gates = {"min_speedup": Gate("p50_ms", "min_change", comparison="speedup",
                                 reported_as="speedup", help=(
        "exit 1 if the p50 latency speedup (baseline / optimized; the interleaved A/B "
        "estimate when measured so) is below this"))}

    precision: str = option("quick", choices=tuple(PRESETS),
                            help="quick: >= 64 runs and 0.5 s (p90 meaningful); thorough: "
                                 ">= 662 runs and 5 s (p99 meaningful)")
    warmup: int = option(5, min=0, help="untimed runs first")
    min_runs: int = option(0, min=0, help="at least this many timed runs (0: by precision)")
    min_seconds: float = option(-1.0, help="and at least this much timed time per model "
                                           "(negative: by precision)")
    max_runs: int = option(100_000, min=1, help="stop after this many runs")
    interleave: bool = option(True, help="time baseline and optimized alternately in one loop "
                                         "(needs both models in memory at once)")
    confidence: float = option(0.95, min=0.5, max=0.999,
                               help="confidence level of the speedup interval")
    min_effect: float = option(0.02, min=0.0, max=1.0,
                               help="smallest relative change called faster or slower")

    @property
    def paired(self) -> bool:
        return self.interleave

    def _budget(self) -> tuple[int, float]:
        runs, seconds = PRESETS[self.precision]
        return (self.min_runs or runs, self.min_seconds if self.min_seconds >= 0 else seconds)

    def _batches(self, backend: Any, data: Any) -> list[Any]:
        size = data.eval[0].size
        return [backend.to_device(b.inputs) for b in data.eval if b.size == size]

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        import torch

        batches = self._batches(backend, data)
        min_runs, min_seconds = self._budget()
        times: list[float] = []
        with torch.inference_mode():
            for i in range(self.warmup):
                backend.forward(model, batches[i % len(batches)])
            total = 0.0
            while (len(times) < min_runs or total < min_seconds) and len(times) < self.max_runs:
                x = batches[len(times) % len(batches)]
                times.append(backend.time(lambda x=x: backend.forward(model, x)))
                total += times[-1]
        result = self._stats(times, data, torch.get_num_threads())
        ctx.log.info("latency", p50_ms=round(result["p50_ms"], 4), runs=len(times))
        return result

    def measure_pair(self, baseline: Any, optimized: Any, backend: Any, data: Any, ctx: Any
                     ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
        if not self.interleave:
            return None
        import torch

        batches = self._batches(backend, data)
        min_runs, min_seconds = self._budget()
        times: tuple[list[float], list[float]] = ([], [])
        models = (baseline, optimized)
        from inferopt.utils import progress

        with torch.inference_mode(), progress(min_runs, "latency A/B (pairs)", 200) as advance:
            for i in range(self.warmup):
                for m in models:
                    backend.forward(m, batches[i % len(batches)])
            totals = [0.0, 0.0]
            n = 0
            # both models get min_runs and min_seconds of timed time each
            while (n < min_runs or min(totals) < min_seconds) and n < self.max_runs:
                if n < min_runs:
                    advance(1)
                x = batches[n % len(batches)]
                # A B, then B A: neither model always runs right after the other
                for k in ((0, 1) if n % 2 == 0 else (1, 0)):
                    t = backend.time(lambda m=models[k], x=x: backend.forward(m, x))
                    times[k].append(t)
                    totals[k] += t
                n += 1
        threads = torch.get_num_threads()
        base, opt = (self._stats(t, data, threads) for t in times)
        speedup, low, high = speedup_ci(times[0], times[1], self.confidence, seed=0)
        verdict = speed_verdict(speedup, low, high, self.min_effect)
        comparison = {
            "speedup": speedup, "ci_low": low, "ci_high": high, "confidence": self.confidence,
            "min_effect": self.min_effect, "verdict": verdict, "pairs": n,
            "method": "interleaved A/B runs; ratio of medians; percentile bootstrap of pairs",
        }
        ctx.log.info("latency A/B", speedup=round(speedup, 3), ci=[round(low, 3), round(high, 3)],
                     verdict=verdict, pairs=n)
        return base, opt, comparison

    def _stats(self, times: list[float], data: Any, threads: int) -> dict[str, Any]:
        result = percentiles_ms(times)
        result.update({"runs": len(times), "batch_size": data.eval[0].size, "threads": threads,
                       "precision": self.precision})
        return result
    def combine(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Data-parallel workers: each percentile is the slowest worker's (a request split over
        the workers waits for all of them); every worker's p50 is kept."""
        merged: dict[str, Any] = {
            key: max(r[key] for r in results)
            for key in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "std_ms")
            if all(key in r for r in results)
        }
        merged["min_ms"] = min(r["min_ms"] for r in results)
        merged["mean_ms"] = sum(r["mean_ms"] for r in results) / len(results)
        merged["runs"] = sum(r["runs"] for r in results)
        merged["batch_size"] = results[0]["batch_size"]
        merged["threads"] = results[0]["threads"]
        merged["precision"] = results[0].get("precision")
        merged["unreliable"] = results[0].get("unreliable", [])
        merged["workers"] = len(results)
        merged["per_worker_p50_ms"] = [r["p50_ms"] for r in results]
        return merged


@hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(LatencyMetric)
