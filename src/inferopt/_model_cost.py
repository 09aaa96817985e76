"""What a model costs to run, counted rather than timed: multiply-accumulates, parameters and
the share of zero weights."""

from __future__ import annotations

import re
from typing import Any

import attrs
import torch
from torch.utils.flop_counter import FlopCounterMode

from inferopt._model_io import call_model, first_tensor, move_to

# kernels the counter has no formula for that do multiply-adds (int8/int4 linear and
# convolution ops, attention variants) are named in the result instead of counted as zero;
# weight packing ("prepack") does none
_MATMUL_LIKE = re.compile(r"linear|conv|matmul|gemm|attention|(^|[._])mm($|[._])|_mm")


@attrs.frozen
class MacCount:
    per_sample: float
    uncounted_ops: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.uncounted_ops


def _extra_formulas() -> dict[Any, Any]:
    """Formulas torch's counter lacks for ops that run here: the int8 matrix product (the same
    count as a float one) and the CPU flash-attention kernel (the same as the CUDA one)."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    pairs = [("_int_mm", "mm"),
             ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention")]
    extra = {}
    for op, like in pairs:
        if hasattr(aten, op) and getattr(aten, like, None) in flop_registry:
            extra[getattr(aten, op)] = flop_registry[getattr(aten, like)]
    return extra


class _Counter(FlopCounterMode):
    def __init__(self) -> None:
        super().__init__(display=False)
        self.flop_registry.update(_extra_formulas())
        self.uncounted: set[str] = set()

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet not in self.flop_registry:
            name = str(func_packet)
            if _MATMUL_LIKE.search(name) and "prepack" not in name:
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


def _stored_weights(model: torch.nn.Module) -> list[tuple[int, int | None]]:
    """(elements, zeros or None) of the weights quantized layers keep in buffers rather than
    parameters: int8 weights as they are, packed int4 codes as the weights they stand for
    (zeros not counted: a code is not a value), and their float biases."""
    out: list[tuple[int, int | None]] = []
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        buffers = dict(module.named_buffers(recurse=False))
        weight = buffers.get("weight_int8")
        if weight is not None and "weight" not in own:
            out.append((weight.numel(), int((weight == 0).sum())))
        elif "weight_packed" in buffers and hasattr(module, "in_features"):
            out.append((module.in_features * module.out_features, None))
        else:
            continue
        bias = buffers.get("bias")
        if bias is not None and "bias" not in own:
            out.append((bias.numel(), None))
    return out


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters, counting the weights quantized layers keep in buffers as the parameters they
    replace (an int8 or int4 layer has as many weights as the float one)."""
    return sum(p.numel() for p in model.parameters()) + sum(
        n for n, _zeros in _stored_weights(model))


def weight_sparsity(model: torch.nn.Module) -> float:
    """Share of exact zeros among the weight matrices and kernels: floating-point parameters
    with two or more dimensions, and int8 weights (int4 codes are not counted)."""
    zeros = total = 0
    for p in model.parameters():
        if p.dim() >= 2 and p.is_floating_point():
            zeros += int((p == 0).sum())
            total += p.numel()
    for n, z in _stored_weights(model):
        if z is not None:
            zeros += z
            total += n
    return zeros / total if total else 0.0


def no_fast_path() -> Any:
    """Transformer layers' fused inference path skips hooks and the flop counter; turn it off."""
    import contextlib

    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def off() -> Any:
        was = mha.get_fastpath_enabled()
        mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            mha.set_fastpath_enabled(was)

    return off()
