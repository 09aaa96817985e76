"""Calling models whatever their inputs and outputs look like.

Inputs: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict (``model(**x)``).
Outputs: a tensor, tuple, dict or a model-output object (anything with ``logits`` or a
``to_tuple``/``values`` method, as in Hugging Face transformers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def call_model(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def iter_tensors(obj: Any) -> Iterator[Any]:
    """Every tensor in a (nested) output or input, in a stable order."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key in obj:
            yield from iter_tensors(obj[key])
    elif isinstance(obj, tuple | list):
        for item in obj:
            yield from iter_tensors(item)
    elif hasattr(obj, "to_tuple"):
        yield from iter_tensors(obj.to_tuple())
    elif hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from iter_tensors(value)


def first_tensor(obj: Any) -> Any:
    return next(iter_tensors(obj), None)


def primary_output(outputs: Any) -> Any:
    """The tensor metrics compare: ``logits`` when there is one, else the first tensor."""
    logits = None
    if isinstance(outputs, dict):
        logits = outputs.get("logits")
    elif hasattr(outputs, "logits"):
        logits = outputs.logits
    if logits is not None:
        return logits
    tensor = first_tensor(outputs)
    if tensor is None:
        raise TypeError(
            f"the model returned {type(outputs).__name__} with no tensor in it; "
            "return a tensor, a tuple/dict of tensors or an object with .logits"
        )
    return tensor


def move_to(obj: Any, device: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def output_signature(outputs: Any) -> list[tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of every tensor in an output, to check a step changed none."""
    return [(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in iter_tensors(outputs)]


def all_finite(outputs: Any) -> bool:
    import torch

    return all(
        bool(torch.isfinite(t).all()) for t in iter_tensors(outputs) if t.is_floating_point()
    )
