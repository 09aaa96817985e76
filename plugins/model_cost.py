"""What a model costs to run, counted rather than timed: multiply-accumulates, parameters and
the share of zero weights."""

from __future__ import annotations

import re
from typing import Any

import attrs
import torch
from torch.utils.flop_counter import FlopCounterMode

from inferopt.model_io import call_model, first_tensor, move_to

# custom kernels (int8/int4 linear and convolution ops of other namespaces) do multiply-adds the
# counter has no formula for; they are named in the result instead of silently counted as zero
_MATMUL_LIKE = re.compile(r"linear|conv|matmul|gemm|(^|[._])mm($|[._])|_mm")


@attrs.frozen
class MacCount:
    per_sample: float
    uncounted_ops: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.uncounted_ops


class _Counter(FlopCounterMode):
    def __init__(self) -> None:
        super().__init__(display=False)
        self.uncounted: set[str] = set()

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet not in self.flop_registry:
            name = str(func_packet)
            if not name.startswith("aten.") and _MATMUL_LIKE.search(name):
                self.uncounted.add(name)
        return super()._count_flops(func_packet, out, args, kwargs)


def count_macs(model: torch.nn.Module, inputs: Any, device: Any = None) -> MacCount | None:
    """Multiply-accumulates per sample for one forward pass on ``inputs``, counted by
    ``torch.utils.flop_counter`` (matrix products, convolutions, attention; a MAC is two FLOPs),
    with the matrix-like custom kernels it could not count. None when counting fails."""
    if device is not None:
        inputs = move_to(inputs, device)
    tensor = first_tensor(inputs)
    batch = int(tensor.shape[0]) if tensor is not None and tensor.dim() > 0 else 1
    from inferopt.plugins.pruning_channels import no_fast_path

    counter = _Counter()
    try:
        # transformer layers' fused path runs as one op the counter cannot see into
        with torch.inference_mode(), no_fast_path(), counter:
            call_model(model, inputs)
    except Exception:  # an operation the counter cannot dispatch: no count rather than a crash
        return None
    return MacCount(counter.get_total_flops() / 2 / max(batch, 1), tuple(sorted(counter.uncounted)))


def macs_per_sample(model: torch.nn.Module, inputs: Any, device: Any = None) -> float | None:
    """:func:`count_macs`' number alone (None when it cannot be counted)."""
    count = count_macs(model, inputs, device)
    return None if count is None else count.per_sample


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_sparsity(model: torch.nn.Module) -> float:
    """Share of exact zeros among the floating-point weight matrices and kernels (parameters
    with two or more dimensions)."""
    zeros = total = 0
    for p in model.parameters():
        if p.dim() >= 2 and p.is_floating_point():
            zeros += int((p == 0).sum())
            total += p.numel()
    return zeros / total if total else 0.0
