"""Small helpers optimizers share to rewrite a model in place (no torch import at load time)."""

from __future__ import annotations

from typing import Any


def set_submodule(model: Any, name: str, new: Any) -> None:
    """Replace the submodule called ``name`` (as in ``model.named_modules()``) by ``new``,
    wherever the model refers to that same module (a shared module has several names)."""
    if not name:
        raise ValueError("cannot replace the root module")
    old = model.get_submodule(name)
    # the parents as they are now: ``new`` may wrap ``old``, and must keep it as its child
    for parent in list(model.modules()):
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

    from inferopt._errors import UsageError

    if isinstance(model, torch.jit.ScriptModule):
        raise UsageError(
            f"{step} cannot change a TorchScript model: its layers are compiled code, not "
            "nn.Linear/nn.Conv2d modules it could replace. Give the model as Python code "
            "(python:MODULE:CALLABLE) or as a torch.export program (PATH.pt2) instead; "
            "TorchScript models can be measured with --optimize none"
        )
