"""Knowledge distillation, the torch side: building students and training them.

Imported only when the ``distill`` optimizer runs or a distilled model is rebuilt.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from inferopt import UsageError
from inferopt.utils import call_model, move_to, primary_output

IGNORE_INDEX = -100
_SIZE_ONLY = (torch.nn.ReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.Sigmoid,
              torch.nn.Dropout, torch.nn.Identity, torch.nn.MaxPool2d, torch.nn.AvgPool2d,
              torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d, torch.nn.LeakyReLU,
              torch.nn.Flatten)
_SHRINKABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d,
               torch.nn.LayerNorm)


def _flat_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    if not isinstance(model, torch.nn.Sequential):
        raise UsageError(
            f"student=shrink works on nn.Sequential MLPs and CNNs; the teacher is a "
            f"{type(model).__name__}. Give student=python:MODULE:CALLABLE (or PATH.py:CALLABLE) "
            "that builds your student")
    layers: list[torch.nn.Module] = []
    for layer in model:
        layers.extend(_flat_layers(layer) if isinstance(layer, torch.nn.Sequential) else [layer])
    return layers


def shrink(teacher: torch.nn.Module, ratio: float, round_to: int = 1) -> torch.nn.Sequential:
    """The teacher's architecture with every hidden width (Linear features, Conv2d channels,
    BatchNorm features) scaled by ``ratio``; input and output sizes unchanged. New weights."""
    layers = _flat_layers(teacher)
    for layer in layers:
        if not isinstance(layer, _SHRINKABLE + _SIZE_ONLY):
            raise UsageError(
                f"student=shrink cannot follow layer {type(layer).__name__}; give "
                "student=python:MODULE:CALLABLE that builds your student")
    sized = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    if not sized:
        raise UsageError("student=shrink found no Linear or Conv2d layer to shrink")
    last_width_layer = sized[-1]

    def scaled(n: int) -> int:
        return max(round_to, round(n * ratio / round_to) * round_to)

    out: list[torch.nn.Module] = []
    width: int | None = None  # current channel/feature count after shrinking
    teacher_width: int | None = None
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Linear):
            in_f = layer.in_features
            if width is not None and teacher_width is not None and teacher_width != in_f:
                # after Flatten: in_features = channels x spatial positions
                in_f = in_f // teacher_width * width
            elif width is not None:
                in_f = width
            out_f = layer.out_features if i == last_width_layer else scaled(layer.out_features)
            out.append(torch.nn.Linear(in_f, out_f, bias=layer.bias is not None))
            width, teacher_width = out_f, layer.out_features
        elif isinstance(layer, torch.nn.Conv2d):
            if layer.groups != 1:
                raise UsageError(f"student=shrink: grouped convolution {layer} is not supported")
            in_c = width if width is not None else layer.in_channels
            out_c = layer.out_channels if i == last_width_layer else scaled(layer.out_channels)
            out.append(torch.nn.Conv2d(in_c, out_c, layer.kernel_size, layer.stride,
                                       layer.padding, layer.dilation, bias=layer.bias is not None,
                                       padding_mode=layer.padding_mode))
            width, teacher_width = out_c, layer.out_channels
        elif isinstance(layer, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            out.append(type(layer)(width or layer.num_features, eps=layer.eps,
                                   momentum=layer.momentum, affine=layer.affine))
        elif isinstance(layer, torch.nn.LayerNorm):
            out.append(torch.nn.LayerNorm(width or layer.normalized_shape[0], eps=layer.eps))
        else:  # shape-preserving layers (activations, pooling, Flatten): copied as they are
            out.append(copy.deepcopy(layer))
    return torch.nn.Sequential(*out)


@attrs.frozen
class TrainConfig:
    mode: str  # "soft" or "hard"
    temperature: float
    alpha: float  # weight of the distillation term; 1 - alpha on the labels
    epochs: int
    lr: float
    weight_decay: float
    val_fraction: float
    patience: int
    seed: int
    output: str | None = None  # the run's --output: which output tensor is the logits


@attrs.define
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, float]]
    seconds: float


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None, cfg: TrainConfig) -> torch.Tensor:
    """Hinton et al. (2015): ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) +
    (1 - alpha) * CE(s, labels)``. In ``hard`` mode the first term is the cross-entropy against
    the teacher's argmax labels. Samples whose label is -100 (unlabelled) only get the first
    term; with no labels at all the whole weight goes to the first term."""
    c = student_logits.shape[-1]
    s = student_logits.reshape(-1, c).float()
    t = teacher_logits.reshape(-1, c).float()
    if cfg.mode == "soft":
        temp = cfg.temperature
        kd = F.kl_div(F.log_softmax(s / temp, dim=-1), F.log_softmax(t / temp, dim=-1),
                      reduction="batchmean", log_target=True) * temp * temp
    else:
        kd = F.cross_entropy(s, t.argmax(dim=-1))
    if labels is None or cfg.alpha >= 1.0:
        return kd
    y = labels.reshape(-1).to(s.device).long()
    if not bool((y != IGNORE_INDEX).any()):
        return kd
    ce = F.cross_entropy(s, y, ignore_index=IGNORE_INDEX)
    return cfg.alpha * kd + (1.0 - cfg.alpha) * ce


def train_student(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[Any],
                  cfg: TrainConfig, device: Any, log: Any,
                  progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train ``student`` on ``batches`` (teacher outputs computed once, the teacher frozen):
    AdamW with a cosine schedule, a held-out validation split of the batches, early stopping on
    the validation loss, and the best weights restored at the end. Seeded."""
    if len(batches) < 2:
        raise UsageError("distill needs at least 2 calibration batches (one for validation); "
                         "give more data or a smaller --batch-size")
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(batches), generator=gen).tolist()
    n_val = max(1, round(len(batches) * cfg.val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    teacher = teacher.to(device).eval()
    cached = []
    with torch.inference_mode():
        for b in batches:
            inputs = move_to(b.inputs, device)
            t_out = primary_output(call_model(teacher, inputs), cfg.output)
            cached.append((inputs, t_out.detach().clone(),
                           None if b.labels is None else b.labels.to(device)))
    student = student.to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(train_idx)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1))))
    best = (float("inf"), 0, copy.deepcopy(student.state_dict()))
    history: list[dict[str, float]] = []
    stale = 0
    start = time.perf_counter()
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        student.train()
        train_loss = 0.0
        for i in torch.randperm(len(train_idx), generator=gen).tolist():
            inputs, t_logits, labels = cached[train_idx[i]]
            opt.zero_grad(set_to_none=True)
            s_out = primary_output(call_model(student, inputs), cfg.output)
            loss = distillation_loss(s_out, t_logits, labels, cfg)
            loss.backward()
            opt.step()
            sched.step()
            train_loss += float(loss.detach())
        val_loss, val_agree = _validate(student, [cached[i] for i in val_idx], cfg)
        row = {"epoch": epoch, "train_loss": train_loss / max(len(train_idx), 1),
               "val_loss": val_loss, "val_teacher_agreement": val_agree,
               "lr": opt.param_groups[0]["lr"]}
        history.append(row)
        log.info("distill epoch", **{k: round(v, 5) for k, v in row.items()})
        if progress is not None:
            progress(epoch, cfg.epochs)
        if math.isfinite(val_loss) and val_loss < best[0] - 1e-6:
            best = (val_loss, epoch, copy.deepcopy(student.state_dict()))
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                log.info("early stop", epoch=epoch, best_epoch=best[1])
                break
    if best[1] == 0:
        raise UsageError(
            f"distill: training never produced a finite validation loss (last: {val_loss}); "
            "lower lr or temperature, or check the data for NaN/inf")
    student.load_state_dict(best[2])
    return TrainResult(epoch, best[1], best[0], history, time.perf_counter() - start)


def _validate(student: torch.nn.Module, cached: list[Any], cfg: TrainConfig
              ) -> tuple[float, float]:
    student.eval()
    total, agree, n = 0.0, 0, 0
    with torch.inference_mode():
        for inputs, t_logits, labels in cached:
            s_logits = primary_output(call_model(student, inputs), cfg.output)
            total += float(distillation_loss(s_logits, t_logits, labels, cfg))
            same = s_logits.argmax(-1) == t_logits.argmax(-1)
            agree += int(same.sum())
            n += same.numel()
    return total / max(len(cached), 1), agree / max(n, 1)
