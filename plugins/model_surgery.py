"""Small helpers optimizers share to rewrite a model in place (no torch import at load time)."""

from __future__ import annotations

from typing import Any


def set_submodule(model: Any, name: str, new: Any) -> None:
    """Replace the submodule called ``name`` (as in ``model.named_modules()``) by ``new``."""
    if not name:
        raise ValueError("cannot replace the root module")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def device_of(model: Any) -> Any:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    import torch

    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
