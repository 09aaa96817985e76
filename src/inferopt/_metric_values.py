"""Checks of what a metric returns, where it enters the report: a bad value costs that metric
(skipped, with a warning naming its plugin), never the run's results at save time."""

from __future__ import annotations

import math
from typing import Any

_SCALARS = (bool, int, float, str, type(None))


def _check(value: Any, where: str, depth: int = 0) -> None:
    if isinstance(value, _SCALARS):
        return
    if depth > 8:
        raise ValueError(f"{where} is nested too deeply for a report")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r}, which is not a string")
            _check(item, f"{where}.{key}", depth + 1)
        return
    raise ValueError(f"{where} is of type {type(value).__name__}, which a JSON report cannot hold; "
                     "return numbers, strings, lists or dicts of them")


def check_result(result: Any, what: str) -> list[str]:
    """Raise ValueError when ``result`` (``what``: "measure() on the baseline"...) is not a
    flat-enough dict of JSON values; return warnings for NaN numbers (shown as n/a)."""
    if not isinstance(result, dict):
        raise ValueError(f"{what} returned a {type(result).__name__}, not a dict of numbers")
    _check(result, "the result")
    # NaN is a metric's failure; an infinity can be a true answer (the SNR of a model against
    # itself), so only NaN is said
    bad = sorted(k for k, v in result.items() if isinstance(v, float) and math.isnan(v))
    if bad:
        return [f"{what} gave NaN for {', '.join(bad)}; the report shows it as n/a (null in "
                "report.json)"]
    return []
