"""Calibration: run the calibration batches through a model and observe the inputs of chosen
modules. Used by static int8 quantization (activation ranges) and SmoothQuant (per-channel
maxima); imported only inside the optimizers that need it (it imports torch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from inferopt._model_io import call_model

#: values kept per module per batch for percentile estimates, and batches sampled at most:
#: bounded memory (about 1 MB per layer) and within torch.quantile's input limit
PERCENTILE_SAMPLE = 1 << 13
PERCENTILE_BATCHES = 32


class InputObserver:
    """Running statistics of one module's first input: global min/max, per-channel max |x|
    (the last dimension for Linear, dimension 1 for Conv2d), and a sample for percentiles."""

    def __init__(self, channel_dim: int, keep_sample: bool, seed: int = 0) -> None:
        self.channel_dim = channel_dim
        self.keep_sample = keep_sample
        self.min = float("inf")
        self.max = float("-inf")
        self.channel_absmax: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.batches = 0
        self._gen = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:  # e.g. an expert that got no tokens in this batch
            return
        x = x.detach().float()
        self.batches += 1
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        dim = self.channel_dim % x.dim()
        reduce = [d for d in range(x.dim()) if d != dim]
        absmax = x.abs().amax(dim=reduce).cpu() if reduce else x.abs().cpu()
        self.channel_absmax = (
            absmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, absmax)
        )
        if self.keep_sample and len(self.samples) < PERCENTILE_BATCHES:
            flat = x.flatten().cpu()
            if flat.numel() > PERCENTILE_SAMPLE:
                idx = torch.randint(0, flat.numel(), (PERCENTILE_SAMPLE,), generator=self._gen)
                flat = flat[idx]
            self.samples.append(flat)

    def range(self, observer: str, percentile: float) -> tuple[float, float]:
        """(low, high) of the activation range by ``minmax`` or ``percentile``."""
        if observer == "minmax" or not self.samples:
            return self.min, self.max
        values = torch.cat(self.samples)
        q = torch.tensor([(100.0 - percentile) / 100.0, percentile / 100.0])
        low, high = torch.quantile(values, q).tolist()
        return float(low), float(high)


def run_with_input_hooks(
    model: torch.nn.Module,
    watchers: dict[str, tuple[torch.nn.Module, Callable[[torch.Tensor], None]]],
    batches: Iterable[Any],
    device: Any = None,
) -> None:
    """Run ``batches`` through ``model`` (eval and inference mode, restored afterwards) and call
    each watcher with the first floating-point input of its module on every non-empty call."""
    from inferopt._model_io import move_to

    def hook_for(fn: Callable[[torch.Tensor], None]) -> Any:
        def hook(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
                fn(x)

        return hook

    from inferopt._progress import progress

    batches = list(batches)
    handles = [module.register_forward_pre_hook(hook_for(fn), with_kwargs=True)
               for module, fn in watchers.values()]
    # each module's own flag: a wrapper in train mode around an eval-mode model (a common way
    # to build one) must not come back with every dropout switched on
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode(), progress(len(batches), "calibration", 8) as advance:
            for batch in batches:
                call_model(model, batch.inputs if device is None
                           else move_to(batch.inputs, device))
                advance(1)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in was_training.items():
            module.training = training


def observe_inputs(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Module],
    batches: Iterable[Any],
    *,
    channel_dims: dict[str, int],
    keep_sample: bool,
    device: Any = None,
    scales: dict[str, torch.Tensor] | None = None,
) -> dict[str, InputObserver]:
    """Run ``batches`` (each a :class:`inferopt.Batch`) through ``model`` and observe the first
    input of every module in ``modules``; ``scales[name]``, when given, multiplies that module's
    input channels (the last dimension) before observing."""
    scales = scales or {}
    observers = {name: InputObserver(channel_dims[name], keep_sample) for name in modules}

    def watcher(obs: InputObserver, scale: torch.Tensor | None) -> Callable[[torch.Tensor], None]:
        return lambda x: obs.observe(x if scale is None else x * scale.to(x.device))

    run_with_input_hooks(
        model,
        {n: (m, watcher(observers[n], scales.get(n))) for n, m in modules.items()},
        batches,
        device,
    )
    return observers
