"""The ``data-parallel`` backend: a replica of the model per worker, each running its own share.

Two ways to run, chosen by how inferopt was started:

* under ``torchrun --nproc-per-node N`` (one host or several): each process holds a replica
  on its CPU (gloo) or its GPU (``cuda:LOCAL_RANK``, NCCL) and runs every N-th eval batch;
  outputs are gathered back in order, and each metric is merged over the workers
  (:meth:`inferopt.Metric.combine`: latency per worker, throughput summed);
* in one process with ``devices=cuda:0|cuda:1``: each batch is split along its first
  dimension, the parts run on the replicas at the same time (one thread each) and the outputs
  are concatenated on the first device, as ``torch.nn.DataParallel`` does.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs

from inferopt import Backend, PrepareContext, UsageError, hookimpl, option
from inferopt.plugins.backends import process_group

MODES_HELP = (
    "launch several processes with torchrun --nproc-per-node N -m inferopt run "
    "--backend data-parallel ..., or give in-process devices, e.g. "
    "data-parallel:devices=cuda:0|cuda:1"
)


class Replicas:
    """One copy of the model per device, and the threads that run them side by side."""

    def __init__(self, model: Any, devices: tuple[str, ...]) -> None:
        self.devices = devices
        self.models = [model.to(devices[0]).eval()] + [
            copy.deepcopy(model).to(dev).eval() for dev in devices[1:]
        ]
        self.pool = ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="replica")

    # what metrics such as size look at: one replica's weights
    def parameters(self) -> Any:
        return self.models[0].parameters()

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.models[0].state_dict(*args, **kwargs)


def _split_batch(obj: Any, parts: int) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return list(obj.tensor_split(parts))
    if isinstance(obj, dict):
        split = {k: _split_batch(v, parts) for k, v in obj.items()}
        return [{k: v[i] for k, v in split.items()} for i in range(parts)]
    if isinstance(obj, tuple | list):
        columns = [_split_batch(v, parts) for v in obj]
        return [type(obj)(col[i] for col in columns) for i in range(parts)]
    return [obj] * parts


def _concat_on(parts: list[Any], device: str) -> Any:
    import torch

    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([p.to(device) for p in parts])
    if isinstance(first, tuple | list):
        return type(first)(_concat_on([p[i] for p in parts], device) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat_on([p[k] for p in parts], device) for k in first}
    raise UsageError(
        f"data-parallel over devices needs a model that returns tensors (or tuples/dicts of "
        f"them) to concatenate; it returned {type(first).__name__}")


@attrs.frozen
class DataParallelBackend(process_group.SeveralWorkers, Backend):
    """A replica per worker: processes under torchrun (each runs its share of the batches), or
    devices in one process (each runs its slice of every batch)."""

    name = "data-parallel"
    summary = "a replica per process (torchrun) or per device, each on its share of the data"

    device_type: str = option(
        "cpu", choices=("cpu", "cuda"),
        help="under torchrun: CPU processes (gloo) or one GPU per process (NCCL)")
    timeout_s: float = option(
        process_group.DEFAULT_TIMEOUT_S, min=1.0,
        help="under torchrun: seconds a worker waits for the others before the run fails")
    devices: tuple[str, ...] = option(
        (), help="in one process: the devices holding replicas, e.g. cuda:0|cuda:1")
    threads: int = option(0, min=0, help="torch intra-op threads per worker; 0 keeps the default")

    def available(self) -> str | None:
        return process_group.setup_problem(
            self.distributed, self.devices, self.device_type,
            "each process uses device_type=cpu or device_type=cuda (GPU LOCAL_RANK)",
            f"it needs at least two workers: {MODES_HELP}")

    def prepare(self, model: Any, ctx: PrepareContext) -> Any:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        if self.distributed:
            self.rank  # noqa: B018 (joins the process group before any collective)
            return model.to(self.device).eval()
        return Replicas(model, self.devices)

    def forward(self, prepared: Any, inputs: Any) -> Any:
        if not isinstance(prepared, Replicas):
            return super().forward(prepared, inputs)
        from inferopt.utils import first_tensor, move_to

        size = int(first_tensor(inputs).shape[0])
        used = min(size, len(prepared.devices))
        parts = _split_batch(inputs, used)

        def run(i: int) -> Any:
            import torch

            device = prepared.devices[i]
            part = move_to(parts[i], device)
            if device.startswith("cuda"):
                with torch.cuda.device(device):
                    return super(DataParallelBackend, self).forward(prepared.models[i], part)
            return super(DataParallelBackend, self).forward(prepared.models[i], part)

        outs = list(prepared.pool.map(run, range(used)))
        return _concat_on(outs, prepared.devices[0])

    def synchronize(self) -> None:
        import torch

        devices = [self.device] if self.distributed else list(self.devices)
        for dev in dict.fromkeys(devices):
            if dev.startswith("cuda"):
                torch.cuda.synchronize(dev)

    def shard_indices(self, num_batches: int) -> list[int]:
        world = self.world_size
        if world > 1 and num_batches < world:
            raise UsageError(
                f"data-parallel with {world} workers needs at least {world} eval batches but "
                f"the data has {num_batches}; use a smaller --batch-size or more data")
        return list(range(self.rank, num_batches, world))

    def gather(self, obj: Any) -> list[Any]:
        if self.distributed and self.world_size > 1:
            return process_group.all_gather_objects(obj)
        return [obj]

    def aggregate(self, metric: Any, result: dict[str, Any]) -> dict[str, Any]:
        results = self.gather(result)
        return metric.combine(results) if len(results) > 1 else result

    def describe(self) -> dict[str, Any]:
        import torch

        facts: dict[str, Any] = {
            "backend": self.name,
            "mode": "torchrun" if self.distributed else "in-process",
            "threads_per_worker": torch.get_num_threads(),
            "cores": os.cpu_count(),
        }
        if self.distributed:
            dist = process_group.join(self.device_type)
            facts.update(workers=dist.get_world_size(), process_group=dist.get_backend(),
                         device=self.device_type)
        else:
            facts.update(workers=len(self.devices), devices=list(self.devices))
        return facts


@hookimpl
def inferopt_register_backends(register: Any) -> None:
    register(DataParallelBackend)
