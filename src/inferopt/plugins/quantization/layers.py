"""What int8 and int4 share about layers: which ones compute ``x @ W^T + b`` (``nn.Linear``
and ``transformers``' transposed ``Conv1D``), which linear-like ones are left alone and why,
weights shared between modules, and layers an earlier step already replaced."""

from __future__ import annotations

from typing import Any


def _transformers_conv1d(module: Any) -> type | None:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's layers: weight ``[in, out]``,
    ``y = x @ W + b``) among the module's classes, found by name so that transformers is never
    imported here."""
    for cls in type(module).__mro__:
        if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
            return cls
    return None


def linear_like(module: Any) -> bool:
    """True for a layer int8/int4 can replace: ``nn.Linear`` or ``Conv1D`` (subclasses too)
    whose forward is the standard one, so the layer is exactly a matrix product plus bias."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return type(module).forward is torch.nn.Linear.forward
    conv1d = _transformers_conv1d(module)
    return (conv1d is not None and type(module).forward is conv1d.forward
            and getattr(module, "weight", None) is not None and module.weight.dim() == 2)


def unhandled_reason(module: Any) -> str | None:
    """Why a linear-like layer that :func:`linear_like` rejects is left in float (None for
    layers that are not linear-like at all)."""
    import torch

    if linear_like(module):
        return None
    if isinstance(module, torch.nn.Linear):
        return "a Linear subclass with its own forward"
    if _transformers_conv1d(module) is not None:
        return "a Conv1D subclass with its own forward"
    if isinstance(module, torch.nn.Bilinear):
        return "Bilinear (two inputs) is not supported"
    return None


def as_linear(module: Any) -> Any:
    """The layer as an ``nn.Linear`` (weight ``[out, in]``): the module itself, or for
    ``Conv1D`` a Linear on the meta device holding a transposed view of its weight (no copy;
    the quantizers transpose once when they pack)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module
    in_features, out_features = module.weight.shape
    view = torch.nn.Linear(in_features, out_features, bias=module.bias is not None,
                           device="meta")
    view.weight = torch.nn.Parameter(module.weight.detach().t(), requires_grad=False)
    if module.bias is not None:
        view.bias = torch.nn.Parameter(module.bias.detach(), requires_grad=False)
    return view


def weight_owners(model: Any) -> dict[int, list[str]]:
    """Storage address of every parameter -> names of the modules holding it (tied weights,
    such as a language model's head sharing the token embedding, have several owners)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if param.device.type == "meta" or param.numel() == 0:
                continue
            key = param.untyped_storage().data_ptr()
            if name not in owners.setdefault(key, []):
                owners[key].append(name)
    return owners


def tied_to(module: Any, name: str, owners: dict[int, list[str]]) -> list[str]:
    """The other modules sharing ``module``'s weight."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.device.type == "meta" or weight.numel() == 0:
        return []
    return [n for n in owners.get(weight.untyped_storage().data_ptr(), []) if n != name]


def untie(targets: dict[str, Any], owners: dict[int, list[str]], skipped: dict[str, str]
          ) -> None:
    """Leave out of ``targets`` (into ``skipped``) every layer whose weight is shared with a
    module that is not quantized with it: a quantized copy next to the float original makes
    the model larger, and the two would no longer stay equal."""
    changed = True
    while changed:  # dropping one layer can leave a partner it was tied to alone
        changed = False
        for name, module in list(targets.items()):
            others = [n for n in tied_to(module, name, owners) if n not in targets]
            if others:
                skipped[name] = (f"weight tied to {', '.join(others[:3])} (quantizing it would "
                                 "add a copy next to the float original)")
                targets.pop(name)
                changed = True


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
