"""What a model costs to run, counted rather than timed: multiply-accumulates and parameters."""

from __future__ import annotations

from typing import Any

import torch

from inferopt.model_io import call_model, first_tensor, move_to


def macs_per_sample(model: torch.nn.Module, inputs: Any, device: Any = None) -> float | None:
    """Multiply-accumulates per sample for one forward pass on ``inputs``, counted by
    ``torch.utils.flop_counter`` (matrix products and convolutions; a MAC is two FLOPs).
    None when the model's operations cannot be counted."""
    from torch.utils.flop_counter import FlopCounterMode

    if device is not None:
        inputs = move_to(inputs, device)
    tensor = first_tensor(inputs)
    batch = int(tensor.shape[0]) if tensor is not None and tensor.dim() > 0 else 1
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            call_model(model, inputs)
    except Exception:  # an operation the counter cannot dispatch: no count rather than a crash
        return None
    return counter.get_total_flops() / 2 / max(batch, 1)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
