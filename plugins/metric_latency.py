"""The ``latency`` metric: time per batch, with warm-up and enough runs for stable percentiles."""

from __future__ import annotations

from typing import Any

import attrs

from inferopt import Metric, hookimpl, option


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    import numpy as np

    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }


@attrs.frozen
class LatencyMetric(Metric):
    """Milliseconds per batch: warm-up runs, then runs until both a minimum count and a minimum
    time are reached, cycling through the data's full-size batches."""

    name = "latency"
    summary = "milliseconds per batch (p50/p90/p99/mean)"
    unit = "ms"
    primary = "p50_ms"
    higher_is_better = False

    warmup: int = option(5, min=0, help="untimed runs first")
    min_runs: int = option(64, min=1, help="at least this many timed runs")
    min_seconds: float = option(0.5, min=0.0, help="and at least this much timed time")
    max_runs: int = option(100_000, min=1, help="stop after this many runs")

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        import torch

        size = data.eval[0].size
        batches = [backend.to_device(b.inputs) for b in data.eval if b.size == size]

        def one(i: int) -> Any:
            return backend.forward(model, batches[i % len(batches)])

        with torch.inference_mode():
            for i in range(self.warmup):
                one(i)
            times: list[float] = []
            total = 0.0
            i = 0
            while (len(times) < self.min_runs or total < self.min_seconds) and len(
                times
            ) < self.max_runs:
                t = backend.time(lambda i=i: one(i))
                times.append(t)
                total += t
                i += 1
        result = percentiles_ms(times)
        result.update({"runs": len(times), "batch_size": size, "threads": torch.get_num_threads()})
        ctx.log.info("latency", p50_ms=round(result["p50_ms"], 4), runs=len(times))
        return result

    def combine(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Data-parallel workers: each percentile is the slowest worker's (a request split over
        the workers waits for all of them); every worker's p50 is kept."""
        merged: dict[str, Any] = {
            key: max(r[key] for r in results)
            for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "std_ms")
        }
        merged["min_ms"] = min(r["min_ms"] for r in results)
        merged["mean_ms"] = sum(r["mean_ms"] for r in results) / len(results)
        merged["runs"] = sum(r["runs"] for r in results)
        merged["batch_size"] = results[0]["batch_size"]
        merged["threads"] = results[0]["threads"]
        merged["workers"] = len(results)
        merged["per_worker_p50_ms"] = [r["p50_ms"] for r in results]
        return merged


@hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(LatencyMetric)
