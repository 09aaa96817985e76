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
    _quiet_library_tracebacks(level)


class _NoTracebacks(std_logging.Filter):
    """Keeps the line of a library's log record and drops its traceback: torch logs warnings
    with ``exc_info`` (torch.export's loader does), which would reach the user as a traceback
    although inferopt reports the failure itself. ``--log-level debug`` keeps them."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


_FILTER = _NoTracebacks()
_quiet = True


def _quiet_library_tracebacks(level: str) -> None:
    global _quiet
    _quiet = level != "debug"
    quiet_library_tracebacks()


def quiet_library_tracebacks() -> None:
    """Apply the traceback filter to the handlers torch's logger has now (torch adds its own
    handler when it is imported, so the pipeline calls this again once torch is loaded).
    Handler filters are used because a logger's own filters do not see its children's
    records (``torch.export`` logs through ``torch``'s handlers)."""
    names = ["torch"] + [n for n in std_logging.root.manager.loggerDict
                         if n.startswith("torch.")]
    # torch gives some of its loggers (torch.export, torch._dynamo) handlers of their own
    handlers = [h for n in names for h in std_logging.getLogger(n).handlers]
    if std_logging.lastResort is not None:
        handlers.append(std_logging.lastResort)
    for handler in handlers:
        if not _quiet:
            handler.removeFilter(_FILTER)
        elif _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("inferopt").bind(**bound)
