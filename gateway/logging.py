"""Structured logs: one event name, key-value fields; JSON for machines, readable on a terminal.

`configure` is called once by the process entry point (`kakehashi run`, the CLI).
The format is `auto` by default: readable when standard error is a terminal, one
JSON object per line otherwise (what log collectors and journald want).
Secrets never reach the logs because no code passes them: tokens, keys and
passwords are not fields of any event.
"""

from __future__ import annotations

import logging as std_logging
import sys

import structlog

__all__ = ["configure"]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Set up structlog for this process, writing to standard error."""
    json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info
            if json
            else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, 20)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # aiohttp logs through the standard library; keep its noise at warning.
    std_logging.basicConfig(level=std_logging.WARNING, stream=sys.stderr)
