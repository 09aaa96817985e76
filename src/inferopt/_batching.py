"""Turning what users hand us into a list of :class:`Batch`.

Accepted, at the top level: a tensor (split into batches along the first dimension), a tuple
``(inputs, labels)`` of tensors, a ``torch.utils.data.Dataset`` (batched with a DataLoader), or
any iterable of batches. Each batch may be a :class:`Batch`, a tensor, a tuple ``(inputs,
labels)`` (the DataLoader convention; use ``Batch(inputs=(a, b))`` for several positional
inputs), or a dict of keyword inputs whose ``labels``/``label`` entry, if any, is the labels.
"""

from __future__ import annotations

from typing import Any

from inferopt._contract import Batch
from inferopt._errors import UsageError


def to_batch(item: Any, what: str, index: int) -> Batch:
    import torch

    if isinstance(item, Batch):
        return item
    if isinstance(item, torch.Tensor):
        return Batch(inputs=item)
    if isinstance(item, dict):
        inputs = dict(item)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs.pop("label", None)
        if not inputs:
            raise UsageError(f"{what}: batch {index} is a dict with labels but no inputs")
        return Batch(inputs=inputs, labels=labels)
    if isinstance(item, tuple | list):
        if len(item) == 1:
            return Batch(inputs=item[0])
        if len(item) == 2:
            return Batch(inputs=item[0], labels=item[1])
        raise UsageError(
            f"{what}: batch {index} is a {type(item).__name__} of {len(item)} items; a batch is "
            "a tensor, (inputs, labels), a dict of named inputs, or inferopt.Batch(inputs=...)"
        )
    raise UsageError(
        f"{what}: batch {index} is a {type(item).__name__}; a batch is a tensor, "
        "(inputs, labels), a dict of named inputs, or inferopt.Batch(inputs=...)"
    )


def split_tensors(inputs: Any, labels: Any, batch_size: int) -> list[Batch]:
    n = int(inputs.shape[0])
    return [
        Batch(
            inputs=inputs[i : i + batch_size],
            labels=None if labels is None else labels[i : i + batch_size],
        )
        for i in range(0, n, batch_size)
    ]


def batches_from(obj: Any, batch_size: int, what: str) -> list[Batch]:
    import torch

    if isinstance(obj, torch.Tensor):
        return split_tensors(obj, None, batch_size)
    if (
        isinstance(obj, tuple)
        and len(obj) == 2
        and all(isinstance(t, torch.Tensor) for t in obj)
        and obj[0].dim() > 0
        and obj[1].dim() > 0
        and obj[0].shape[0] == obj[1].shape[0]
    ):  # (inputs, labels): the documented meaning of a pair of tensors
        return split_tensors(obj[0], obj[1], batch_size)
    if isinstance(obj, torch.utils.data.IterableDataset) or (
        isinstance(obj, torch.utils.data.Dataset) and hasattr(obj, "__len__")
    ):
        obj = torch.utils.data.DataLoader(obj, batch_size=batch_size, shuffle=False)
    try:
        iterator = iter(obj)
    except TypeError:
        raise UsageError(
            f"{what} is a {type(obj).__name__}; give a tensor, (inputs, labels), a torch "
            "Dataset or an iterable of batches"
        ) from None
    return [to_batch(item, what, i) for i, item in enumerate(iterator)]
