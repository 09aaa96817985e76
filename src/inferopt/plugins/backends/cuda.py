"""The ``cuda`` backend: one NVIDIA GPU, optional fp16/bf16 autocast and CUDA graphs, timed
with CUDA events."""

from __future__ import annotations

import weakref
from typing import Any

import attrs

from inferopt import Backend, PrepareContext, hookimpl, option


def cuda_unavailable_reason(index: int = 0) -> str | None:
    """None when ``cuda:index`` exists here; otherwise what is missing, and what there is."""
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda
        what = (f"torch {torch.__version__} is a CPU-only build" if build is None
                else f"torch {torch.__version__} (CUDA {build}) sees no NVIDIA GPU")
        return f"no CUDA device: {what}; available here: the cpu backend"
    count = torch.cuda.device_count()
    if index >= count:
        return (f"cuda:{index} does not exist; this machine has {count} CUDA device(s): "
                + ", ".join(f"cuda:{i}" for i in range(count)))
    return None


# Captured graphs per prepared module, then per input signature: a graph replays fixed
# buffers, so each distinct input shape needs its own capture.
_GRAPHS: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


@attrs.define
class CapturedGraph:
    """A CUDA graph of one forward pass, with the input and output buffers it replays."""

    graph: Any
    static_inputs: Any
    static_outputs: Any


def _signature(inputs: Any) -> tuple[Any, ...]:
    from inferopt.utils import iter_tensors

    return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in iter_tensors(inputs))


@attrs.frozen
class CudaBackend(Backend):
    """Run on one NVIDIA GPU. Timings are CUDA events around the work, after synchronizing."""

    name = "cuda"
    summary = "one NVIDIA GPU (fp16/bf16 autocast, CUDA graphs, CUDA-event timing)"

    index: int = option(0, min=0, help="which GPU: cuda:INDEX")
    autocast: str = option("none", choices=("none", "fp16", "bf16"),
                           help="run in half precision through torch.autocast")
    cuda_graphs: bool = option(
        False, help="capture each input shape's forward as a CUDA graph and replay it "
                    "(less launch overhead; the model must be capturable: no host syncs)")

    def available(self) -> str | None:
        reason = cuda_unavailable_reason(self.index)
        if reason is None and self.autocast == "bf16":
            import torch

            if not torch.cuda.is_bf16_supported():
                return f"cuda:{self.index} does not support bfloat16; use autocast=fp16"
        return reason

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    def prepare(self, model: Any, ctx: PrepareContext) -> Any:
        import torch

        torch.cuda.set_device(self.index)
        return model.to(self.device).eval()

    def _eager(self, prepared: Any, inputs: Any) -> Any:
        import torch

        from inferopt.utils import call_model

        dtype = torch.float16 if self.autocast == "fp16" else torch.bfloat16
        with torch.inference_mode(), torch.autocast(
            "cuda", dtype=dtype, enabled=self.autocast != "none"
        ):
            return call_model(prepared, inputs)

    def forward(self, prepared: Any, inputs: Any) -> Any:
        if not self.cuda_graphs:
            return self._eager(prepared, inputs)
        from inferopt.utils import iter_tensors

        graphs = _GRAPHS.setdefault(prepared, {})
        key = _signature(inputs)
        captured = graphs.get(key)
        if captured is None:
            captured = graphs[key] = self._capture(prepared, inputs)
        for static, new in zip(iter_tensors(captured.static_inputs), iter_tensors(inputs),
                               strict=True):
            static.copy_(new)
        captured.graph.replay()
        # the graph overwrites its output buffers on the next replay: hand out a copy
        return _clone(captured.static_outputs)

    def _capture(self, prepared: Any, inputs: Any) -> CapturedGraph:
        import torch

        from inferopt.utils import move_to

        static_inputs = move_to(inputs, self.device)
        static_inputs = _clone(static_inputs)
        # warm up on a side stream, as graph capture requires (lazy inits, autotuning)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._eager(prepared, static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_outputs = self._eager(prepared, static_inputs)
        return CapturedGraph(graph, static_inputs, static_outputs)

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize(self.index)

    def time(self, fn: Any) -> float:
        """Seconds between two CUDA events recorded around ``fn`` on the current stream; the
        device is synchronized first (nothing earlier is counted) and the end event waited on
        (everything ``fn`` queued is counted)."""
        import torch

        self.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3

    def describe(self) -> dict[str, Any]:
        import torch

        props = torch.cuda.get_device_properties(self.index)
        free, total = torch.cuda.mem_get_info(self.index)
        return {
            "backend": self.name,
            "gpu": props.name,
            "device": self.device,
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "memory_total_mb": round(total / 2**20),
            "memory_free_mb": round(free / 2**20),
            "peak_allocated_mb": round(torch.cuda.max_memory_allocated(self.index) / 2**20, 1),
            "autocast": self.autocast,
            "cuda_graphs": self.cuda_graphs,
        }


def _clone(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_clone(v) for v in obj)
    return obj


@hookimpl
def inferopt_register_backends(register: Any) -> None:
    register(CudaBackend)
