"""Statistics for timings: percentiles, and the speedup of one model over another with a
bootstrap confidence interval and a verdict that does not call noise a speedup.
(numpy only; no torch import.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# the MLPerf minimum sample counts for a tail percentile to mean something
MIN_SAMPLES = {"p90": 64, "p95": 133, "p99": 662}


def percentiles_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """p50/p90/p95/p99, mean, std, min, max in milliseconds, and which tail percentiles rest on
    too few samples (``unreliable``, by the MLPerf minimums)."""
    import numpy as np

    ms = np.asarray(seconds, dtype=float) * 1e3
    out: dict[str, Any] = {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }
    out["unreliable"] = [p for p, n in MIN_SAMPLES.items() if len(ms) < n]
    return out


MAX_BOOTSTRAP_PAIRS = 4000  # more pairs add little to the interval but cost time and memory


def speedup_ci(baseline: Sequence[float], candidate: Sequence[float], confidence: float = 0.95,
               resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Speedup = median(baseline) / median(candidate) over paired (interleaved) runs, with a
    percentile bootstrap interval that resamples the pairs together, so that noise which hit
    both runs of a pair stays paired. Past ``MAX_BOOTSTRAP_PAIRS`` pairs the interval is
    bootstrapped from a random subset of that many (slightly wider, never narrower); the point
    estimate uses every pair."""
    import numpy as np

    a = np.asarray(baseline, dtype=float)
    b = np.asarray(candidate, dtype=float)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    point = float(np.median(a) / np.median(b))
    rng = np.random.default_rng(seed)
    if n > MAX_BOOTSTRAP_PAIRS:
        keep = rng.choice(n, MAX_BOOTSTRAP_PAIRS, replace=False)
        a, b, n = a[keep], b[keep], MAX_BOOTSTRAP_PAIRS
    ratios = np.empty(resamples)
    for start in range(0, resamples, 200):  # in chunks: bounded memory
        idx = rng.integers(0, n, size=(min(200, resamples - start), n))
        ratios[start:start + len(idx)] = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return point, float(low), float(high)


def speed_verdict(speedup: float, low: float, high: float, min_effect: float) -> str:
    """``faster`` only when the whole interval is above 1 and the speedup is at least
    ``min_effect`` (a relative change worth calling one); ``slower`` likewise; otherwise
    ``no measurable change``."""
    if low > 1.0 and speedup >= 1.0 + min_effect:
        return "faster"
    if high < 1.0 and speedup <= 1.0 / (1.0 + min_effect):
        return "slower"
    return "no measurable change"
