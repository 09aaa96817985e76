"""Timing shared by the benchmark scripts: two models timed alternately on the same input, so
that machine noise (other processes, frequency changes) hits both alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_p50(base: Callable[[], Any], cand: Callable[[], Any], repeats: int,
                    device: str = "cpu", warmup: int = 3) -> tuple[float, float]:
    """Median milliseconds of ``base()`` and ``cand()``, run A B A B ... after a warm-up.
    A candidate more than 5x slower than the base gets only a few runs."""
    with torch.inference_mode():
        for _ in range(warmup):
            base()
            cand()
        sync(device)
        if timed(lambda: (cand(), sync(device))) > 5 * timed(lambda: (base(), sync(device))):
            repeats = min(repeats, 5)
        tb, tc = [], []
        for _ in range(repeats):
            tb.append(timed(lambda: (base(), sync(device))))
            tc.append(timed(lambda: (cand(), sync(device))))
    return statistics.median(tb) * 1e3, statistics.median(tc) * 1e3
