"""Short fine-tuning after pruning, to win back accuracy the removed weights took with them.

With labelled data the loss is cross-entropy on the labels; without labels the pruned model
learns to reproduce the outputs the unpruned model gave on the same batches (mean squared
error), so unlabelled data works too. Unstructured masks are re-applied after every optimizer
step so that pruned weights stay exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from inferopt import UsageError
from inferopt.utils import call_model, move_to, primary_output


def dense_targets(model: torch.nn.Module, batches: list[Any], device: Any,
                  output: str | None = None) -> list[torch.Tensor]:
    """The model's primary outputs on ``batches``, kept as training targets."""
    was_training = model.training
    model.eval()
    with torch.no_grad():  # not inference mode: these become training targets
        out = [primary_output(call_model(model, _trainable(move_to(b.inputs, device))), output)
               for b in batches]
    model.train(was_training)
    return out


def _trainable(obj: Any) -> Any:
    """Data made under ``torch.inference_mode`` cannot take part in autograd; copy it."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, tuple | list):
        return type(obj)(_trainable(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _trainable(v) for k, v in obj.items()}
    return obj


def finetune(model: torch.nn.Module, batches: list[Any], steps: int, lr: float, seed: int,
             device: Any, log: Any, targets: list[torch.Tensor] | None = None,
             after_step: Callable[[], None] | None = None, output: str | None = None
             ) -> dict[str, Any]:
    """``steps`` AdamW steps over ``batches`` (shuffled, cycled). Returns the mean loss of the
    first and the last tenth of the steps."""
    labelled = all(b.labels is not None for b in batches)
    if not labelled and targets is None:
        raise UsageError("fine-tuning needs labels or the unpruned model's outputs")
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    order: list[int] = []
    from inferopt.utils import progress

    try:
        with progress(steps, "fine-tuning (steps)", 20) as advance:
            _train(model, batches, steps, labelled, targets, device, opt, gen, order, losses,
                   after_step, log, advance, output)
    finally:
        model.eval()
    tenth = max(len(losses) // 10, 1)
    return {"first_loss": sum(losses[:tenth]) / tenth, "last_loss": sum(losses[-tenth:]) / tenth,
            "loss": "cross-entropy on labels" if labelled
            else "MSE to the unpruned model's outputs"}


def _train(model: torch.nn.Module, batches: list[Any], steps: int, labelled: bool,
           targets: list[torch.Tensor] | None, device: Any, opt: Any, gen: Any,
           order: list[int], losses: list[float], after_step: Callable[[], None] | None,
           log: Any, advance: Callable[[int], None], output: str | None) -> None:
    with torch.enable_grad():
        for step in range(steps):
            if not order:
                order = torch.randperm(len(batches), generator=gen).tolist()
            i = order.pop()
            out = primary_output(call_model(model, _trainable(move_to(batches[i].inputs,
                                                                      device))), output)
            if labelled:
                labels = batches[i].labels.to(out.device).reshape(-1).long()
                loss = F.cross_entropy(out.reshape(labels.shape[0], -1).float(), labels,
                                       ignore_index=-100)
            else:
                assert targets is not None
                loss = F.mse_loss(out.float(), targets[i].to(out.device).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            losses.append(float(loss.detach()))
            advance(1)
            if (step + 1) % max(steps // 5, 1) == 0:
                log.info("prune fine-tune", step=step + 1, of=steps, loss=round(losses[-1], 5))
