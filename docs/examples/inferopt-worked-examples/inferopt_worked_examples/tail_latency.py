"""The ``tail-latency`` metric: p99.9 (and p50) milliseconds per batch.

Each timed call runs one eval batch through the backend (``backend.forward`` on what the
backend prepared, timed by ``backend.time``, which synchronizes before and after). The eval
batches of the first batch's size are cycled through, as the built-in ``latency`` does, so a
short last batch does not pose as a fast outlier. p99.9 needs many samples: with ``runs`` timed
calls the percentile rests on ``runs / 1000`` calls above it, so fewer than 1000 runs make it an
interpolation between the slowest few calls (``reliable`` says which).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

import inferopt
from inferopt import Gate, Quantity

MIN_RELIABLE_RUNS = 1000  # at least one call beyond the 99.9th percentile


@attrs.frozen
class TailLatency(inferopt.Metric):
    """p99.9 and p50 latency per batch, from many timed calls."""

    name = "tail-latency"
    summary = "p99.9 and p50 latency per batch (ms), from many timed calls"
    primary = "p999_ms"
    unit = "ms"
    higher_is_better = False
    quantities: ClassVar[dict[str, Quantity]] = {
        "p999_ms": Quantity("ms", "lower", "speedup", "latency p99.9"),
        "p50_ms": Quantity("ms", "lower", "speedup", "latency p50 (tail-latency)"),
        "runs": Quantity("count", None, None, "tail-latency runs", show=False),
    }
    gates: ClassVar[dict[str, Gate]] = {
        "max_p999_ms": Gate("p999_ms", "max_value",
                            help="exit 1 if the optimized model's p99.9 latency (ms per batch) "
                                 "is above this"),
        "min_tail_speedup": Gate("p999_ms", "min_change",
                                 help="exit 1 if the p99.9 speedup (baseline / optimized) is "
                                      "below this"),
    }

    runs: int = inferopt.option(1000, min=10, help="timed calls (p99.9 needs 1000 or more)")
    warmup: int = inferopt.option(10, min=0, help="untimed calls first")

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        import numpy as np

        if not data.eval:
            raise inferopt.UsageError("tail-latency: there are no eval batches to time")
        size = data.eval[0].size
        batches = [backend.to_device(b.inputs) for b in data.eval if b.size == size]
        for i in range(self.warmup):
            backend.forward(model, batches[i % len(batches)])
        seconds = []
        for i in range(self.runs):
            x = batches[i % len(batches)]
            seconds.append(backend.time(lambda x=x: backend.forward(model, x)))
        ms = np.asarray(seconds) * 1000.0
        return {
            "p999_ms": float(np.percentile(ms, 99.9)),
            "p50_ms": float(np.percentile(ms, 50)),
            "max_ms": float(ms.max()),
            "runs": self.runs,
            "batch_size": size,
            "reliable": self.runs >= MIN_RELIABLE_RUNS,
        }


@inferopt.hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(TailLatency)
