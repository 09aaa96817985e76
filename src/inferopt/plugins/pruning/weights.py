"""Unstructured pruning, the torch side: zero exactly the requested share of weights.

Scores are ``|W|`` (L1 magnitude) or ``|W| * ||X||`` (Wanda, Sun et al. 2023: the weight times
the L2 norm of its input feature over the calibration data). Selection is exact: ``round(s * n)``
weights per layer (``scope=layer``), over all layers together (``scope=global``), or per output
row (Wanda's comparison group). Zeros are written into the weights themselves; no
``torch.nn.utils.prune`` re-parametrisation or hooks are left behind.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from inferopt.utils import run_with_input_hooks

TARGETS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def select_layers(model: nn.Module, skip: tuple[str, ...]) -> tuple[dict[str, nn.Module],
                                                                    dict[str, str]]:
    """Linear and convolution layers, minus those matching a ``skip`` pattern."""
    targets: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or not isinstance(module, TARGETS):
            continue
        pattern = next((p for p in skip if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None:
            skipped[name] = f"matches skip pattern {pattern!r}"
        else:
            targets[name] = module
    return targets, skipped


def input_norms(model: nn.Module, layers: dict[str, nn.Module], batches: list[Any],
                device: Any) -> dict[str, torch.Tensor]:
    """L2 norm of each input feature (input channel for convolutions) over ``batches``."""
    sums: dict[str, torch.Tensor] = {}

    def watcher(name: str, module: nn.Module) -> Any:
        def observe(x: torch.Tensor) -> None:
            x = x.detach().float()
            if isinstance(module, nn.Linear):
                sq = x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)
            else:
                sq = x.movedim(1, -1).reshape(-1, x.shape[1]).pow(2).sum(dim=0)
            sums[name] = sums.get(name, 0) + sq.cpu()
        return observe

    run_with_input_hooks(model, {n: (m, watcher(n, m)) for n, m in layers.items()}, batches,
                         device)
    return {name: s.sqrt() for name, s in sums.items()}


def scores(layers: dict[str, nn.Module], norms: dict[str, torch.Tensor] | None
           ) -> dict[str, torch.Tensor]:
    """``|W|``, or ``|W| * ||X_j||`` for the layers that have input norms."""
    out = {}
    for name, module in layers.items():
        weight = module.weight.detach().float().abs().cpu()
        if norms is not None and name in norms:
            groups = getattr(module, "groups", 1)
            # a grouped convolution's output channel o reads only its group's input channels
            per_row = norms[name].reshape(groups, 1, -1).expand(
                groups, weight.shape[0] // groups, -1).reshape(weight.shape[0], -1)
            weight = weight * per_row.reshape(*per_row.shape, *[1] * (weight.dim() - 2))
        out[name] = weight
    return out


def _lowest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` lowest values; ties go to the lower index, so the count is exact."""
    return torch.argsort(values, stable=True)[:k]


def masks_for(layer_scores: dict[str, torch.Tensor], sparsity: float, scope: str
              ) -> dict[str, torch.Tensor]:
    """Boolean keep-masks with exactly ``round(sparsity * n)`` False entries, counted per layer,
    over all layers, or per output row (``scope``: layer, global, row)."""
    masks: dict[str, torch.Tensor] = {}
    if scope == "global":
        flat = torch.cat([s.reshape(-1) for s in layer_scores.values()])
        drop = _lowest(flat, round(sparsity * flat.numel()))
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[drop] = False
        offset = 0
        for name, s in layer_scores.items():
            masks[name] = keep[offset: offset + s.numel()].reshape(s.shape)
            offset += s.numel()
        return masks
    for name, s in layer_scores.items():
        if scope == "row":
            rows = s.reshape(s.shape[0], -1)
            k = round(sparsity * rows.shape[1])
            order = torch.argsort(rows, dim=1, stable=True)[:, :k]
            keep = torch.ones_like(rows, dtype=torch.bool)
            keep.scatter_(1, order, False)
            masks[name] = keep.reshape(s.shape)
        else:
            keep = torch.ones(s.numel(), dtype=torch.bool)
            keep[_lowest(s.reshape(-1), round(sparsity * s.numel()))] = False
            masks[name] = keep.reshape(s.shape)
    return masks


def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked weights in place (the masks are not kept in the model)."""
    with torch.no_grad():
        for name, mask in masks.items():
            weight = layers[name].weight
            weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


def sparsity_of(layers: dict[str, nn.Module]) -> tuple[dict[str, float], float]:
    """Share of exact zeros in each layer's weight, and over all of them."""
    per_layer: dict[str, float] = {}
    zeros = total = 0
    for name, module in layers.items():
        z = int((module.weight == 0).sum())
        n = module.weight.numel()
        per_layer[name] = z / n
        zeros += z
        total += n
    return per_layer, zeros / max(total, 1)
