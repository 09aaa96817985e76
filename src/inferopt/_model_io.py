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


def primary_output(outputs: Any, select: str | None = None) -> Any:
    """The tensor metrics and optimizers compare.

    ``select`` (the run's ``output`` setting) names it: a key of a dict or model-output object
    (``last_hidden_state``), an attribute, or a position in a tuple (``0``); dots go deeper
    (``hidden_states.2``). Without it: ``logits`` when there is one, else the first tensor.
    """
    if select:
        return select_output(outputs, select)
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


def output_names(outputs: Any) -> list[str]:
    """What ``select`` may name at the top level of an output (for error messages)."""
    import torch

    if isinstance(outputs, dict):
        return [str(k) for k, v in outputs.items() if v is not None]
    if isinstance(outputs, tuple | list):
        return [str(i) for i in range(len(outputs))]
    if hasattr(outputs, "keys") and callable(outputs.keys):  # transformers ModelOutput
        return [str(k) for k in outputs.keys()]
    if isinstance(outputs, torch.Tensor):
        return []
    return [k for k, v in vars(outputs).items() if not k.startswith("_")] if hasattr(
        outputs, "__dict__") else []


def select_output(outputs: Any, select: str) -> Any:
    """The tensor that ``select`` names in ``outputs`` (see :func:`primary_output`)."""
    import torch

    from inferopt._errors import UsageError

    current = outputs
    for depth, part in enumerate(select.split(".")):
        found, value = _lookup(current, part)
        if not found or value is None:
            where = ".".join(select.split(".")[:depth]) or "the model's output"
            names = output_names(current)
            raise UsageError(
                f"--output {select!r}: {where} ({type(current).__name__}) has no {part!r}; "
                + (f"it has: {', '.join(names)}" if names else "it is a single tensor; "
                   "leave --output unset")
            )
        current = value
    if not isinstance(current, torch.Tensor):
        raise UsageError(
            f"--output {select!r} names a {type(current).__name__}, not a tensor; go deeper "
            f"with dots (it has: {', '.join(output_names(current))})"
        )
    return current


def _lookup(obj: Any, part: str) -> tuple[bool, Any]:
    if isinstance(obj, tuple | list):
        if part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            return True, obj[int(part)]
        return False, None
    if isinstance(obj, dict) or (hasattr(obj, "keys") and hasattr(obj, "__getitem__")):
        if part in obj.keys():
            return True, obj[part]
        if part.isdigit() and hasattr(obj, "to_tuple"):  # ModelOutput by position
            items = obj.to_tuple()
            return (True, items[int(part)]) if int(part) < len(items) else (False, None)
        return False, None
    if not part.startswith("_") and hasattr(obj, part):
        return True, getattr(obj, part)
    return False, None


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
