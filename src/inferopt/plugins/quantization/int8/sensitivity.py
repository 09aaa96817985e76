"""Per-layer sensitivity for int8 (imports torch): how far each quantized layer's output moves
from its float layer's on calibration inputs, so that the layers that cannot take int8 stay in
float (named in the report) and a collapse can be blamed on the worst layers.

The error of a layer is ``||int8(x) - float(x)|| / ||float(x)||`` on inputs the float model
gave that layer on the first calibration batches (up to ``ROWS`` rows for Linear layers, up to
``IMAGES`` inputs for convolutions). Each layer is judged alone, on its float inputs: the
number says what int8 does to that layer, not what earlier layers did to its input.
"""

from __future__ import annotations

from typing import Any

import torch

ROWS = 256  # input rows kept per Linear layer
IMAGES = 4  # inputs kept per convolution
BATCHES = 4  # calibration batches run to collect them


def collect(model: Any, layers: dict[str, Any], batches: list[Any], device: Any
            ) -> dict[str, torch.Tensor]:
    """Inputs each layer saw on the first calibration batches (layers that saw none are left
    out). Rows are taken evenly over the whole input, so padding at the end of sequences
    does not fill the sample."""
    from inferopt.utils import run_with_input_hooks

    kept: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def watch(name: str, conv: bool) -> Any:
        def add(x: torch.Tensor) -> None:
            have = sum(t.shape[0] for t in kept[name])
            if conv:
                x4 = x.detach() if x.dim() == 4 else x.detach().unsqueeze(0)
                if have < IMAGES:
                    kept[name].append(x4[: IMAGES - have].float().cpu())
                return
            rows = x.detach().reshape(-1, x.shape[-1])
            if have < ROWS and rows.shape[0]:
                step = max(1, rows.shape[0] // (ROWS - have))
                kept[name].append(rows[::step][: ROWS - have].float().cpu())

        return add

    watchers = {n: (m, watch(n, isinstance(m, torch.nn.Conv2d))) for n, m in layers.items()}
    run_with_input_hooks(model, watchers, batches[:BATCHES], device)
    return {n: torch.cat(v) for n, v in kept.items() if v}


def layer_error(float_layer: Any, quantized: Any, x: torch.Tensor) -> float:
    """Relative output error of ``quantized`` against ``float_layer`` on ``x``."""
    device = next(iter(quantized.buffers())).device
    weight = getattr(float_layer, "weight", None)
    # the layer's own dtype (a model cast to bf16 by an earlier step): the reference must run
    x = x.to(device=device, dtype=weight.dtype if weight is not None else x.dtype)
    with torch.inference_mode():
        ref = float_layer(x).float()
        out = quantized(x).float()
    norm = float(ref.norm())
    if norm == 0.0:
        return 0.0 if float(out.norm()) == 0.0 else float("inf")
    return float((out - ref).norm()) / norm
