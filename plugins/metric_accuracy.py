"""The ``accuracy`` metric: top-1 accuracy against the data's labels."""

from __future__ import annotations

from typing import Any

import attrs

from inferopt import Metric, hookimpl

IGNORE_INDEX = -100


def top1_correct(logits: Any, labels: Any) -> tuple[int, int]:
    """(correct, counted) for class logits ``[..., C]`` against labels ``[...]``; labels equal to
    -100 (the PyTorch ignore index) are not counted."""
    from inferopt.errors import UsageError

    if not logits.is_floating_point():
        pred = logits  # the model already returns class indices
    elif logits.dim() < 2:
        raise UsageError(
            f"accuracy needs class logits [batch, classes] (or class indices); the model "
            f"returned a float tensor of shape {tuple(logits.shape)}. Use --metric fidelity")
    else:
        pred = logits.argmax(dim=-1)
    labels = labels.to(pred.device).reshape(pred.shape)
    keep = labels != IGNORE_INDEX
    return int((pred[keep] == labels[keep]).sum()), int(keep.sum())


@attrs.frozen
class AccuracyMetric(Metric):
    """Top-1 accuracy (fraction of samples whose argmax equals the label)."""

    name = "accuracy"
    summary = "top-1 accuracy against labels"
    unit = "fraction"
    primary = "top1"
    higher_is_better = True
    needs_labels = True

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        from inferopt.model_io import primary_output

        correct = total = 0
        for batch in data.eval:
            out = primary_output(backend.forward(model, backend.to_device(batch.inputs)),
                                 ctx.output)
            c, n = top1_correct(out, batch.labels)
            correct += c
            total += n
        top1 = correct / total if total else float("nan")
        ctx.log.info("accuracy", top1=round(top1, 4), samples=total)
        return {"top1": top1, "correct": correct, "samples": total}


@hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(AccuracyMetric)
