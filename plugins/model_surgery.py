"""Small helpers optimizers share to rewrite a model in place (no torch import at load time)."""

from __future__ import annotations

from typing import Any


def set_submodule(model: Any, name: str, new: Any) -> None:
    """Replace the submodule called ``name`` (as in ``model.named_modules()``) by ``new``,
    wherever the model refers to that same module (a shared module has several names)."""
    if not name:
        raise ValueError("cannot replace the root module")
    old = model.get_submodule(name)
    for parent in model.modules():
        # _modules, not named_children(): that one yields a module shared twice only once
        for child_name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, child_name, new)


def device_of(model: Any) -> Any:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    import torch

    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def require_swappable(model: Any, step: str) -> None:
    """Raise a UsageError when ``model`` is TorchScript: its forward is compiled code that calls
    its submodules' compiled code, so replacing a layer with a Python module cannot work."""
    import torch

    from inferopt.errors import UsageError

    if isinstance(model, torch.jit.ScriptModule):
        raise UsageError(
            f"{step} cannot change a TorchScript model: its layers are compiled code, not "
            "nn.Linear/nn.Conv2d modules it could replace. Give the model as Python code "
            "(python:MODULE:CALLABLE) or as a torch.export program (PATH.pt2) instead; "
            "TorchScript models can be measured with --optimize none"
        )


def quantized_layers(model: Any) -> list[str]:
    """Names of layers an earlier int8/int4 step already replaced."""
    from inferopt.plugins.int8_modules import Int8MultiheadAttention, PackedWeightModule

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
