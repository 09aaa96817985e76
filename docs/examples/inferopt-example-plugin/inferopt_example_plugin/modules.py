"""The torch side of inferopt-example-plugin (imported only when the optimizer or metric runs)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_cast(v, dtype) for v in obj)
    return obj


class CastModel(torch.nn.Module):
    """Runs the wrapped module in ``dtype``: floating inputs are cast in, outputs cast back to
    float32, so callers see the same interface as before."""

    def __init__(self, module: torch.nn.Module, dtype: str) -> None:
        super().__init__()
        self.dtype_name = dtype
        self.module = module.to(getattr(torch, dtype))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        dtype = getattr(torch, self.dtype_name)
        out = self.module(*_cast(list(args), dtype), **_cast(kwargs, dtype))
        return _cast(out, torch.float32)


def cast_model(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    return CastModel(model, dtype)


def count_flops(model: torch.nn.Module, inputs: Any, backend: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        backend.forward(model, inputs)
    return int(counter.get_total_flops())
