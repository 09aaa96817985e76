"""The ``fuse-bn`` optimizer: fold each BatchNorm2d that directly follows a Conv2d into the conv.

In eval mode a BatchNorm2d is a per-channel affine map ``y = (x - mean) * g + beta`` with
``g = gamma / sqrt(var + eps)``; after a convolution it folds into the conv's weight
(``w * g``) and bias (``(b - mean) * g + beta``), and the BatchNorm becomes ``nn.Identity``.
The result computes the same function with one pass over the activations fewer.

"Directly follows" is read from the traced graph (``torch.fx``): the BatchNorm's input is the
conv's output and nothing else uses that output. Models that ``torch.fx`` cannot trace fall back
to the children of ``nn.Sequential`` containers (a Conv2d child immediately followed by a
BatchNorm2d child). Pairs left alone are listed with the reason in the step's details.
"""

from __future__ import annotations

import fnmatch
import itertools
from typing import Any

import attrs

import inferopt


@attrs.frozen
class FuseBatchNorm(inferopt.Optimizer):
    """Fold BatchNorm2d into the preceding Conv2d (eval-mode statistics); BN becomes Identity."""

    name = "fuse-bn"
    summary = "fold each BatchNorm2d that directly follows a Conv2d into the conv's weight and bias"
    kind = "fusion"

    skip: tuple[str, ...] = inferopt.option(
        (), help="conv or BatchNorm layer name patterns (fnmatch) whose pair is left unfused")

    def apply(self, model: Any, ctx: inferopt.StepContext) -> Any:
        from inferopt.utils import require_swappable

        require_swappable(model, self.name)
        pairs, skipped, method = find_pairs(model)
        fused = []
        for conv_name, bn_name in pairs:
            if any(fnmatch.fnmatchcase(name, p) for p in self.skip
                   for name in (conv_name, bn_name)):
                skipped[bn_name] = "matched skip"
                continue
            fuse_pair(model, conv_name, bn_name)
            fused.append(f"{conv_name}+{bn_name}")
        ctx.details.update({"fused": fused, "skipped": skipped, "found_by": method})
        if not fused:
            if ctx.restoring:
                return model
            reason = ("; ".join(f"{k}: {v}" for k, v in skipped.items())
                      if skipped else "the model has no BatchNorm2d right after a Conv2d")
            raise inferopt.UsageError(
                f"fuse-bn: nothing to fuse ({reason}); drop the fuse-bn step for this model")
        ctx.details["summary"] = (
            f"folded {len(fused)} BatchNorm2d into their Conv2d"
            + (f"; left {len(skipped)} alone (see skipped)" if skipped else ""))
        return model


def find_pairs(model: Any) -> tuple[list[tuple[str, str]], dict[str, str], str]:
    """``[(conv name, bn name)]`` in model order, ``{bn name: why it is left alone}``, and
    how the pairs were found (``"torch.fx"`` or ``"sequential"``)."""
    import torch
    from torch import nn

    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:
        return _sequential_pairs(model), {}, "sequential"
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, skipped = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target),
                                                      nn.BatchNorm2d):
            continue
        bn_name, bn = node.target, modules[node.target]
        source = node.args[0] if node.args else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d)):
            skipped[bn_name] = "its input is not a Conv2d's output"
            continue
        conv_name = source.target
        if len(source.users) != 1:
            skipped[bn_name] = f"{conv_name}'s output is also used elsewhere"
        elif calls[conv_name] != 1 or calls[bn_name] != 1:
            skipped[bn_name] = "the conv or the BatchNorm runs more than once per forward"
        elif bn.running_mean is None or bn.running_var is None:
            skipped[bn_name] = "no running statistics (track_running_stats=False)"
        else:
            pairs.append((conv_name, bn_name))
    return pairs, skipped, "torch.fx"


def _sequential_pairs(model: Any) -> list[tuple[str, str]]:
    from torch import nn

    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in itertools.pairwise(children):
            if (isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)
                    and b.running_mean is not None):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def fuse_pair(model: Any, conv_name: str, bn_name: str) -> None:
    """Fold ``bn_name`` into ``conv_name`` in place (computed in float64) and put an
    ``nn.Identity`` where the BatchNorm was."""
    import torch
    from torch import nn

    from inferopt.utils import set_submodule

    conv = model.get_submodule(conv_name)
    bn = model.get_submodule(bn_name)
    with torch.no_grad():
        w = conv.weight.double()
        mean, var = bn.running_mean.double(), bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        conv.weight.copy_((w * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype))
        new_bias = ((bias - mean) * scale + beta).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)
    set_submodule(model, bn_name, nn.Identity())


@inferopt.hookimpl
def inferopt_register_optimizers(register: Any) -> None:
    register(FuseBatchNorm)
