"""The ``memory`` metric: peak memory while the model runs, and the bytes its weights hold in
memory, by dtype."""

from __future__ import annotations

import os
import threading
from typing import Any

import attrs

from inferopt import Metric, Quantity, hookimpl, option

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
    """A dispatch mode that adds up the bytes of every storage an operation creates while a
    tensor still uses it, and remembers the peak: the memory inference itself needs, counted the
    same way for every model (the process's resident size is not: the allocator keeps freed
    memory). Views and in-place results share a storage and are counted once; storages that
    existed before (weights, inputs) are not counted."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def storage_of(t: torch.Tensor) -> tuple[int, int]:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()

    class Tracker(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.users: dict[int, int] = {}  # storage pointer -> live tensors using it
            self.sizes: dict[int, int] = {}
            self.live = 0
            self.peak = 0

        def _release(self, ptr: int) -> None:
            self.users[ptr] -= 1
            if not self.users[ptr]:
                del self.users[ptr]
                self.live -= self.sizes.pop(ptr)

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            existing = {storage_of(t)[0] for t in tree_leaves((args, kwargs or {}))
                        if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                ptr, nbytes = storage_of(t)
                if not ptr or (ptr in existing and ptr not in self.users):
                    continue  # empty, or memory that was there before (an input, a weight)
                if ptr not in self.users:
                    self.users[ptr], self.sizes[ptr] = 0, nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.users[ptr] += 1
                weakref.finalize(t, self._release, ptr)
            return out

    return Tracker()


@attrs.frozen
class MemoryMetric(Metric):
    """Peak memory during inference over the eval data and the weights' bytes in memory.

    ``peak_increase_bytes`` is what inference needs on top of the weights: the peak of the
    bytes held by storages that operations created, counted by a dispatch mode while tensors
    use them (views and in-place results once; inputs and weights not at all), the same way for
    every model and device. The process's resident size cannot do this fairly (the allocator
    keeps freed memory, so whichever model runs second looks free); it is reported as
    ``peak_rss_bytes`` (CPU, Linux, sampled every 0.5 ms during a second pass), and on CUDA
    ``cuda_max_allocated_bytes`` is the process-wide statistic (never reset here). Weight bytes
    are counted as the tensors are held (packed int4 codes as packed bytes), by dtype; kernels'
    private workspace (FBGEMM's packed weights, cuBLAS workspaces) is not visible.
    """

    name = "memory"
    summary = "peak memory during inference (RSS on CPU, max allocated on CUDA), weight bytes"
    unit = "bytes"
    primary = "peak_increase_bytes"
    higher_is_better = False
    quantities = {
        "peak_increase_bytes": Quantity("bytes", "lower", "percent",
                                        "peak memory during inference"),
        "weight_bytes": Quantity("bytes", "lower", "percent", "weights in memory"),
    }
    needs_modules = True  # counts the weights' bytes from the modules' tensors

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
        tracker = _live_tensor_tracker()
        with tracker:
            run()
        result.update({"peak_increase_bytes": tracker.peak,
                       "kind": "peak bytes of tensors created during inference"})
        if backend.device.startswith("cuda"):
            # the process-wide statistic, not reset here (the backend reports the run's peak)
            result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        elif resident_bytes() is not None:
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
