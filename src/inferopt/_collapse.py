"""The collapse guard: after each step, the step's outputs on the first eval batch are compared
with the baseline's. A step that leaves finite outputs of the right shape can still have wrecked
the model (a quantization step on activation outliers, a buggy plugin); such a step stops the
run, naming it, unless the user allowed it (``--allow-collapse``). Pruning and distillation
steps change the function on purpose and are left to the accuracy budget."""

from __future__ import annotations

from typing import Any

from inferopt._errors import StepFailed

MIN_COSINE = 0.9  # below this, a step's outputs no longer resemble the baseline's
#: kinds of step that change the model's function on purpose (their logits move a lot while
#: accuracy holds); the accuracy budget judges them, not this guard
CHANGES_FUNCTION = ("pruning", "distillation")


def output_cosine(out: Any, baseline: Any) -> float | None:
    """The smallest cosine similarity between matching floating-point output tensors (each
    flattened), or None when no pair can be compared (no float outputs, or all zero)."""
    import torch

    from inferopt._model_io import iter_tensors

    worst = None
    for a, b in zip(iter_tensors(out), iter_tensors(baseline), strict=False):
        if not (a.is_floating_point() and b.is_floating_point()) or a.shape != b.shape:
            continue
        a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
        if float(a.norm()) == 0.0 and float(b.norm()) == 0.0:
            continue
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12))
        worst = cos if worst is None else min(worst, cos)
    return worst


def worst_layers(details: dict[str, Any] | None) -> str:
    """The step's own list of its worst layers (``details["worst_layers"]``: ``[[name,
    error], ...]``, worst first), as words; empty when the step gives none."""
    listed = (details or {}).get("worst_layers")
    if not isinstance(listed, list) or not listed:
        return ""
    parts = []
    for entry in listed[:5]:
        if isinstance(entry, list | tuple) and len(entry) == 2:
            layer, error = entry
            parts.append(f"{layer} (error {error:.3g})" if isinstance(error, int | float)
                         else str(layer))
        else:
            parts.append(str(entry))
    return "; worst layers: " + ", ".join(parts)


def check_collapse(ctx: Any, step: Any, name: str, out: Any, baseline: Any,
                   stopped: str, details: dict[str, Any] | None = None) -> None:
    """Raise :class:`StepFailed` (exit 2) if ``out`` collapsed against ``baseline``; with
    ``allow_collapse`` record a warning instead. The message names the step and, when the
    step measured them (``details["worst_layers"]``), its worst layers."""
    if str(getattr(step.instance, "kind", "") or "") in CHANGES_FUNCTION:
        return
    cos = output_cosine(out, baseline)
    if cos is None or cos >= MIN_COSINE:
        return
    what = (f"{name} collapsed the model's outputs: cosine {cos:.3f} against the baseline on the "
            f"first batch (at least {MIN_COSINE} expected){worst_layers(details)}")
    if str(getattr(step.instance, "kind", "") or "") == "quantization":
        what += (". Leave the most sensitive layers in float (skip=...), try smooth=auto or "
                 "mode=weight-only")
    if ctx.recipe.allow_collapse:
        message = f"{what}; kept because collapse is allowed (--allow-collapse)"
        ctx.warnings.append(message)
        ctx.log.warning(message)
        return
    raise StepFailed(f"{what}{stopped}. Pass --allow-collapse (allow_collapse = true) to keep "
                     "such a step")
