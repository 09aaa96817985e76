"""structlog set-up: readable console lines by default, JSON lines with ``--log-format json``.

Logs always go to stderr so that ``--json`` leaves stdout to the report alone. Every event of a
run is bound with ``run_id``, and step events with ``step`` and ``plugin``.
"""

from __future__ import annotations

import logging as std_logging
import sys
from typing import Any

import structlog

FORMATS = ("console", "json")
LEVELS = ("debug", "info", "warning", "error")


def configure(fmt: str = "console", level: str = "info", stream: Any = None) -> None:
    """Configure structlog for this process (idempotent)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = stream or sys.stderr
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        colors = bool(getattr(out, "isatty", lambda: False)())
        processors.append(structlog.dev.ConsoleRenderer(colors=colors))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(std_logging, level.upper(), std_logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("inferopt").bind(**bound)
