"""What int8 and int4 share about layers a quantization step already replaced."""

from __future__ import annotations

from typing import Any


def quantized_layers(model: Any) -> list[str]:
    """Names of layers an earlier int8/int4 step already replaced."""
    from inferopt.plugins.quantization.int8.modules import (
        Int8MultiheadAttention,
        PackedWeightModule,
    )

    return [name for name, m in model.named_modules()
            if isinstance(m, PackedWeightModule | Int8MultiheadAttention)]


def nothing_to_quantize(step: str, handles: str, model: Any, skipped: dict[str, str]) -> str:
    """The error for a quantization step that found no layer: says when an earlier step already
    quantized them (a step applied twice)."""
    done = quantized_layers(model)
    if done:
        return (f"{step} found no float layer to quantize: {len(done)} layer(s) "
                f"({', '.join(done[:4])}) were already quantized by an earlier step. Apply one "
                f"quantization step per layer: remove this step, or give the earlier one "
                f"skip=... for the layers this one should take")
    return (f"{step} found no layer to quantize (it handles {handles}); skipped: "
            f"{skipped or 'none'}. Nothing to do for this model; remove the step or change "
            "its options")
