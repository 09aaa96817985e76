"""The ``memory`` metric: peak memory while the model runs, and the bytes its weights hold in
memory, by dtype."""

from __future__ import annotations

import os
import threading
from typing import Any

import attrs

from inferopt import Metric, hookimpl, option

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident set size (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class _PeakSampler:
    """Samples the resident set size every ``interval`` seconds in a thread (torch releases
    the GIL inside its kernels, so the samples land during the work)."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.peak = resident_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes() or 0)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes() or 0)


def _live_tensor_tracker() -> Any:
    """A dispatch mode that adds up the bytes of every tensor an operation creates while it
    is alive, and remembers the peak: the memory inference itself needs, counted the same way
    for every model (the process's resident size is not: the allocator keeps freed memory)."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Tracker(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = 0
            self.peak = 0

        def _release(self, nbytes: int) -> None:
            self.live -= nbytes

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, tuple | list) else (out,)):
                if isinstance(t, torch.Tensor) and t._base is None and t.device.type == "cpu":
                    nbytes = t.untyped_storage().nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._release, nbytes)
            return out

    return Tracker()


@attrs.frozen
class MemoryMetric(Metric):
    """Peak memory during inference over the eval data and the weights' bytes in memory.

    ``peak_increase_bytes`` is what inference needs on top of the weights: on CUDA the rise of
    ``torch.cuda.max_memory_allocated`` over what was allocated before; on CPU the peak of the
    bytes held by tensors that operations created (counted by a dispatch mode while they are
    alive), the same way for every model. ``peak_rss_bytes`` (CPU, Linux) is the process's
    resident size sampled every 0.5 ms during a second pass: everything in the process, the
    baseline model kept for comparison included. Weight bytes are counted as the tensors are
    held (packed int4 codes as packed bytes), by dtype; kernels' private workspace (FBGEMM's
    packed weights) is not visible to either count.
    """

    name = "memory"
    summary = "peak memory during inference (RSS on CPU, max allocated on CUDA), weight bytes"
    unit = "bytes"
    primary = "peak_increase_bytes"
    higher_is_better = False

    passes: int = option(1, min=1, help="passes over the eval data while memory is watched")

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        import gc

        import torch

        batches = [backend.to_device(b.inputs) for b in data.eval]

        def run() -> None:
            with torch.inference_mode():
                for _ in range(self.passes):
                    for inputs in batches:
                        backend.forward(model, inputs)
            backend.synchronize()

        result: dict[str, Any] = {}
        gc.collect()
        if backend.device.startswith("cuda"):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run()
            peak = torch.cuda.max_memory_allocated()
            result.update({"peak_bytes": peak, "peak_increase_bytes": peak - before,
                           "kind": "cuda max allocated"})
        else:
            tracker = _live_tensor_tracker()
            with tracker:
                run()
            result.update({"peak_increase_bytes": tracker.peak,
                           "kind": "peak bytes of tensors created during inference"})
            if resident_bytes() is not None:
                with _PeakSampler() as sampler:
                    run()
                result["peak_rss_bytes"] = sampler.peak
        by_dtype: dict[str, int] = {}
        for tensor in list(model.parameters()) + list(model.buffers()):
            key = str(tensor.dtype).replace("torch.", "")
            by_dtype[key] = by_dtype.get(key, 0) + tensor.numel() * tensor.element_size()
        result["weight_bytes"] = sum(by_dtype.values())
        result.update({f"weight_bytes_{k}": v for k, v in sorted(by_dtype.items())})
        ctx.log.info("memory", peak_increase_bytes=result.get("peak_increase_bytes"),
                     weight_bytes=result["weight_bytes"])
        return result


@hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(MemoryMetric)
