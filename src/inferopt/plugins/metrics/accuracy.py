"""The ``accuracy`` metric: top-1 and top-5 accuracy against the data's labels."""

from __future__ import annotations

from typing import Any

import attrs

from inferopt import Gate, Metric, Quantity, hookimpl

IGNORE_INDEX = -100


def topk_correct(logits: Any, labels: Any, ks: tuple[int, ...] = (1, 5)) -> tuple[dict[int, int],
                                                                                   int]:
    """({k: correct}, counted) for class logits ``[..., C]`` against labels ``[...]``: a sample
    is top-k correct when its label is among the k highest logits. Labels equal to -100 (the
    PyTorch ignore index) are not counted; k larger than the class count is left out."""
    from inferopt import UsageError

    if not logits.is_floating_point():  # the model already returns class indices
        labels = labels.to(logits.device).reshape(logits.shape)
        keep = labels != IGNORE_INDEX
        return {1: int((logits[keep] == labels[keep]).sum())}, int(keep.sum())
    if logits.dim() < 2:
        raise UsageError(
            f"accuracy needs class logits [batch, classes] (or class indices); the model "
            f"returned a float tensor of shape {tuple(logits.shape)}. Use --metric fidelity")
    classes = logits.shape[-1]
    flat = logits.reshape(-1, classes)
    labels = labels.to(logits.device).reshape(-1)
    keep = labels != IGNORE_INDEX
    flat, labels = flat[keep], labels[keep]
    ranked = flat.topk(min(max(ks), classes), dim=-1).indices
    hits = ranked == labels[:, None]
    return {k: int(hits[:, :k].any(dim=-1).sum()) for k in ks if k <= classes}, int(keep.sum())


@attrs.frozen
class AccuracyMetric(Metric):
    """Top-1 and top-5 accuracy (share of samples whose label is among the 1 or 5 highest
    logits; top-5 when there are at least 5 classes)."""

    name = "accuracy"
    summary = "top-1 and top-5 accuracy against labels"
    unit = "fraction"
    primary = "top1"
    higher_is_better = True
    quantities = {
        "top1": Quantity("fraction", "higher", "points", "accuracy top-1"),
        "top5": Quantity("fraction", "higher", "points", "accuracy top-5"),
    }
    aspect = "quality"
    gates = {
        "max_accuracy_drop": Gate("top1", "max_drop", reported_as="accuracy_drop_points", help=(
            "exit 1 if top-1 accuracy drops by more than this many points")),
        "max_relative_accuracy_drop": Gate("top1", "max_relative_drop",
                                           reported_as="accuracy_drop_percent", help=(
            "exit 1 if top-1 accuracy drops by more than this percent of the baseline's")),
    }
    needs_labels = True

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        from inferopt.utils import primary_output

        correct: dict[int, int] = {}
        total = 0
        for batch in data.eval:
            out = primary_output(backend.forward(model, backend.to_device(batch.inputs)),
                                 ctx.output)
            hits, n = topk_correct(out, batch.labels)
            for k, c in hits.items():
                correct[k] = correct.get(k, 0) + c
            total += n
        result: dict[str, Any] = {f"top{k}": c / total if total else float("nan")
                                  for k, c in sorted(correct.items())}
        result.update({"correct": correct.get(1, 0), "samples": total})
        if 5 in correct:
            result["correct_top5"] = correct[5]
        ctx.log.info("accuracy", top1=round(result.get("top1", float("nan")), 4), samples=total)
        return result

    def combine(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Workers saw disjoint shares of the data: counts add up."""
        correct = sum(r["correct"] for r in results)
        total = sum(r["samples"] for r in results)
        merged = {"top1": correct / total if total else float("nan"), "correct": correct,
                  "samples": total}
        if all("correct_top5" in r for r in results):
            top5 = sum(r["correct_top5"] for r in results)
            merged.update({"top5": top5 / total if total else float("nan"),
                           "correct_top5": top5})
        return merged


@hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(AccuracyMetric)
