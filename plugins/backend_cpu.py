"""The ``cpu`` backend: runs models on the host CPU, optionally with a fixed thread count."""

from __future__ import annotations

import os
import platform
from typing import Any

import attrs

from inferopt import Backend, hookimpl, option


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@attrs.frozen
class CpuBackend(Backend):
    """Run on the host CPU."""

    name = "cpu"
    summary = "host CPU (torch threads configurable)"

    threads: int = option(0, min=0, help="torch intra-op threads; 0 keeps torch's default")

    def prepare(self, model: Any) -> Any:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        return model.to("cpu").eval()

    def describe(self) -> dict[str, Any]:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        flags = cpu_flags()
        isa = sorted(f for f in flags if f.startswith(("avx512", "avx2", "amx", "avx_vnni")))
        return {
            "backend": self.name,
            "cpu": cpu_model_name(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa": " ".join(isa),
        }


@hookimpl
def inferopt_register_backends(register: Any) -> None:
    register(CpuBackend)
