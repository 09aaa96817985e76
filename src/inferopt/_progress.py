"""Progress bars for long work (calibration, fine-tuning, distillation, long measurements).

Plugins call :func:`progress`; bars appear on stderr only when it is a terminal, and never under
``inferopt run --json`` or with ``INFEROPT_PROGRESS=0``. ``INFEROPT_PROGRESS=1`` shows them
even when stderr is not a terminal (for logs that keep them). Nothing is drawn for short work
(under ``min_total`` units).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

_disabled = False


def set_disabled(flag: bool) -> None:
    """Turn progress bars off (or back on) for this process; ``inferopt run --json`` turns
    them off for its run."""
    global _disabled
    _disabled = flag


def _forced() -> bool:
    return os.environ.get("INFEROPT_PROGRESS", "").strip().lower() in ("1", "on", "true", "yes")


def enabled() -> bool:
    setting = os.environ.get("INFEROPT_PROGRESS", "auto").strip().lower()
    if _disabled or setting in ("0", "off", "false", "no"):
        return False
    return _forced() or sys.stderr.isatty()


@contextlib.contextmanager
def progress(total: int, description: str, min_total: int = 2
             ) -> Iterator[Callable[[int], None]]:
    """``with progress(n, "fine-tuning") as advance: ... advance(1)``: a bar of ``total`` units
    on stderr that goes away when done; a no-op when bars are off."""
    if not enabled() or total < min_total:
        yield _nothing
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(),
                   # forced onto a non-terminal (a log file): keep the final state as a line
                   console=Console(stderr=True), transient=not _forced())
    with bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance


def _nothing(n: int = 1) -> None:
    return None
