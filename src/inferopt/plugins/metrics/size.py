"""The ``size`` metric: bytes of the weights as they are saved (safetensors), by dtype."""

from __future__ import annotations

from typing import Any

import attrs

from inferopt import Gate, Metric, Quantity, hookimpl


@attrs.frozen
class SizeMetric(Metric):
    """Bytes of the saved weights (the safetensors file ``inferopt run`` writes), parameter
    count, and bytes per dtype. Packed low-bit tensors count as what they are stored as."""

    name = "size"
    summary = "bytes of the saved weights"
    unit = "bytes"
    primary = "bytes"
    higher_is_better = False
    aspect = "size"
    quantities = {"bytes": Quantity("bytes", "lower", "percent", "size (saved weights)",
                                    words=("smaller", "not smaller", "not smaller"))}
    gates = {"max_size_ratio": Gate("bytes", "max_change", reported_as="size_ratio", help=(
        "exit 1 if optimized size / baseline size (saved weights) is above this"))}

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        from safetensors.torch import load

        blob = ctx.saved_weights()
        # what was saved, read back: the torch model's weights whatever the backend runs
        tensors = list(load(blob).values())
        by_dtype: dict[str, int] = {}
        tensor_bytes = 0
        for tensor in tensors:
            key = str(tensor.dtype).replace("torch.", "")
            nbytes = tensor.numel() * tensor.element_size()
            by_dtype[key] = by_dtype.get(key, 0) + nbytes
            tensor_bytes += nbytes
        result: dict[str, Any] = {
            "bytes": len(blob),
            "tensor_bytes": tensor_bytes,
            # stored values of every tensor (an int8 weight counts once, like a float one)
            "elements": sum(t.numel() for t in tensors),
        }
        result.update({f"bytes_{k}": v for k, v in sorted(by_dtype.items())})
        ctx.log.info("size", bytes=result["bytes"])
        return result


@hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(SizeMetric)
