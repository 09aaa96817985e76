"""Checks of the run's data before anything is measured, so that bad data is reported as the
data's fault (naming the spec, the split and the batch) instead of as the model's or a step's.
"""

from __future__ import annotations

from typing import Any

from inferopt._contract import Data
from inferopt._errors import UsageError

IGNORE_INDEX = -100  # PyTorch's ignore index: a label that is not counted


def _splits(data: Data) -> list[tuple[str, list[Any]]]:
    seen: list[int] = []
    out = []
    for name, batches in (("eval", data.eval), ("calibration", data.calibration),
                          ("training", data.train)):
        if id(batches) not in seen:
            seen.append(id(batches))
            out.append((name, batches))
    return out


def check_finite_inputs(data: Data, spec: str) -> None:
    """Every floating-point input tensor is finite: NaN or inf in the inputs is the data's
    fault, and would otherwise surface as the model's ("non-finite outputs")."""
    import torch

    from inferopt._model_io import iter_tensors

    for split, batches in _splits(data):
        for index, batch in enumerate(batches):
            for tensor in iter_tensors(batch.inputs):
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise UsageError(
                        f"--data {spec!r}: batch {index} of the {split} split has {bad} NaN or "
                        "infinite input value(s); the data is at fault, not the model. Clean "
                        "those samples or drop them")


def check_labels(data: Data, spec: str, classes: int | None) -> None:
    """Labels are class indices: integers, >= 0 (or -100, ignored), and below ``classes`` when
    the model gives class logits. A float or out-of-range label would give a wrong accuracy
    (or blame a training step) instead of an error."""
    for split, batches in _splits(data):
        for index, batch in enumerate(batches):
            labels = batch.labels
            if labels is None:
                continue
            where = f"--data {spec!r}: batch {index} of the {split} split"
            if labels.is_floating_point() or labels.dtype.is_complex or str(
                    labels.dtype) == "torch.bool":
                raise UsageError(
                    f"{where} has {labels.dtype} labels; labels are class indices: give "
                    "integers (for example labels.long()), or leave labels out and compare "
                    "with --metric fidelity")
            counted = labels[labels != IGNORE_INDEX]
            if counted.numel() == 0:
                continue
            low, high = int(counted.min()), int(counted.max())
            if low < 0:
                raise UsageError(
                    f"{where} has the negative label {low}; labels are class indices from 0 "
                    f"(-100 marks a sample that is not counted)")
            if classes is not None and high >= classes:
                raise UsageError(
                    f"{where} has the label {high}, but the model gives {classes} classes "
                    f"(labels 0 to {classes - 1}); check that the data's labels match the "
                    "model's classes")


def classes_of(output: Any) -> int | None:
    """The class count of a model output that looks like class logits ``[batch, classes]``."""
    if output is None or not output.is_floating_point() or output.dim() < 2:
        return None
    return int(output.shape[-1])
