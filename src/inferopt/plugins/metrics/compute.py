"""The ``compute`` metric: multiply-accumulates per sample, parameters and weight sparsity —
what the model costs, counted rather than timed."""

from __future__ import annotations

from typing import Any

import attrs

from inferopt import Metric, Quantity, hookimpl


@attrs.frozen
class ComputeMetric(Metric):
    """MACs and FLOPs per sample for one forward pass on the first eval batch (counted by
    ``torch.utils.flop_counter``), parameter count, and the share of zero weights. Custom
    kernels the counter cannot see (int8/int4 matrix products) make the count incomplete: it is
    then left out (null) and the kernels are named, rather than counted as zero."""

    name = "compute"
    summary = "MACs/FLOPs per sample, parameters, weight sparsity"
    unit = "MACs"
    primary = "macs_per_sample"
    higher_is_better = False
    quantities = {
        "macs_per_sample": Quantity("count", "lower", "percent", "MACs per sample"),
        "parameters": Quantity("count", "lower", "percent", "parameters"),
        "weight_sparsity": Quantity("fraction", None, "points", "zero weights"),
    }
    needs_modules = True  # runs the modules under torch's flop counter and reads their weights

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        from inferopt.utils import count_macs, parameter_count, weight_sparsity

        count = count_macs(model, backend.to_device(data.eval[0].inputs))
        macs = count.per_sample if count is not None and count.complete else None
        result: dict[str, Any] = {
            "macs_per_sample": macs,
            "flops_per_sample": None if macs is None else 2 * macs,
            "parameters": parameter_count(model),
            "weight_sparsity": weight_sparsity(model),
        }
        if count is None:
            result["uncounted"] = "the flop counter could not run this model"
        elif not count.complete:
            result["uncounted_ops"] = list(count.uncounted_ops)
        ctx.log.info("compute", macs_per_sample=macs, parameters=result["parameters"])
        return result


@hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(ComputeMetric)
