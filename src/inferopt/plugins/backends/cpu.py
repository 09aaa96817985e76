"""The ``cpu`` backend: runs models on the host CPU, optionally with a fixed thread count."""

from __future__ import annotations

import os
from typing import Any

import attrs

from inferopt import Backend, PrepareContext, hookimpl, option
from inferopt.utils import cpu_flags, cpu_model


@attrs.frozen
class CpuBackend(Backend):
    """Run on the host CPU, with a fixed intra-op thread count and optional bf16 autocast."""

    name = "cpu"
    summary = "host CPU (threads, optional bf16 autocast)"

    threads: int = option(0, min=0, help="torch intra-op threads; 0 keeps torch's default")
    autocast: str = option(
        "none", choices=("none", "bf16"),
        help="run matmuls and convolutions in bfloat16 (torch.autocast); fast only on CPUs "
             "with AVX512-BF16 or AMX")

    def prepare(self, model: Any, ctx: PrepareContext) -> Any:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        return model.to("cpu").eval()

    def forward(self, prepared: Any, inputs: Any) -> Any:
        import torch

        from inferopt.utils import call_model

        with torch.inference_mode(), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=self.autocast == "bf16"
        ):
            return call_model(prepared, inputs)

    def describe(self) -> dict[str, Any]:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        flags = cpu_flags()
        isa = sorted(f for f in flags if f.startswith(("avx512", "avx2", "amx", "avx_vnni")))
        return {
            "backend": self.name,
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa": " ".join(isa),
            "autocast": self.autocast,
            "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
        }


@hookimpl
def inferopt_register_backends(register: Any) -> None:
    register(CpuBackend)
