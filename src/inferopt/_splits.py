"""Re-splitting a run's data into calibration / training / evaluation samples (``--split``).

Every sample the source gave (its eval, calibration and training batches, each counted once) is
pooled, shuffled with the split's seed, and cut into disjoint parts of the sizes the user set;
the parts are then batched again with the run's batch size. Inputs may be tensors, tuples or
dicts of tensors: a tensor whose first dimension is the batch's size is split per sample, any
other value (a scalar tensor, a flag) is kept as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inferopt._contract import Batch, Data
from inferopt._errors import UsageError

if TYPE_CHECKING:
    from inferopt._recipe import Split


def _concat(values: list[Any], size: list[int], where: str) -> Any:
    import torch

    first = values[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == size[0]:
        try:
            return torch.cat(values, dim=0)
        except RuntimeError as exc:
            raise UsageError(
                f"--split: the batches' {where or 'inputs'} have different shapes "
                f"({', '.join(str(tuple(v.shape)) for v in values[:4])}...), so their samples "
                "cannot be pooled; give data of one shape (pad text to one length) or leave "
                f"--split out ({exc.__class__.__name__})"
            ) from None
    if isinstance(first, dict):
        return {k: _concat([v[k] for v in values], size, f"{where}[{k!r}]") for k in first}
    if isinstance(first, tuple | list):
        return type(first)(
            _concat([v[i] for v in values], size, f"{where}[{i}]") for i in range(len(first))
        )
    return first


def _take(value: Any, index: Any, total: int) -> Any:
    import torch

    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
        return value.index_select(0, index)
    if isinstance(value, dict):
        return {k: _take(v, index, total) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_take(v, index, total) for v in value)
    return value


def _pool(batches: list[Batch]) -> tuple[Any, Any, int]:
    """All samples of ``batches`` as one (inputs, labels, count)."""
    sizes = [b.size for b in batches]
    inputs = _concat([b.inputs for b in batches], sizes, "")
    has_labels = all(b.labels is not None for b in batches)
    if not has_labels and any(b.labels is not None for b in batches):
        raise UsageError(
            "--split pools every sample the data source gave, but some of its batches have "
            "labels and others (its calibration or training split) do not, so the labels "
            "would be lost. Give labels for all of the data, or leave out --split and use "
            "the source's own splits")
    labels = _concat([b.labels for b in batches], sizes, "labels") if has_labels else None
    return inputs, labels, sum(sizes)


def split_data(data: Data, split: Split, batch_size: int) -> Data:
    """``data`` re-cut into the parts ``split`` asks for (see the module docstring)."""
    import torch

    sources: list[list[Batch]] = []
    for part in (data.eval, data.calibration, data.train):
        if part and not any(part is seen for seen in sources):
            sources.append(part)
    batches = [b for part in sources for b in part]
    inputs, labels, total = _pool(batches)
    wanted = {k: v for k, v in (("calibration", split.calibration), ("train", split.train),
                                ("eval", split.eval)) if v is not None}
    if sum(wanted.values()) > total or (split.eval is None and sum(wanted.values()) >= total):
        raise UsageError(
            f"--split {','.join(f'{k}={v}' for k, v in wanted.items())} asks for "
            f"{sum(wanted.values())} samples but the data has {total}"
            + ("" if split.eval is not None else " (and eval needs at least one left over)")
            + "; ask for fewer"
        )
    order = torch.randperm(total, generator=torch.Generator().manual_seed(split.seed))
    parts: dict[str, list[Batch]] = {}
    counts: dict[str, int] = {}
    start = 0
    for name in ("calibration", "train", "eval"):
        count = wanted.get(name, total - start if name == "eval" else 0)
        if not count:
            continue
        index = order[start:start + count]
        start += count
        counts[name] = count
        parts[name] = [
            Batch(inputs=_take(inputs, index[i:i + batch_size], total),
                  labels=None if labels is None else _take(labels, index[i:i + batch_size], total))
            for i in range(0, count, batch_size)
        ]
    described = ", ".join(f"{n} {c}" for n, c in counts.items())
    return Data(
        eval=parts["eval"],
        calibration=parts.get("calibration", []),
        train=parts.get("train", []),
        description=f"{data.description or 'data'}; split (seed {split.seed}): {described} "
                    f"of {total} samples",
    )
