"""The ``throughput`` metric: samples per second over the whole eval data, measured."""

from __future__ import annotations

from typing import Any

import attrs

from inferopt import Metric, Quantity, UsageError, hookimpl, option


@attrs.frozen
class ThroughputMetric(Metric):
    """Samples per second over complete passes through the eval data (not derived from
    latency): one untimed pass, then passes until ``min_seconds`` and ``min_passes``."""

    name = "throughput"
    summary = "samples per second over the eval data"
    unit = "samples/s"
    primary = "samples_per_s"
    higher_is_better = True
    aspect = "speed"
    # an unpaired measurement: a change within 5% is noise
    quantities = {
        "samples_per_s": Quantity("samples/s", "higher", "ratio", "throughput (samples/s)",
                                  same_within_relative=0.05,
                                  words=("faster", "slower", "no measurable change")),
        "samples_per_s_batch*": Quantity("samples/s", "higher", "ratio",
                                         "throughput at batch {}", same_within_relative=0.05),
    }

    min_passes: int = option(2, min=1, help="at least this many full passes")
    min_seconds: float = option(0.5, min=0.0, help="and at least this much time")
    batch_sizes: tuple[int, ...] = option(
        (), help="also measure with the eval data re-batched to these sizes (e.g. 1|8|64); "
                 "needs tensor inputs (or tuples/dicts of tensors)")

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        samples, seconds = self._offline(model, backend, [b.inputs for b in data.eval],
                                         sum(b.size for b in data.eval))
        result: dict[str, Any] = {"samples_per_s": samples / seconds, "samples": samples,
                                  "seconds": seconds}
        if self.batch_sizes:
            inputs = _concatenated([b.inputs for b in data.eval])
            for size in self.batch_sizes:
                if size < 1:
                    raise UsageError(f"throughput batch_sizes: {size} is not a batch size; "
                                     "give positive integers such as 1|8|64")
                batches = _split(inputs, size)
                s, t = self._offline(model, backend, batches, sum(_rows(b) for b in batches))
                result[f"samples_per_s_batch{size}"] = s / t
        ctx.log.info("throughput", samples_per_s=round(result["samples_per_s"], 1))
        return result

    def _offline(self, model: Any, backend: Any, inputs: list[Any], per_pass: int
                 ) -> tuple[int, float]:
        """Samples and seconds over whole passes: one untimed pass, then passes until both
        ``min_passes`` and ``min_seconds``."""
        import torch

        batches = [backend.to_device(x) for x in inputs]

        def one_pass() -> None:
            for x in batches:
                backend.forward(model, x)

        with torch.inference_mode():
            one_pass()
            passes, seconds = 0, 0.0
            while passes < self.min_passes or seconds < self.min_seconds:
                seconds += backend.time(one_pass)
                passes += 1
        return per_pass * passes, seconds

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
            # the sweep ran on every worker at once: the rates add up
            **{k: sum(r[k] for r in results) for k in results[0]
               if k.startswith("samples_per_s_batch")},
        }


def _concatenated(inputs: list[Any]) -> Any:
    import torch

    first = inputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(inputs)
    if isinstance(first, tuple | list) and all(isinstance(t, torch.Tensor) for t in first):
        return tuple(torch.cat([x[i] for x in inputs]) for i in range(len(first)))
    if isinstance(first, dict) and all(isinstance(t, torch.Tensor) for t in first.values()):
        return {k: torch.cat([x[k] for x in inputs]) for k in first}
    raise UsageError("throughput batch_sizes re-batches the eval data, which needs tensor "
                     f"inputs (or tuples/dicts of tensors); these are {type(first).__name__}")


def _split(inputs: Any, size: int) -> list[Any]:
    if isinstance(inputs, tuple):
        return list(zip(*(t.split(size) for t in inputs), strict=True))
    if isinstance(inputs, dict):
        parts = {k: v.split(size) for k, v in inputs.items()}
        return [{k: parts[k][i] for k in inputs} for i in range(len(next(iter(parts.values()))))]
    return list(inputs.split(size))


def _rows(inputs: Any) -> int:
    from inferopt.utils import first_tensor

    return int(first_tensor(inputs).shape[0])


@hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(ThroughputMetric)
