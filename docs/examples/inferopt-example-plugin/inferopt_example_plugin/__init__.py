"""inferopt-example-plugin: an inferopt plugin.

Registers the optimizer ``half`` and the metric ``flops``. This module is imported whenever
inferopt lists plugins, so it must stay light: torch is imported only inside the methods that
use it (see ``modules.py``).
"""

from __future__ import annotations

from typing import Any

import attrs

import inferopt

__version__ = "0.1.0"

DTYPES = ("bfloat16", "float16")


@attrs.frozen
class HalfOptimizer(inferopt.Optimizer):
    """Cast weights and activations to a 16-bit float type; outputs stay float32."""

    name = "half"
    summary = "cast the model to bfloat16 or float16 (outputs stay float32)"

    # Options are attrs fields; inferopt converts CLI strings and checks choices/ranges.
    dtype: str = inferopt.option("bfloat16", choices=DTYPES, help="the 16-bit type to run in")

    def apply(self, model: Any, ctx: inferopt.StepContext) -> Any:
        from inferopt_example_plugin.modules import cast_model

        model = cast_model(model, self.dtype)
        ctx.details["summary"] = f"weights and activations in {self.dtype}; outputs in float32"
        device = ctx.backend.device if ctx.backend is not None else "cpu"
        if device == "cpu" and not ctx.restoring:
            # Say when the technique may not pay off here, instead of staying silent.
            ctx.warn(f"half: {self.dtype} matmuls are only fast on CPUs with AVX-512 BF16/FP16 "
                     "or AMX; check the measured latency")
        return model


@attrs.frozen
class FlopsMetric(inferopt.Metric):
    """Floating-point operations per sample of one forward pass (PyTorch's flop counter)."""

    name = "flops"
    summary = "floating-point operations per sample (torch.utils.flop_counter)"
    unit = "FLOP/sample"
    primary = "flops_per_sample"
    higher_is_better = False

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        from inferopt_example_plugin.modules import count_flops

        batch = data.eval[0]
        flops = count_flops(model, backend.to_device(batch.inputs), backend)
        return {"flops_per_sample": flops / batch.size, "flops_per_batch": flops,
                "batch_size": batch.size}


@inferopt.hookimpl
def inferopt_register_optimizers(register: Any) -> None:
    register(HalfOptimizer)


@inferopt.hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(FlopsMetric)
