"""The ``throughput`` metric: samples per second over the whole eval data, measured."""

from __future__ import annotations

from typing import Any

import attrs

from inferopt import Metric, hookimpl, option


@attrs.frozen
class ThroughputMetric(Metric):
    """Samples per second over complete passes through the eval data (not derived from
    latency): one untimed pass, then passes until ``min_seconds`` and ``min_passes``."""

    name = "throughput"
    summary = "samples per second over the eval data"
    unit = "samples/s"
    primary = "samples_per_s"
    higher_is_better = True

    min_passes: int = option(2, min=1, help="at least this many full passes")
    min_seconds: float = option(0.5, min=0.0, help="and at least this much time")

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        import torch

        batches = [backend.to_device(b.inputs) for b in data.eval]
        samples_per_pass = sum(b.size for b in data.eval)

        def one_pass() -> None:
            for inputs in batches:
                backend.forward(model, inputs)

        with torch.inference_mode():
            one_pass()
            passes, seconds = 0, 0.0
            while passes < self.min_passes or seconds < self.min_seconds:
                seconds += backend.time(one_pass)
                passes += 1
        result = {
            "samples_per_s": samples_per_pass * passes / seconds,
            "samples": samples_per_pass * passes,
            "seconds": seconds,
        }
        ctx.log.info("throughput", samples_per_s=round(result["samples_per_s"], 1))
        return result

    def combine(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Data-parallel workers started together and ran at the same time: the total is every
        worker's samples over the time the slowest one took."""
        seconds = max(r["seconds"] for r in results)
        samples = sum(r["samples"] for r in results)
        return {
            "samples_per_s": samples / seconds,
            "samples": samples,
            "seconds": seconds,
            "workers": len(results),
            "per_worker_samples_per_s": [r["samples_per_s"] for r in results],
        }


@hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(ThroughputMetric)
