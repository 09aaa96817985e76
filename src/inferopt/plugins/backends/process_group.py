"""The process group torchrun set up, as the distributed backends use it.

``torchrun --nproc-per-node N -m inferopt run ...`` starts N copies of the pipeline with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address in their environment. The
first distributed backend to need the group joins it here (gloo on CPU, NCCL on CUDA); the
group lives as long as the process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from inferopt import InferoptError, UsageError

TORCHRUN_HINT = "torchrun --nproc-per-node N -m inferopt run ..."
DEFAULT_TIMEOUT_S = 120.0
_timeout_s = DEFAULT_TIMEOUT_S


class WorkerLost(InferoptError):
    """Another worker stopped answering in a collective: it died, was killed or froze."""

    exit_code = 2


def set_timeout(seconds: float) -> None:
    """How long a collective waits for the other workers before the run fails (set by the
    backend's ``timeout_s`` option before the group is joined)."""
    global _timeout_s
    _timeout_s = float(seconds)


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn the process group's errors (a peer closed the connection; the timeout passed) into
    one message naming this worker and what it was waiting for."""
    try:
        yield
    except InferoptError:
        raise
    except Exception as exc:
        rank = os.environ.get("RANK", "?")
        raise WorkerLost(
            f"worker {rank}: another worker stopped answering during {what} (it died, was "
            f"killed or froze; waited up to {_timeout_s:g} s): {type(exc).__name__}: "
            f"{str(exc)[:200]}. The run stopped and nothing was saved; see the other workers' "
            "output, or give the backend a larger timeout_s= if a worker is only slow"
        ) from exc


def launched_by_torchrun() -> bool:
    """Whether torchrun (or an equivalent launcher) gave this process a rank."""
    return all(var in os.environ for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def device_for_this_process(device_type: str) -> str:
    """``cpu``, or ``cuda:LOCAL_RANK`` after checking that this host has that many GPUs."""
    if device_type == "cpu":
        return "cpu"
    from inferopt.plugins.backends.cuda import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason:
        raise UsageError(f"device=cuda: {reason}; use device=cpu (gloo) instead")
    import torch

    count = torch.cuda.device_count()
    if local_world_size() > count:
        raise UsageError(
            f"torchrun started {local_world_size()} processes on this host but it has "
            f"{count} CUDA device(s); start at most --nproc-per-node {count}, or use device=cpu"
        )
    return f"cuda:{local_rank()}"


def join(device_type: str) -> Any:
    """Join torchrun's process group (once per process) and return ``torch.distributed``."""
    import torch.distributed as dist

    if not launched_by_torchrun():
        raise UsageError(f"not launched by torchrun; start the workers with {TORCHRUN_HINT}")
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; install a build with it")
    if dist.is_initialized():
        return dist
    if device_type == "cuda":
        import torch

        if not dist.is_nccl_available():
            raise UsageError("this torch build has no NCCL; use device=cpu (gloo)")
        device = torch.device(device_for_this_process("cuda"))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=_timedelta())
    else:
        dist.init_process_group("gloo", timeout=_timedelta())
    # The group is not destroyed at exit: destroying it while another worker still works
    # (the main one writing the report) can block in gloo; the process ending frees it.
    return dist


def _timedelta() -> Any:
    import datetime

    return datetime.timedelta(seconds=_timeout_s)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (pickled through the group; CPU tensors are fine)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    with collective("a gather of results"):
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int) -> Any:
    """``obj`` as rank ``src`` has it, on every rank."""
    import torch.distributed as dist

    box = [obj]
    with collective(f"a broadcast from worker {src}"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def check_devices(devices: tuple[str, ...] | list[str]) -> str | None:
    """None when every device exists here, otherwise which one does not and what there is."""
    import torch

    for dev in devices:
        try:
            parsed = torch.device(dev)
        except RuntimeError:
            return f"{dev!r} is not a device; write cpu or cuda:INDEX"
        if parsed.type == "cuda":
            from inferopt.plugins.backends.cuda import cuda_unavailable_reason

            reason = cuda_unavailable_reason(parsed.index or 0)
            if reason:
                return reason if reason.startswith(dev) else f"{dev}: {reason}"
        elif parsed.type != "cpu":
            return f"{dev!r}: only cpu and cuda devices are supported"
    return None


def setup_problem(distributed: bool, devices: tuple[str, ...], device_type: str,
                  per_process: str, too_few: str) -> str | None:
    """Why a several-worker backend cannot run as configured (None when it can): under
    torchrun each process takes one device of ``device_type``; in one process it needs at
    least two ``devices`` that exist here."""
    if distributed:
        if devices:
            return f"devices= is for one process; under torchrun {per_process}"
        if device_type == "cuda":
            from inferopt.plugins.backends.cuda import cuda_unavailable_reason

            return cuda_unavailable_reason()
        return None
    if len(devices) < 2:
        return too_few
    return check_devices(devices)


class SeveralWorkers:
    """What the several-worker backends share: under torchrun each process is one worker on
    its own device; in one process the workers are the ``devices`` listed. Classes using it
    have ``devices`` and ``device_type`` options."""

    devices: tuple[str, ...]
    device_type: str
    timeout_s: float

    def __attrs_post_init__(self) -> None:
        set_timeout(self.timeout_s)

    @property
    def distributed(self) -> bool:
        return launched_by_torchrun()

    @property
    def rank(self) -> int:
        return join(self.device_type).get_rank() if self.distributed else 0

    @property
    def world_size(self) -> int:
        return join(self.device_type).get_world_size() if self.distributed else 1

    @property
    def device(self) -> str:
        """Where inputs go: this process's device, or the first listed device."""
        if self.distributed:
            return device_for_this_process(self.device_type)
        return self.devices[0]
def broadcast_tensors(tensors: list[Any], src: int) -> None:
    """Rank ``src``'s ``tensors`` copied in place into every other rank's tensors of the same
    shapes and dtypes (one collective per tensor, no pickling)."""
    import torch.distributed as dist

    with collective(f"a broadcast from worker {src}"):
        for tensor in tensors:
            dist.broadcast(tensor, src=src)
