"""SmoothQuant for int8 (imports torch): per-input-channel scales that move activation outliers
into the weights, guarded so that smoothing never makes a layer worse than plain int8.

``s = max|X|^alpha / max|W|^(1 - alpha)`` per input channel; the layer computes
``(X / s) @ (W s)^T``. Two things make that formula fail on real data, and both are guarded:

* a channel (almost) never active during calibration (a ReLU unit that was never positive on a
  handful of samples) gets a tiny ``s``, so its input is multiplied by up to ``1 / s`` at run
  time; when it does fire it dominates the activation range and the other channels lose their
  precision. Such channels (max below 1% of the median channel's) get the median scale, and
  every scale is clamped to ``[median / 4, median * 64]``: quiet channels are never amplified
  much more than a typical one, outlier channels can still be tamed;
* smoothing can lower a layer's fidelity (the weights take the outliers). Each layer keeps the
  candidate (an alpha, or no smoothing) with the smallest output error of the layer's int8
  kernel on calibration rows it was not fitted on; smoothing must cut the error of no
  smoothing by at least 20%, so that a gain seen on a few calibration rows is not mistaken
  for one that holds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from inferopt.plugins.quantization.layers import as_linear

AUTO_ALPHAS = (0.25, 0.5, 0.75)
UNSEEN = 0.01  # a channel whose calibration max is below this fraction of the median's
LOW, HIGH = 4.0, 64.0  # scales are kept within [median / LOW, median * HIGH]
SAMPLE_ROWS = 512  # held-out calibration rows kept per layer to judge the candidates
MARGIN = 0.8  # smoothing is kept only if it cuts the layer's error to this fraction
# a cheaper variant of a layer (per-tensor activations: no per-row passes) is kept when its
# output error is at most this many times the best variant's
# (1.5x and 0.005 more relative error: on the real MiniLM encoder and the GPT-2-shaped decoder
# this keeps pooled/logit cosine >= 0.998 with 32 of 37 / 45 of 49 layers per tensor)
TOLERANCE = 1.5
TOLERANCE_ADDED = 0.005


def guarded_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
                   ) -> torch.Tensor:
    """SmoothQuant scales per input channel, with unseen channels and extreme ratios guarded."""
    act = act_absmax.float()
    seen = act > UNSEEN * act.median().clamp(min=1e-12)
    s = act.clamp(min=1e-5).pow(alpha) / weight_absmax.float().clamp(min=1e-5).pow(1 - alpha)
    if bool(seen.any()):
        median = s[seen].median()
        s = torch.where(seen, s, median)
        s = torch.minimum(torch.maximum(s, median / LOW), median * HIGH)
    else:
        s = torch.ones_like(s)
    return s.clamp(min=1e-4, max=1e4)


def collect(model: Any, layers: dict[str, Any], batches: list[Any], device: Any
            ) -> tuple[dict[str, tuple[torch.Tensor, ...]], list[list[str]]]:
    """Per layer that saw any input: (max |x| per input channel over all calibration rows,
    the same over the even rows only, up to ``SAMPLE_ROWS`` odd rows, and the min and max of
    x per input channel over all rows). Candidates are fitted on the even rows and judged on
    the odd ones, so that a choice that only fits the rows it was computed from (a few
    calibration samples) loses. The per-channel min and max give the static activation range
    of any smoothing of the input (``x / s``: ``min_j(low_j / s_j)`` to ``max_j(high_j /
    s_j)``), the range ``mode=static`` calibrates over the same batches.

    Also the groups of layers that were called on the very same input tensor at every call (an
    attention's query, key and value projections), in model order: they can share one
    smoothing and one GEMM (:class:`~inferopt.plugins.quantization.int8.modules.SharedInput`).
    """
    from inferopt.utils import run_with_input_hooks

    calls: dict[str, list[tuple[Any, ...]]] = {n: [] for n in layers}

    fit: dict[str, torch.Tensor] = {}
    low: dict[str, torch.Tensor] = {}
    high: dict[str, torch.Tensor] = {}
    held: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    count = dict.fromkeys(layers, 0)
    kept = dict.fromkeys(layers, 0)

    def most(store: dict[str, torch.Tensor], name: str, rows: torch.Tensor) -> None:
        if rows.shape[0]:
            m = rows.abs().amax(dim=0).cpu()
            store[name] = m if name not in store else torch.maximum(store[name], m)

    def watch(name: str) -> Any:
        def add(x: torch.Tensor) -> None:
            # the tensor object itself (alive for the whole forward that passes it) and its
            # values (sums weighted by row and by channel): layers called on one tensor that
            # the model changes in place between the calls are not grouped
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            rows, cols = flat.sum(dim=1), flat.sum(dim=0)
            calls[name].append((id(x), x.data_ptr(), tuple(x.shape), float(rows.sum()),
                                float(rows @ torch.arange(1.0, len(rows) + 1, dtype=rows.dtype,
                                                          device=rows.device)),
                                float(cols @ torch.arange(1.0, len(cols) + 1, dtype=cols.dtype,
                                                          device=cols.device))))
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            odd = (torch.arange(flat.shape[0], device=flat.device) + count[name]) % 2 == 1
            count[name] += flat.shape[0]
            most(fit, name, flat[~odd])
            lo, hi = flat.amin(dim=0).cpu(), flat.amax(dim=0).cpu()
            low[name] = lo if name not in low else torch.minimum(low[name], lo)
            high[name] = hi if name not in high else torch.maximum(high[name], hi)
            if kept[name] < SAMPLE_ROWS and bool(odd.any()):
                take = flat[odd][: SAMPLE_ROWS - kept[name]].cpu()
                held[name].append(take)
                kept[name] += take.shape[0]

        return add

    run_with_input_hooks(model, {n: (m, watch(n)) for n, m in layers.items()}, batches, device)
    # max |x| per channel over all rows, from the per-channel min and max (one pass fewer)
    full = {n: torch.maximum(high[n], -low[n]) for n in low}
    stats = {n: (full[n], fit[n], torch.cat(held[n]), low[n], high[n]) for n in layers
             if n in fit and held[n]}
    by_calls: dict[tuple[Any, ...], list[str]] = {}
    for name in stats:
        # and the same values seen (an id and an address can be reused by a later tensor)
        key = (tuple(calls[name]), tuple(full[name].shape), hash(full[name].numpy().tobytes()))
        by_calls.setdefault(key, []).append(name)
    return stats, [names for names in by_calls.values() if len(names) > 1]


def choose(module: Any, absmax: torch.Tensor, fit_absmax: torch.Tensor, sample: torch.Tensor,
           alphas: tuple[float, ...], build: Any, variants: tuple[Any, ...] = (None,),
           channel_range: tuple[torch.Tensor, torch.Tensor] | None = None
           ) -> tuple[Any, float, torch.Tensor | None]:
    """(variant, alpha, scales from ``absmax`` or None for no smoothing): for each variant of
    the int8 layer (cheapest first; e.g. per-tensor, then per-row activations), the candidate
    alpha whose layer, with scales fitted on ``fit_absmax``, has the smallest output error on
    ``sample``; then the cheapest variant whose error is within ``TOLERANCE`` of the best.
    ``build(linear, scales, sample, variant, channel_range)`` makes the int8 layer as the step
    will (mode, kernel, activation range: static layers from ``channel_range``, the per-channel
    min and max of the input over all calibration rows)."""
    linear = as_linear(module)
    weight = linear.weight.detach().float().cpu()
    bias = None if linear.bias is None else linear.bias.detach().float().cpu()
    ref = F.linear(sample, weight, bias)
    norm = ref.pow(2).sum().clamp(min=1e-12)
    w_absmax = weight.abs().amax(dim=0)
    found: list[tuple[Any, float, float]] = []  # (variant, alpha, squared relative error)
    for variant in variants:
        best: tuple[float, float] | None = None
        for alpha in (0.0, *alphas):
            scales = None if alpha == 0.0 else guarded_scales(fit_absmax, w_absmax, alpha)
            layer = build(linear, scales, sample, variant, channel_range)
            with torch.inference_mode():
                out = layer(sample.to(layer.weight_int8.device)).float().cpu()
            error = float((out - ref).pow(2).sum() / norm)
            # smoothing must win clearly: a small gain on a few calibration rows may not hold
            # on other inputs, and then no smoothing is the safer choice
            margin = MARGIN if best is not None and best[0] == 0.0 else 1.0
            if best is None or error < margin * best[1]:
                best = (alpha, error)
        assert best is not None
        found.append((variant, *best))
    least = min(e for _v, _a, e in found) ** 0.5
    # (the last variant, the most faithful, when an error is not a number)
    variant, alpha, _e = next((f for f in found if f[2] ** 0.5 <= min(
        TOLERANCE * least, least + TOLERANCE_ADDED)), found[-1])
    if alpha == 0.0:
        return variant, 0.0, None
    return variant, alpha, guarded_scales(absmax, w_absmax, alpha)
